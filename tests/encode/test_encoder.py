"""The encoder stage: weights resolution, refusals, and real Xception features (when ../shared is there)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_tiny_model, shared_path
from PIL import Image
from safetensors.torch import save_file

from batchcap.config import EncoderConfig, Preprocess, RuntimeConfig
from batchcap.data.preprocess import to_input_tensor
from batchcap.encode.torch_backend import Encoder, build_backbone
from batchcap.encode.weights import EncoderError, WeightsSource, load_state_dict_file, resolve_encoder_weights
from batchcap.fileio import file_sha256
from batchcap.hardware import HardwareError, resolve_device, resolve_precision
from batchcap.model.modelfile import ASSETS_DIR, ModelFileError, load_model

#: The ImageNet Xception weights the package ships (fp16), read as the default model reads them.
PACKAGED_XCEPTION = "legacy_xception-keras-imagenet-fp16.safetensors"
XCEPTION = Preprocess(input_size=(3, 299, 299), resize="squash", interpolation="bicubic")


def test_precision_and_device_resolution() -> None:
    cpu = torch.device("cpu")
    assert resolve_precision("fp32", cpu) == "fp32"
    assert resolve_precision("auto", cpu) in ("bf16", "fp32")
    with pytest.raises(HardwareError, match="fp16 is not supported on CPU"):
        resolve_precision("fp16", cpu)
    assert resolve_device("cpu") == cpu
    if not torch.cuda.is_available():
        with pytest.raises(HardwareError, match="CUDA is not available"):
            resolve_device("cuda:0")
    with pytest.raises(HardwareError):
        resolve_device("tpu")


def test_bf16_needs_compute_capability_8_on_the_named_gpu() -> None:
    asked = []

    def capability(device: torch.device) -> tuple[int, int]:
        asked.append(device)
        return {0: (7, 0), 1: (8, 6)}[device.index]  # a V100 beside an A40

    assert resolve_precision("auto", torch.device("cuda:0"), capability) == "fp16"
    assert resolve_precision("auto", torch.device("cuda:1"), capability) == "bf16"
    assert asked == [torch.device("cuda:0"), torch.device("cuda:1")]
    assert resolve_precision("fp32", torch.device("cuda:0"), capability) == "fp32"


def test_weights_are_never_silently_random(tmp_path: Path) -> None:
    model = make_tiny_model(tmp_path / "m.safetensors")
    # Without the embedded encoder, and with a recorded hash but no file, the encoder is refused.
    model.encoder_state = None
    model.encoder = dataclasses.replace(model.encoder, weights_sha256="ab" * 32, weights_file="gone.safetensors")
    with pytest.raises(EncoderError, match="were not found"):
        resolve_encoder_weights(model, None, environ={})
    other = tmp_path / "other.safetensors"
    save_file({"x": torch.zeros(1)}, other)
    with pytest.raises(ModelFileError, match="not the ones this model was trained with"):
        resolve_encoder_weights(model, str(other), environ={})
    with pytest.raises(ModelFileError, match="not the ones"):
        resolve_encoder_weights(model, None, environ={"BATCHCAP_ENCODER_WEIGHTS": str(other)})


def test_referenced_weights_are_found_beside_the_model(tmp_path: Path) -> None:
    import timm

    weights = tmp_path / "enc.safetensors"
    save_file(timm.create_model("test_efficientnet", num_classes=0).state_dict(), weights)
    model = make_tiny_model(tmp_path / "m.safetensors")
    model.encoder_state = None
    model.encoder = dataclasses.replace(
        model.encoder, weights_sha256=file_sha256(weights), weights_file="enc.safetensors"
    )
    model.path = str(tmp_path / "m.safetensors")
    source = resolve_encoder_weights(model, None, environ={})
    assert source.kind == "file" and source.path == str(weights)


def test_torch_state_dicts_load_weights_only(tmp_path: Path) -> None:
    path = tmp_path / "w.pt"
    torch.save({"state_dict": {"a": torch.ones(2)}}, path)
    assert torch.equal(load_state_dict_file(path)["a"], torch.ones(2))
    with pytest.raises(EncoderError, match="no such file"):
        load_state_dict_file(tmp_path / "missing.pt")


def test_wrong_weights_for_the_network_are_refused(tmp_path: Path) -> None:
    bad = tmp_path / "bad.safetensors"
    save_file({"conv.weight": torch.zeros(1)}, bad)
    with pytest.raises(EncoderError, match="do not fit"):
        build_backbone(EncoderConfig(name="test_efficientnet"), WeightsSource("file", path=str(bad)))


def test_tiny_encoder_shapes(tiny_model_path: Path) -> None:
    model = load_model(tiny_model_path)
    backbone = build_backbone(
        EncoderConfig(name="test_efficientnet"), WeightsSource("embedded", state=model.encoder_state)
    )
    enc = Encoder(backbone, model.preprocess, RuntimeConfig(precision="fp32", channels_last=False))
    x = torch.randint(0, 256, (3, 3, 64, 64), dtype=torch.uint8)
    feats = enc(x)
    assert feats.shape == (3, 4, 256) and feats.dtype == torch.float32


@pytest.mark.slow
def test_real_xception_features_and_bf16_agreement() -> None:
    weights = ASSETS_DIR / PACKAGED_XCEPTION
    photos = sorted(shared_path("data", "flickr8k-sample", "Flicker8k_Dataset").glob("*.jpg"))[:4]
    backbone = build_backbone(EncoderConfig(), WeightsSource("file", path=str(weights)))
    images = torch.stack([to_input_tensor(Image.open(p).convert("RGB"), XCEPTION) for p in photos])
    fp32 = Encoder(backbone, XCEPTION, RuntimeConfig(precision="fp32"), spatial=False)(images)
    assert fp32.shape == (4, 2048) and torch.isfinite(fp32).all()
    bf16 = Encoder(backbone, XCEPTION, RuntimeConfig(precision="bf16"), spatial=False)(images)
    cosine = torch.nn.functional.cosine_similarity(fp32, bf16)
    assert cosine.min() >= 0.99, cosine


@pytest.mark.slow
def test_draft_decoding_keeps_features_close(tmp_path: Path) -> None:
    """Large JPEGs decoded at reduced scale give features within cosine 0.99 of a full decode."""
    from batchcap.config import ImagePolicy
    from batchcap.data.image_decode import decode_file

    weights = ASSETS_DIR / PACKAGED_XCEPTION
    photos = sorted(shared_path("data", "flickr8k-sample", "Flicker8k_Dataset").glob("*.jpg"))[:4]
    big = []
    for n, p in enumerate(photos):
        path = tmp_path / f"big{n}.jpg"
        Image.open(p).convert("RGB").resize((2400, 1800), Image.Resampling.BICUBIC).save(path, quality=92)
        big.append(str(path))
    backbone = build_backbone(EncoderConfig(), WeightsSource("file", path=str(weights)))
    encoder = Encoder(backbone, XCEPTION, RuntimeConfig(precision="fp32"), spatial=False)
    full = torch.stack([decode_file(p, XCEPTION, ImagePolicy(draft=False)).tensor for p in big])
    draft = torch.stack([decode_file(p, XCEPTION, ImagePolicy(draft=True)).tensor for p in big])
    cosine = torch.nn.functional.cosine_similarity(encoder(full), encoder(draft))
    assert cosine.min() >= 0.99, cosine
    assert not np.array_equal(full.numpy(), draft.numpy())  # draft really took a different path
