"""batchcap.training.evaluate: a split captioned through the run path and scored, and its printed table."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import write_shapes_dataset

from batchcap.config import BeamConfig, to_dict
from batchcap.data.captions.factory import load_caption_dataset
from batchcap.model.modelfile import load_model
from batchcap.model.text import normalize_caption
from batchcap.pipeline.settings import runtime_config
from batchcap.training.evaluate import evaluate_split, format_scores

BEAM = BeamConfig(beam_size=2, max_len=6)


@pytest.fixture
def no_java(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Score without Java (no PTB tokenizer, no METEOR): a second, not several, per scoring."""
    empty = tmp_path / "no-java-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))


def evaluate(root: Path, model_path: Path, split: str = "val", **kw: object) -> tuple[dict, list[str]]:
    lines: list[str] = []
    result = evaluate_split(
        load_caption_dataset(root),
        split,
        load_model(model_path),
        runtime_config("cpu", "fp32", 4, "0", "torch"),
        BEAM,
        log=lines.append,
        **kw,  # type: ignore[arg-type]
    )
    return result, lines


def test_evaluate_split_captions_and_scores_every_picture(tmp_path: Path, tiny_model_path: Path, no_java: None) -> None:
    root = tmp_path / "shapes"
    write_shapes_dataset(root, n_train=4, n_val=6)
    dataset = load_caption_dataset(root)
    result, lines = evaluate(root, tiny_model_path)
    assert result["split"] == "val" and result["data"] == dataset.root
    assert result["images"] == 6 and result["failed"] == {} and result["missing"] == 0
    assert result["model"] == load_model(tiny_model_path).identity
    assert result["beam"] == to_dict(BEAM)
    assert (result["precision"], result["backend"]) == ("fp32", "torch")
    ids = [r.image_id for r in dataset.splits["val"]]
    assert [c["image_id"] for c in result["captions"]] == sorted(ids)
    by_id = {r.image_id: r for r in dataset.splits["val"]}
    vocabulary = set(load_model(tiny_model_path).vocab.words)
    for c in result["captions"]:
        assert c["references"] == list(by_id[c["image_id"]].captions)
        assert set(normalize_caption(c["caption"])) <= vocabulary  # a caption of this model
    scores = result["scores"]
    assert scores["images"] == 6 and scores["tokenizer"] == "batchcap"
    assert 0.0 <= scores["BLEU-1"] <= 1.0 and scores["METEOR"] is None
    assert all(line.endswith("/6 captioned") for line in lines)


def test_limit_takes_the_first_records(tmp_path: Path, tiny_model_path: Path, no_java: None) -> None:
    root = tmp_path / "shapes"
    write_shapes_dataset(root, n_train=2, n_val=5)
    result, _ = evaluate(root, tiny_model_path, limit=2)
    first = [r.image_id for r in load_caption_dataset(root).splits["val"][:2]]
    assert result["images"] == 2
    assert [c["image_id"] for c in result["captions"]] == sorted(first)


def test_an_unreadable_picture_is_reported_and_left_out_of_the_scores(
    tmp_path: Path, tiny_model_path: Path, no_java: None
) -> None:
    root = tmp_path / "shapes"
    write_shapes_dataset(root, n_train=2, n_val=4)
    broken = load_caption_dataset(root).splits["val"][1]
    data = Path(broken.path).read_bytes()
    Path(broken.path).write_bytes(data[:200])  # a JPEG cut short
    result, _ = evaluate(root, tiny_model_path)
    assert result["images"] == 3 and result["scores"]["images"] == 3
    assert list(result["failed"]) == [broken.image_id]
    assert result["failed"][broken.image_id].startswith("corrupt: ")
    assert broken.image_id not in {c["image_id"] for c in result["captions"]}
    assert "1 pictures could not be read" in format_scores(result)


def test_format_scores_is_one_line_per_metric() -> None:
    result = {
        "model": "tiny@0123456789ab",
        "split": "val",
        "images": 12,
        "beam": {"beam_size": 3},
        "backend": "openvino",
        "precision": "int8",
        "failed": {},
        "scores": {
            "tokenizer": "batchcap",
            "BLEU-1": 0.5,
            "BLEU-2": 0.25,
            "BLEU-3": 0.125,
            "BLEU-4": 0.0625,
            "METEOR": None,
            "ROUGE-L": 0.4,
            "CIDEr": 1.23456,
            "note": "METEOR skipped: no java on PATH",
        },
    }
    text = format_scores(result)
    lines = text.splitlines()
    assert lines[0] == "tiny@0123456789ab on val (12 images, beam 3, openvino int8, tokenizer batchcap)"
    assert lines[1:8] == [
        "  BLEU-1   0.5000",
        "  BLEU-2   0.2500",
        "  BLEU-3   0.1250",
        "  BLEU-4   0.0625",
        "  METEOR   n/a",
        "  ROUGE-L  0.4000",
        "  CIDEr    1.2346",
    ]
    assert lines[8] == "  note: METEOR skipped: no java on PATH"
    assert len(lines) == 9  # nothing failed: no line about it
    del result["backend"], result["scores"]["note"]
    assert "(12 images, beam 3, torch int8" in format_scores(result)
    assert "note" not in format_scores(result)
