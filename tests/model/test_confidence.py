"""Confidence: familiarity, the calibrator and its measures, and --min-confidence on real runs."""

from __future__ import annotations

import json
import pickle
import re
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner

from batchcap.cli import cli
from batchcap.model.cider import CiderD
from batchcap.model.confidence import (
    EVIDENCE,
    Calibrator,
    Neighbours,
    auroc,
    fit_calibrator,
    fit_familiarity,
    fit_logistic,
    reliability_table,
)
from batchcap.model.modelfile import load_model, save_model


def _three_neighbours() -> tuple[Neighbours, torch.Tensor, list[list[str]]]:
    """Three training pictures on the unit circle with their captions, and a query near the first."""
    angles = torch.tensor([0.0, 0.6, 2.5])
    vectors = torch.stack([angles.cos(), angles.sin()], 1)
    captions = [["a dog runs on the grass", "a brown dog runs"], ["a dog swims", "a wet dog"], ["a red car", "a car"]]
    query = torch.tensor([[1.0, 0.05]]) / torch.tensor([[1.0, 0.05]]).norm()
    return Neighbours(vectors, captions, k=3), query, captions


def test_consensus_weights_each_neighbours_cider_by_its_closeness() -> None:
    neighbours, query, captions = _three_neighbours()
    caption = "a dog runs on the grass"
    sim, consensus = neighbours.query(query, [caption])
    # reference: CIDEr-D against each neighbour's captions, softmax(10 * cosine) weights
    words = [[c.split() for c in refs] for refs in captions]
    cider = CiderD(words)
    each = np.array([cider.score(caption.split(), cider.prepare(w)) for w in words])
    cosines = (query.double() @ neighbours.vectors.double().T)[0].numpy()
    weights = np.exp(10 * cosines) / np.exp(10 * cosines).sum()
    assert consensus[0] == pytest.approx(float((weights * each).sum()), rel=1e-9)
    assert sim[0] == pytest.approx(cosines.mean(), rel=1e-9)
    # the closest neighbour counts most: more than the plain mean of the three scores
    assert consensus[0] > each.mean()


def test_frequencies_built_in_the_background_or_after_pickling_give_the_same_consensus() -> None:
    fresh, query, _ = _three_neighbours()
    expected = fresh.query(query, ["a dog runs on the grass"])
    early, _, _ = _three_neighbours()
    building = early.prepare_in_background()  # what a captioner does while its encoder starts
    assert building is not None
    building.join(timeout=30)
    assert early._cider_d is not None and early.prepare_in_background() is None  # built, before any query
    assert early.query(query, ["a dog runs on the grass"])[1] == pytest.approx(expected[1], rel=1e-12)
    copied = pickle.loads(pickle.dumps(early))  # a used one travels to workers without its lock or caches
    assert copied._cider_d is None and copied.query(query, ["a dog runs on the grass"])[1] == pytest.approx(
        expected[1], rel=1e-12
    )


def test_files_fitted_before_the_weighting_keep_the_pooled_consensus(tmp_path: Path) -> None:
    weighted, query, captions = _three_neighbours()
    pooled = Neighbours(weighted.vectors, captions, k=3, temperature=None)
    caption = "a dog runs on the grass"
    words = [[c.split() for c in refs] for refs in captions]
    cider = CiderD(words)
    expected = cider.score(caption.split(), [r for w in words for r in cider.prepare(w)])
    assert pooled.query(query, [caption])[1][0] == pytest.approx(expected, rel=1e-9)
    assert "temperature" not in pooled.meta() and weighted.meta()["temperature"] == 10.0
    # a model file without the weighting loads as one; with it, as the other
    model = load_model(Path(__file__).parents[2] / "batchcap" / "assets" / "default-model.safetensors")
    for near in (pooled, weighted):
        model.neighbours = near
        save_model(model, tmp_path / "m.safetensors")
        loaded = load_model(tmp_path / "m.safetensors").neighbours
        assert loaded is not None and loaded.temperature == near.temperature
        assert loaded.query(query, [caption])[1][0] == pytest.approx(near.query(query, [caption])[1][0])


