"""The captioner's output: per-word scores, empty n-best slots, and the packaged default model."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from batchcap.config import BeamConfig, ImagePolicy, RuntimeConfig
from batchcap.data.loader import iter_batches
from batchcap.data.sources import open_sources
from batchcap.model.beam import BeamResult
from batchcap.model.modelfile import DEFAULT_MODEL, load_model, save_model
from batchcap.pipeline.captioner import NO_CAPTION, Captioner, caption_batch, token_logprobs_mean


def test_logprob_is_the_mean_over_the_tokens_a_caption_shows() -> None:
    # 2 words + <end> summing to -6; 5 words cut at max_len (no <end>) summing to -10
    token_lp = torch.zeros(1, 2, 6)
    token_lp[0, 0, :3] = torch.tensor([-1.0, -2.0, -3.0])
    token_lp[0, 1, :5] = -2.0
    result = BeamResult(
        tokens=torch.zeros(1, 2, 5, dtype=torch.long),
        lengths=torch.tensor([[2, 5]]),
        scores=torch.tensor([[-2.0, -10.0]]),
        ended=torch.tensor([[True, False]]),
        token_logprobs=token_lp,
    )
    assert torch.allclose(token_logprobs_mean(result), torch.tensor([[-2.0, -2.0]]))


def test_n_best_never_holds_empty_slots(tiny_model_path: Path, tmp_path: Path) -> None:
    model = load_model(tiny_model_path)
    captioner = Captioner(
        model, RuntimeConfig(precision="fp32", channels_last=False), BeamConfig(beam_size=5, n_best=5, max_len=3)
    )
    images = torch.randint(0, 256, (4, 3, 64, 64), dtype=torch.uint8)
    for caption in captioner(images):
        assert caption.n_best and all(score > float("-inf") for _, score in caption.n_best)
        assert caption.text == caption.n_best[0][0] and caption.score == caption.n_best[0][1]


def test_a_picture_with_nan_features_is_its_own_failure_not_the_batchs(
    tiny_model_path: Path, image_folder: Path
) -> None:
    model = load_model(tiny_model_path)
    captioner = Captioner(
        model, RuntimeConfig(precision="fp32", channels_last=False), BeamConfig(beam_size=3, n_best=2, max_len=5)
    )

    def poisoned(images: torch.Tensor) -> list:
        features = captioner.encode(images).clone()
        features[1] = float("nan")  # what an fp16 overflow in the encoder leaves behind
        features[2, 0] = float("inf")
        return captioner.search(features)

    batch = next(
        iter(iter_batches(open_sources([str(image_folder)]), model.preprocess, ImagePolicy(), batch_size=5, workers=0))
    )
    ids = [r.item.id for r in batch.ok]
    captions = caption_batch(poisoned, batch)
    assert [r.item.id for r in batch.ok] == [ids[0]] + ids[3:] and len(captions) == 3
    assert all(c.text and c.error is None for c in captions)
    assert [(r.item.id, r.status) for r in batch.failed] == [(ids[1], NO_CAPTION), (ids[2], NO_CAPTION)]
    assert all("no finite caption" in r.error for r in batch.failed)


def test_a_run_whose_encoder_overflows_writes_failure_rows(
    tiny_model_path: Path, image_folder: Path, tmp_path: Path
) -> None:
    import json

    from click.testing import CliRunner

    from batchcap.cli import cli

    model = load_model(tiny_model_path)
    state = dict(model.encoder_state)
    name = next(k for k, v in state.items() if k.endswith("weight") and v.dim() == 4)
    state[name] = torch.full_like(state[name], float("inf"))
    broken = tmp_path / "overflowing.safetensors"
    save_model(dataclasses.replace(model, encoder_state=state), broken)
    out = tmp_path / "c.jsonl"
    result = CliRunner().invoke(
        cli,
        ["run", str(image_folder), "--out", str(out), "--model", str(broken), "--precision", "fp32", "--workers", "0"],
    )
    assert result.exit_code == 5, result.output  # finished, with more failures than --max-failures
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 20 and {r["status"] for r in rows} == {NO_CAPTION}
    assert all(r["caption"] is None and "no finite caption" in r["error"] for r in rows)


@pytest.mark.cuda
def test_a_short_batch_on_cuda_is_padded_and_captioned_like_on_the_cpu(tiny_model_path: Path) -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    model = load_model(tiny_model_path)
    beam = BeamConfig(beam_size=3, max_len=6)
    images = torch.randint(0, 256, (5, 3, 64, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    on_cpu = Captioner(model, RuntimeConfig(precision="fp32", channels_last=False), beam)(images)
    on_gpu = Captioner(model, RuntimeConfig(device="cuda", precision="fp32", batch_size=8), beam)(images)
    assert len(on_gpu) == 5 and sum(a.text == b.text for a, b in zip(on_cpu, on_gpu)) >= 4


@pytest.mark.parametrize("alpha", [0.0, 0.7, 1.0])
def test_n_best_is_ordered_by_the_score_it_shows(tiny_model_path: Path, alpha: float) -> None:
    model = load_model(tiny_model_path)
    captioner = Captioner(
        model,
        RuntimeConfig(precision="fp32", channels_last=False),
        BeamConfig(beam_size=5, n_best=5, max_len=6, length_penalty=alpha),
    )
    images = torch.randint(0, 256, (6, 3, 64, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    captions = captioner(images)
    for caption in captions:
        shown = [score for _, score in caption.n_best]
        assert shown == sorted(shown, reverse=True) and caption.score == shown[0]
        assert caption.logprob < 0.0
        if alpha == 0.0:  # the search ranks by the summed log-probability: at least the per-token mean
            assert caption.score <= caption.logprob
    assert len({tuple(s for _, s in c.n_best) for c in captions}) > 1  # the images differ


def test_confidence_is_deterministic_and_in_unit_range(tiny_model_path: Path) -> None:
    from batchcap.model.confidence import EVIDENCE, Calibrator, fit_familiarity

    model = load_model(tiny_model_path)
    dim = model.encoder.feature_dim
    model.familiarity = fit_familiarity(torch.randn(50, dim, generator=torch.Generator().manual_seed(0)), components=8)
    model.calibration = Calibrator(
        EVIDENCE[:5], center=(0.0,) * 5, scale=(1.0,) * 5, coef=(2.0, 1.0, 0.5, 0.1, -1.0), intercept=0.3
    )  # no neighbours stored
    captioner = Captioner(
        model, RuntimeConfig(precision="fp32", channels_last=False), BeamConfig(beam_size=3, max_len=5)
    )
    images = torch.randint(0, 256, (5, 3, 64, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(4))
    first = [c.confidence for c in captioner(images)]
    again = [c.confidence for c in captioner(images)]
    assert first == again
    assert all(c is not None and 0.0 <= c <= 1.0 for c in first)
    assert len(set(first)) > 1


@pytest.mark.slow
def test_the_packaged_model_captions_photos_offline(tmp_path: Path) -> None:
    if not DEFAULT_MODEL.is_file():
        pytest.skip("no packaged default model in this checkout")
    from click.testing import CliRunner
    from conftest import shared_path

    from batchcap.cli import cli

    photos = shared_path("data", "flickr8k-sample", "Flicker8k_Dataset")
    subset = tmp_path / "photos"
    subset.mkdir()
    for path in sorted(photos.glob("*.jpg"))[:6]:
        (subset / path.name).write_bytes(path.read_bytes())
    out = tmp_path / "captions.jsonl"
    result = CliRunner().invoke(
        cli, ["run", str(subset), "--out", str(out), "--workers", "0"], env={"BATCHCAP_ENCODER_WEIGHTS": ""}
    )
    assert result.exit_code == 0, result.output
    import json

    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 6 and all(r["status"] == "ok" for r in rows)
    vocabulary = set(load_model(DEFAULT_MODEL).vocab.words)
    for row in rows:
        words = row["caption"].split()
        assert 3 <= len(words) <= 20 and set(words) <= vocabulary
        assert -5.0 < row["logprob"] < 0.0
        assert row["score"] >= row["logprob"]  # reranked: mean log-prob + weight * consensus (>= 0)
        assert 0.0 <= row["confidence"] <= 1.0
        assert words[-1] not in ("a", "in", "of", "the", "and")  # no caption ends mid-phrase
    # Flickr8k's world is people and dogs; these photos show both.
    text = " ".join(r["caption"] for r in rows)
    assert any(w in text for w in ("dog", "man", "girl", "boy", "woman", "people"))


def test_a_bf16_run_searches_with_bf16_weights_and_agrees_with_fp32() -> None:
    """The bf16 search against the fp32 one (the reference) on the same features of real photos."""
    from conftest import shared_path

    folder = shared_path("data", "flickr8k-sample")
    model = load_model(DEFAULT_MODEL)
    beam = BeamConfig(beam_size=3, max_len=model.max_caption_len)
    fp32 = Captioner(model, RuntimeConfig(precision="fp32", batch_size=16, workers=0), beam)
    bf16 = dataclasses.replace(fp32.runtime, precision="bf16")
    from batchcap.pipeline.captioner import search_decoder

    fast = search_decoder(model, bf16)
    assert {p.dtype for p in fast.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in fp32.decoder.parameters()} == {torch.float32}
    paths = sorted(str(p) for p in folder.rglob("*.jpg"))[:32]
    [*batches] = iter_batches(open_sources(paths), model.preprocess, ImagePolicy(), batch_size=16, workers=0)
    features = torch.cat([fp32.encode(b.images) for b in batches])
    reference = [c.text for c in fp32.search(features)]
    fp32.decoder = fast
    captions = fp32.search(features)
    same = sum(a == c.text for a, c in zip(reference, captions))
    assert same >= 0.85 * len(reference), (same, len(reference))
    assert all(c.error is None and c.logprob < 0 for c in captions)
