"""The tutorial-style reference path and batchcap's own path write the same greedy captions."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import REPO, make_tiny_model, shared_path, write_images

from batchcap.config import BeamConfig, ImagePolicy, RuntimeConfig
from batchcap.data.image_decode import decode_file
from batchcap.model.modelfile import load_model
from batchcap.pipeline.captioner import Captioner
from batchcap.tools.reference import ReferenceCaptioner, reference_pixels


def batchcap_greedy(
    model_path: Path, paths: list[Path], min_len: int = 1, encoder_weights: str | None = None
) -> list[str]:
    """Captions from batchcap's own path: decode stage, batched encoder, beam 1, fp32.

    Without the word rules: the tutorial's path has none, and like is compared with like.
    """
    model = load_model(model_path)
    runtime = RuntimeConfig(device="cpu", precision="fp32", batch_size=len(paths), workers=0)
    beam = BeamConfig(
        beam_size=1, max_len=model.max_caption_len, min_len=min_len, ending_rule=False, allow_repeated_words=True
    )
    captioner = Captioner(model, runtime, beam, encoder_weights)
    decoded = [decode_file(str(p), model.preprocess, ImagePolicy()) for p in paths]
    images = torch.stack([d.tensor for d in decoded])  # (B, 3, H, W) uint8
    return [c.text for c in captioner(images)]


def reference_greedy(
    model_path: Path, paths: list[Path], min_len: int = 1, encoder_weights: str | None = None
) -> list[str]:
    ref = ReferenceCaptioner(load_model(model_path), encoder_weights, min_len=min_len)
    return [ref.caption(p) for p in paths]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("seed,attention,min_len", [(0, True, 1), (1, False, 1), (2, True, 4)])
def test_reference_greedy_matches_beam_one(
    tiny_model_path: Path, seed: int, attention: bool, min_len: int, tmp_path: Path
) -> None:
    """From the same features, varied enough that the captions differ between pictures."""
    model_path = tmp_path / "tiny.safetensors"
    make_tiny_model(model_path, seed=seed, attention=attention)
    model = load_model(model_path)
    runtime = RuntimeConfig(device="cpu", precision="fp32", batch_size=8, workers=0)
    # the tutorial has no word rules
    beam = BeamConfig(
        beam_size=1, max_len=model.max_caption_len, min_len=min_len, ending_rule=False, allow_repeated_words=True
    )
    captioner = Captioner(model, runtime, beam)
    ref = ReferenceCaptioner(model, min_len=min_len)
    regions = 4 if attention else 1
    gen = torch.Generator().manual_seed(seed)
    features = 3 * torch.randn(8, regions, model.decoder.feature_dim, generator=gen)  # (B, R, F)
    ours = [c.text for c in captioner.search(features)]
    assert ours == [ref.greedy(features[i : i + 1]) for i in range(len(features))]
    assert len(set(ours)) > 1
    assert all(len(c.split()) >= min_len for c in ours)


@pytest.mark.parametrize("seed,attention,min_len", [(0, True, 1), (2, False, 3)])
def test_reference_matches_batchcap_tiny(tmp_path: Path, seed: int, attention: bool, min_len: int) -> None:
    model_path = tmp_path / "tiny.safetensors"
    make_tiny_model(model_path, seed=seed, attention=attention)
    paths = write_images(tmp_path / "photos", 6, size=(80, 50), seed=seed)
    ours = batchcap_greedy(model_path, paths, min_len)
    assert ours == reference_greedy(model_path, paths, min_len)
    assert all(len(c.split()) >= min_len for c in ours)


def test_reference_reruns_the_prefix(tiny_model_path: Path, tmp_path: Path) -> None:
    """Word t costs t decoder steps: the tutorial's quadratic decoding, on purpose."""
    model = load_model(tiny_model_path)
    ref = ReferenceCaptioner(model, max_len=5, min_len=5)  # exactly 5 words, then stop
    calls = []
    step = ref.decoder.step

    def counting_step(tokens: torch.Tensor, state: tuple[torch.Tensor, ...]) -> object:
        calls.append(int(tokens[0]))
        return step(tokens, state)

    ref.decoder.step = counting_step  # type: ignore[method-assign]
    caption = ref.caption(write_images(tmp_path, 1)[0])
    assert len(caption.split()) == 5
    assert len(calls) == 1 + 2 + 3 + 4 + 5
    assert calls[:3] == [model.vocab.start_id] * 2 + [calls[2]] and calls[3] == model.vocab.start_id


def test_reference_pixels_match_the_decode_stage(tiny_model_path: Path, tmp_path: Path) -> None:
    model = load_model(tiny_model_path)
    path = write_images(tmp_path, 1, size=(90, 70))[0]
    pre = model.preprocess
    ours = decode_file(str(path), pre, ImagePolicy()).tensor.float()  # (3, H, W) uint8 -> float
    mean, std = torch.tensor(pre.mean).view(3, 1, 1), torch.tensor(pre.std).view(3, 1, 1)
    expected = (ours / 255.0 - mean) / std
    assert torch.allclose(reference_pixels(path, pre)[0], expected, atol=1e-5)


def test_reference_matches_batchcap_real_xception(tmp_path: Path) -> None:
    """Real Keras Xception weights, a random decoder of the trained model's size, real photos."""
    from batchcap.tools.bench import XCEPTION_WEIGHTS_FILE, random_decoder_model

    photos = shared_path("data", "flickr8k-sample", "Flicker8k_Dataset")
    weights = REPO / "batchcap" / "assets" / XCEPTION_WEIGHTS_FILE
    if not weights.is_file():
        pytest.skip(f"{weights} not present")
    paths = sorted(photos.glob("*.jpg"))[:4]
    model_path = tmp_path / "standin.safetensors"
    random_decoder_model(model_path, weights, max_caption_len=8)
    ours = batchcap_greedy(model_path, paths)
    assert ours == reference_greedy(model_path, paths)
    assert all(len(c.split()) == 8 for c in ours)  # a random decoder never ends: 8 words compared
    assert len(set(ours)) > 1  # the pictures, not only the decoder's biases, drive the words