def test_a_pictures_style_is_that_of_most_of_its_neighbours_datasets(tmp_path: Path) -> None:
    vectors = torch.eye(4)
    captions = [["a dog"], ["a cat"], ["a car"], ["a bus"]]
    near = Neighbours(vectors, captions, k=3, datasets=["flickr8k", "everyday", "everyday", "other"])
    indices = torch.tensor([[1, 2, 0], [0, 1, 3], [3, 0, 2], [3, 3, 3]])
    # two everyday neighbours; a tie (one each, "other" is no style) goes to the earlier style; none: the first
    assert near.styles(indices, ["flickr8k", "everyday"]).tolist() == [1, 0, 0, 0]
    assert near.styles(indices, ["everyday", "flickr8k"]).tolist() == [0, 0, 0, 0]
    values, nearest = near.nearest(torch.tensor([[0.0, 0.9, 0.1, 0.0]]))
    assert nearest[0, :2].tolist() == [1, 2] and values[0, 0] == pytest.approx(0.9)
    unrecorded = Neighbours(vectors, captions, k=3)
    assert unrecorded.styles(indices, ["flickr8k", "everyday"]).tolist() == [0, 0, 0, 0]
    with pytest.raises(ValueError, match="3 dataset names for 4 neighbours"):
        Neighbours(vectors, captions, datasets=["a", "b", "c"])
    # the model file keeps each neighbour's dataset (names once, an index per picture)
    assert near.meta()["datasets"] == {"names": ["flickr8k", "everyday", "other"], "index": [0, 1, 1, 2]}
    model = load_model(Path(__file__).parents[2] / "batchcap" / "assets" / "default-model.safetensors")
    model.neighbours = near
    save_model(model, tmp_path / "m.safetensors")
    loaded = load_model(tmp_path / "m.safetensors").neighbours
    assert loaded is not None and loaded.datasets == ["flickr8k", "everyday", "everyday", "other"]


def test_auroc_is_the_chance_a_good_one_outscores_a_bad_one() -> None:
    rng = np.random.default_rng(0)
    scores, labels = rng.normal(size=60).round(1), rng.integers(0, 2, 60)  # rounded: ties happen
    pairs = [
        (s1 > s0) + 0.5 * (s1 == s0) for s1, l1 in zip(scores, labels) if l1 for s0, l0 in zip(scores, labels) if not l0
    ]
    assert auroc(scores, labels) == pytest.approx(np.mean(pairs))
    assert auroc([1, 2, 3], [0, 1, 1]) == 1.0 and auroc([3, 2, 1], [0, 1, 1]) == 0.0


def test_logistic_fit_recovers_a_known_model() -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(4000, 2))
    p = 1 / (1 + np.exp(-(0.5 + 2.0 * x[:, 0] - 1.0 * x[:, 1])))
    y = (rng.random(4000) < p).astype(float)
    coef, intercept = fit_logistic(x, y, l2=1e-6)
    assert coef == pytest.approx([2.0, -1.0], abs=0.15) and intercept == pytest.approx(0.5, abs=0.1)


def test_calibrator_fills_missing_inputs_with_its_centre_and_stays_in_unit_range() -> None:
    rng = np.random.default_rng(2)
    evidence = rng.normal(size=(300, len(EVIDENCE)))
    labels = (evidence[:, 0] + 0.3 * rng.normal(size=300) > 0).astype(int)
    calibrator = fit_calibrator(evidence, labels)
    confidence = calibrator(evidence)
    assert ((confidence >= 0) & (confidence <= 1)).all() and auroc(confidence, labels) > 0.9
    missing = evidence.copy()
    missing[:, EVIDENCE.index("margin")] = np.nan  # --beam 1: no second hypothesis
    assert np.isfinite(calibrator(missing)).all()
    assert Calibrator.from_dict(json.loads(json.dumps(calibrator.to_dict()))) == calibrator
    table = reliability_table(confidence, labels, bins=5)
    assert sum(row["images"] for row in table) == 300 and len(table) == 5


def test_familiarity_tells_training_pictures_from_others() -> None:
    gen = torch.Generator().manual_seed(3)
    basis = torch.randn(8, 64, generator=gen)
    train = torch.randn(400, 8, generator=gen) @ basis + 0.05 * torch.randn(400, 64, generator=gen)
    alike = torch.randn(100, 8, generator=gen) @ basis + 0.05 * torch.randn(100, 64, generator=gen)
    other = torch.randn(100, 64, generator=gen)  # off the training pictures' subspace
    fam = fit_familiarity(train, components=8)
    scores = torch.cat([fam.score(alike), fam.score(other)]).numpy()
    assert auroc(scores, np.r_[np.zeros(100), np.ones(100)]) > 0.99
    assert abs(float(fam.score(train).mean())) < 1.0  # about 0 for a typical training picture


