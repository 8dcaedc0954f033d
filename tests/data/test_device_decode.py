"""Decoding JPEGs on the model's device: orientation and resize against Pillow's, the hand-over
rules, the per-picture fallback, features against the Pillow path, and the option's refusal.

The device code runs on a CPU device here (torchvision's CPU ``decode_jpeg``); the tests marked
``cuda`` run the same on a GPU where there is one.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import shared_path
from PIL import Image

from batchcap.cli import cli
from batchcap.config import ImagePolicy, Preprocess
from batchcap.data.device_decode import orient, resize_on_device
from batchcap.data.image_decode import decode_bytes
from batchcap.data.loader import fill_batch, iter_batches
from batchcap.data.preprocess import to_input_tensor
from batchcap.data.sources import open_sources

PRE = Preprocess(input_size=(3, 64, 64), resize="squash", interpolation="bicubic", mean=(0.5,) * 3, std=(0.5,) * 3)
ON_DEVICE = ImagePolicy(decode_on_device=True)
_PIL_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def _photo(width: int = 120, height: int = 80, seed: int = 0) -> np.ndarray:
    """A smooth picture (gradients and a disc): JPEG round trips keep it close."""
    y, x = np.mgrid[0:height, 0:width]
    rng = np.random.default_rng(seed)
    a, b = rng.uniform(0.5, 2.0, 2)
    disc = ((x - width * 0.6) ** 2 + (y - height * 0.4) ** 2) < (min(width, height) * 0.25) ** 2
    rgb = np.stack([x * 255 / width * a, y * 255 / height * b, 128 + 100 * disc], -1)
    return np.clip(rgb, 0, 255).astype(np.uint8)


def _jpeg(array: np.ndarray, orientation: int = 1, mode: str = "RGB", **save) -> bytes:
    img = Image.fromarray(array).convert(mode)
    out = io.BytesIO()
    if orientation != 1:
        exif = Image.Exif()
        exif[0x0112] = orientation
        save["exif"] = exif.tobytes()
    img.save(out, format="JPEG", quality=95, **save)
    return out.getvalue()


@pytest.mark.parametrize("orientation", range(1, 9))
def test_orientation_matches_pillow(orientation: int) -> None:
    array = np.arange(5 * 7 * 3, dtype=np.uint8).reshape(5, 7, 3)
    img = Image.fromarray(array)
    want = np.asarray(img.transpose(_PIL_TRANSPOSE[orientation]) if orientation != 1 else img)
    got = orient(torch.from_numpy(array).permute(2, 0, 1), orientation).permute(1, 2, 0).numpy()
    assert np.array_equal(got, want)


@pytest.mark.parametrize(
    "resize,interpolation", [("squash", "bicubic"), ("crop", "bicubic"), ("squash", "bilinear"), ("crop", "nearest")]
)
def test_resize_matches_pillow(resize: str, interpolation: str) -> None:
    cfg = Preprocess(
        input_size=(3, 64, 64), resize=resize, interpolation=interpolation, crop_pct=0.875 if resize == "crop" else 1.0
    )
    array = _photo(300, 200)
    want = to_input_tensor(Image.fromarray(array), cfg).float()
    got = resize_on_device(torch.from_numpy(array).permute(2, 0, 1).contiguous(), cfg).float()
    assert got.shape == want.shape == (3, 64, 64)
    assert (got - want).abs().mean() < (1.5 if interpolation != "nearest" else 4.0)


def test_which_pictures_are_handed_to_the_device() -> None:
    photo = _photo()
    rgb = decode_bytes(_jpeg(photo), PRE, ON_DEVICE)
    assert rgb.status == "ok" and rgb.tensor is None and rgb.encoded is not None
    assert (rgb.width, rgb.height) == (120, 80)
    turned = decode_bytes(_jpeg(photo, orientation=6), PRE, ON_DEVICE)
    assert turned.encoded is not None and turned.orientation == 6 and (turned.width, turned.height) == (80, 120)
    grey = decode_bytes(_jpeg(photo, mode="L"), PRE, ON_DEVICE)
    assert grey.encoded is not None
    for data in (_jpeg(photo, mode="CMYK"), _png(photo)):  # Pillow decodes these in the worker
        outcome = decode_bytes(data, PRE, ON_DEVICE)
        assert outcome.status == "ok" and outcome.tensor is not None and outcome.encoded is None
    truncated = decode_bytes(_jpeg(photo)[:-400], PRE, ON_DEVICE)  # no end marker: Pillow's verdict
    assert truncated.status == "corrupt" and truncated.encoded is None
    off = decode_bytes(_jpeg(photo), PRE, ImagePolicy())
    assert off.encoded is None and off.tensor is not None
    lanczos = Preprocess(input_size=(3, 64, 64), resize="squash", interpolation="lanczos")
    assert decode_bytes(_jpeg(photo), lanczos, ON_DEVICE).encoded is None  # no such filter in torch


def _png(array: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(array).save(out, format="PNG")
    return out.getvalue()


def _damaged_inside(data: bytes) -> bytes:
    """A JPEG whose scan is garbage but which still ends with the end-of-image marker."""
    start = data.index(b"\xff\xda")  # start of scan
    middle = bytearray(data)
    middle[start + 20 : len(data) - 2] = b"\xff\x01" * ((len(data) - 2 - start - 20) // 2) + b"\x00" * (
        (len(data) - 2 - start - 20) % 2
    )
    return bytes(middle)


def _folder(tmp_path: Path) -> Path:
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "a-plain.jpg").write_bytes(_jpeg(_photo(seed=1)))
    (folder / "b-turned.jpg").write_bytes(_jpeg(_photo(seed=2), orientation=8))
    (folder / "c-grey.jpg").write_bytes(_jpeg(_photo(seed=3), mode="L"))
    (folder / "d-picture.png").write_bytes(_png(_photo(seed=4)))
    (folder / "e-progressive.jpg").write_bytes(_jpeg(_photo(seed=5), progressive=True))
    (folder / "f-damaged.jpg").write_bytes(_damaged_inside(_jpeg(_photo(seed=6))))
    (folder / "g-truncated.jpg").write_bytes(_jpeg(_photo(seed=7))[:-300])
    (folder / "h-bad-scan-header.jpg").write_bytes(_bad_scan_header(_jpeg(_photo(seed=8))))
    return folder


def _bad_scan_header(data: bytes) -> bytes:
    """A complete-looking JPEG whose start-of-scan header claims 5 components: no decoder takes it."""
    broken = bytearray(data)
    broken[broken.index(b"\xff\xda") + 4] = 5
    return bytes(broken)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_fill_batch_decodes_like_pillow_and_keeps_every_row(tmp_path: Path, device: str) -> None:
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    folder = _folder(tmp_path)
    sources = open_sources([str(folder)])
    pillow = {
        i.item.id: t
        for b in iter_batches(sources, PRE, ImagePolicy(), batch_size=16, workers=0)
        for i, t in zip(b.ok, b.images)
    }
    # one worker process: the undecoded files cross a process boundary, as in a run
    [batch] = list(iter_batches(open_sources([str(folder)]), PRE, ON_DEVICE, batch_size=16, workers=1))
    assert len(batch.encoded_rows) == 6  # plain, turned, grey, progressive, damaged, bad header: handed over
    assert batch.encoded_data is not None and batch.encoded_ends[-1] == batch.encoded_data.numel()  # one tensor
    assert bytes(batch.encoded()[1].numpy()) == (folder / "b-turned.jpg").read_bytes()
    fill_batch(batch, PRE, ON_DEVICE, device)
    assert not batch.encoded_rows and batch.images.device.type == device
    statuses = {i.item.id: i.status for i in batch.ok + batch.failed}
    assert len(statuses) == 8  # one row per input, nothing skipped
    assert statuses["g-truncated.jpg"] == "corrupt"  # no end marker: never handed over
    # the bad header fails the batched call, then alone on the device, then in Pillow: a corrupt row
    assert statuses["h-bad-scan-header.jpg"] == "corrupt"
    # a damaged scan both decoders accept with a warning: the same verdict as without the option
    pillow_damaged = decode_bytes((folder / "f-damaged.jpg").read_bytes(), PRE, ImagePolicy())
    assert statuses["f-damaged.jpg"] == pillow_damaged.status
    assert len(batch.ok) == batch.images.shape[0]
    for item, image in zip(batch.ok, batch.images.cpu()):
        if item.item.id in pillow and item.item.id != "f-damaged.jpg":
            diff = (image.float() - pillow[item.item.id].float()).abs().mean()
            assert diff < 3.0, (item.item.id, float(diff))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_features_match_the_pillow_path(device: str) -> None:
    """Packaged Xception features of Flickr8k sample photos: device decode vs Pillow, cosine >= 0.99."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    folder = shared_path("data", "flickr8k-sample")
    from batchcap.config import BeamConfig, RuntimeConfig
    from batchcap.model.modelfile import DEFAULT_MODEL, load_model
    from batchcap.pipeline.captioner import Captioner

    model = load_model(DEFAULT_MODEL)
    runtime = RuntimeConfig(
        device=device, precision="fp32" if device == "cpu" else "bf16", batch_size=8, workers=0, channels_last=True
    )
    captioner = Captioner(model, runtime, BeamConfig(beam_size=1))
    paths = sorted(p for p in folder.rglob("*.jpg"))[:8]
    sources = open_sources([str(p) for p in paths])
    [plain] = list(iter_batches(sources, model.preprocess, ImagePolicy(), batch_size=8, workers=0))
    [handed] = list(
        iter_batches(open_sources([str(p) for p in paths]), model.preprocess, ON_DEVICE, batch_size=8, workers=0)
    )
    assert len(handed.encoded_rows) == 8
    fill_batch(handed, model.preprocess, ON_DEVICE, device)
    with torch.inference_mode():
        a = captioner.encode(plain.images).flatten(1)
        b = captioner.encode(handed.images).flatten(1)
    cosine = torch.nn.functional.cosine_similarity(a, b, dim=1)
    print("cosine device vs Pillow:", [round(c, 5) for c in cosine.tolist()])
    assert float(cosine.min()) >= 0.99, cosine.tolist()


def test_option_is_refused_without_cuda(tmp_path: Path, image_folder: Path, tiny_model_path: Path) -> None:
    result = CliRunner().invoke(
        cli,
        [
            "run",
            str(image_folder),
            "--out",
            str(tmp_path / "c.jsonl"),
            "--model",
            str(tiny_model_path),
            "--device",
            "cpu",
            "--decode-on-device",
        ],
    )
    assert result.exit_code == 2, result.output
    assert "--decode-on-device" in result.output and "--device cuda" in result.output


@pytest.mark.cuda
def test_run_decodes_on_the_gpu(tmp_path: Path, tiny_model_path: Path) -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    folder = _folder(tmp_path)
    out = tmp_path / "c.jsonl"
    result = CliRunner().invoke(
        cli,
        [
            "run",
            str(folder),
            "--out",
            str(out),
            "--model",
            str(tiny_model_path),
            "--device",
            "cuda",
            "--decode-on-device",
            "--workers",
            "1",
        ],
    )
    rows = {r["id"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert len(rows) == 8 and rows["g-truncated.jpg"]["status"] == "corrupt", result.output
    assert rows["h-bad-scan-header.jpg"]["status"] == "corrupt"
    assert all(rows[k]["status"] == "ok" for k in ("a-plain.jpg", "b-turned.jpg", "c-grey.jpg", "d-picture.png"))