@pytest.fixture
def calibrated_model(tiny_model_path: Path, image_folder: Path, tmp_path: Path) -> Path:
    """The tiny model with familiarity and a calibrator whose confidence varies across ``image_folder``.

    The calibrator is centred on the evidence of those very pictures, so they spread around 0.5.
    """
    from batchcap.config import BeamConfig, ImagePolicy, RuntimeConfig
    from batchcap.data.image_decode import decode_file
    from batchcap.pipeline.captioner import Captioner

    model = load_model(tiny_model_path)
    images = torch.stack(
        [decode_file(str(p), model.preprocess, ImagePolicy()).tensor for p in sorted(image_folder.iterdir())]
    )
    captioner = Captioner(model, RuntimeConfig(precision="fp32", channels_last=False), BeamConfig(beam_size=3))
    features = captioner.encode(images)
    model.familiarity = fit_familiarity(features.mean(1)[:12], components=4)
    _, evidence = captioner.search_with_evidence(features)
    center = np.nan_to_num(np.nanmean(evidence, 0))  # the tiny model has no neighbours: NaN columns
    scale = np.nan_to_num(np.nanstd(evidence, 0), nan=1.0) + 1e-6
    model.calibration = Calibrator(EVIDENCE, tuple(center), tuple(scale), (1.0, 1.0, 1.0, 0.5, -2.0, 0.5, 1.0), 0.0)
    path = tmp_path / "calibrated.safetensors"
    save_model(model, path)
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_min_confidence_sets_rows_aside_without_failing_the_run(
    calibrated_model: Path, image_folder: Path, tmp_path: Path
) -> None:
    base = [
        "run",
        str(image_folder),
        "--model",
        str(calibrated_model),
        "--workers",
        "0",
        "--device",
        "cpu",
        "--precision",
        "fp32",
    ]
    plain = CliRunner().invoke(cli, base + ["--out", str(tmp_path / "plain.jsonl")])
    assert plain.exit_code == 0, plain.output
    rows = read_jsonl(tmp_path / "plain.jsonl")
    confidences = sorted(r["confidence"] for r in rows)
    assert all(0.0 <= c <= 1.0 for c in confidences) and len(set(confidences)) > 5
    threshold = confidences[len(confidences) // 2]
    below = {r["id"] for r in rows if r["confidence"] < threshold}
    assert below

    gated = CliRunner().invoke(
        cli, base + ["--out", str(tmp_path / "gated.jsonl"), "--min-confidence", str(threshold), "--max-failures", "0"]
    )
    assert gated.exit_code == 0, gated.output  # set-aside rows are not failures
    assert re.search(rf"low confidence: +{len(below)} \(set aside below {threshold:g}\)", gated.output)
    again = {r["id"]: r for r in read_jsonl(tmp_path / "gated.jsonl")}
    for row in rows:
        kept = again[row["id"]]
        assert kept["status"] == ("low_confidence" if row["id"] in below else "ok")
        # the caption, score and confidence stay in the row, for the reviewer
        assert (kept["caption"], kept["score"], kept["confidence"]) == (row["caption"], row["score"], row["confidence"])


def _unloadable_copy(model: Path, to: Path) -> Path:
    """``model`` with its metadata intact but one tensor byte changed: reading its metadata works,
    loading its tensors fails (hash mismatch). A run that captions nothing never notices."""
    data = bytearray(model.read_bytes())
    data[-1] ^= 0xFF
    to.write_bytes(bytes(data))
    with pytest.raises(Exception, match="(?i)hash|sha|corrupt|tensor"):
        load_model(to)
    return to


def _statuses(path: Path) -> dict[str, str]:
    if path.suffix == ".jsonl":
        return {r["id"]: r["status"] for r in read_jsonl(path)}
    table = pq.read_table(path, columns=["id", "status"])
    return dict(zip(table.column("id").to_pylist(), table.column("status").to_pylist()))


def _rows(path: Path) -> dict[str, dict]:
    if path.suffix == ".jsonl":
        return {r["id"]: r for r in read_jsonl(path)}
    return {r["id"]: r for r in pq.read_table(path).to_pylist()}


@pytest.mark.parametrize("suffix", ["jsonl", "parquet"])
def test_another_min_confidence_relabels_the_output_without_captioning(
    calibrated_model: Path, image_folder: Path, tmp_path: Path, suffix: str
) -> None:
    out = tmp_path / f"captions.{suffix}"

    def run(model: Path, *threshold: str) -> Any:
        args = ["run", str(image_folder), "--out", str(out), "--model", str(model), "--workers", "0"]
        return CliRunner().invoke(cli, args + ["--device", "cpu", "--precision", "fp32", *threshold])

    first = run(calibrated_model)
    assert first.exit_code == 0, first.output
    before = _rows(out)
    confidences = sorted(r["confidence"] for r in before.values())
    threshold = confidences[len(confidences) // 2]
    below = {i for i, r in before.items() if r["confidence"] < threshold}
    assert below and all(r["status"] == "ok" for r in before.values())

    # From here on the model would fail to load: a relabel must not load it, nor caption anything.
    broken = _unloadable_copy(calibrated_model, tmp_path / "calibrated-broken.safetensors")
    relabel = run(broken, "--min-confidence", str(threshold))
    assert relabel.exit_code == 0, relabel.output
    assert re.search(r"captioned now:\s+0\b", relabel.output), relabel.output
    assert re.search(rf"relabelled:\s+{len(below)} ", relabel.output), relabel.output
    assert re.search(rf"low confidence:\s+{len(below)} \(set aside below {threshold:g}\)", relabel.output)
    after = _rows(out)
    assert _statuses(out) == {i: "low_confidence" if i in below else "ok" for i in before}
    for i, row in before.items():  # only the status changed
        assert {**after[i], "status": row["status"]} == row

    # The same threshold again: nothing to do, the file is not rewritten.
    stamp = out.stat().st_mtime_ns, out.stat().st_ino
    again = run(broken, "--min-confidence", str(threshold))
    assert again.exit_code == 0, again.output
    assert (out.stat().st_mtime_ns, out.stat().st_ino) == stamp and "relabelled" not in again.output

    # No threshold: every captioned row is ok again, still without captioning.
    cleared = run(broken)
    assert cleared.exit_code == 0, cleared.output
    assert re.search(rf"relabelled:\s+{len(below)} ", cleared.output), cleared.output
    assert set(_statuses(out).values()) == {"ok"} and _rows(out) == before


def test_output_with_min_confidence_among_its_resume_settings_stays_resumable(
    calibrated_model: Path, image_folder: Path, tmp_path: Path
) -> None:
    """Outputs written while the threshold was a resume setting resume, and relabel, like new ones."""
    out = tmp_path / "old.jsonl"
    args = ["run", str(image_folder), "--out", str(out), "--model", str(calibrated_model), "--workers", "0"]
    first = CliRunner().invoke(cli, args + ["--min-confidence", "0.5"])
    assert first.exit_code == 0, first.output
    meta_path = Path(f"{out}.meta.json")
    meta = json.loads(meta_path.read_text())
    meta["resume_settings"]["min_confidence"] = meta.pop("min_confidence")  # as older batchcap wrote it
    meta_path.write_text(json.dumps(meta))
    rows = read_jsonl(out)

    same = CliRunner().invoke(cli, args + ["--min-confidence", "0.5"])
    assert same.exit_code == 0 and "relabelled" not in same.output, same.output
    assert read_jsonl(out) == rows

    off = CliRunner().invoke(cli, args)
    assert off.exit_code == 0, off.output
    assert {r["status"] for r in read_jsonl(out)} == {"ok"}
    assert json.loads(meta_path.read_text())["min_confidence"] is None


def test_min_confidence_needs_a_calibrated_model(tiny_model_path: Path, image_folder: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(
        cli,
        [
            "run",
            str(image_folder),
            "--model",
            str(tiny_model_path),
            "--out",
            str(tmp_path / "o.jsonl"),
            "--min-confidence",
            "0.5",
        ],
    )
    assert result.exit_code == 2 and "no confidence calibration" in result.output
    assert not (tmp_path / "o.jsonl").exists()
