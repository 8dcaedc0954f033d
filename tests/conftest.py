"""Shared fixtures: tiny random-weight models, generated images, and the optional ../shared data."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from batchcap.config import DecoderConfig, Preprocess
from batchcap.model.decoder import CaptionDecoder
from batchcap.model.modelfile import CaptionModel, EncoderSpec, save_model
from batchcap.model.text import SPECIAL_TOKENS, Vocabulary

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("BATCHCAP_SHARED", REPO.parent / "shared"))
# A test suite started in the background by a non-interactive shell (`pytest &`, nohup) inherits
# SIGINT ignored, and so would every `batchcap` the tests start: the Ctrl-C tests would then test
# nothing. A Python handler here makes the kernel hand the subprocesses SIGINT's default again.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

TINY_WORDS = ("a", "dog", "cat", "man", "runs", "on", "the", "grass", "red", "blue", "ball", "in", "water")


def shared_path(*parts: str) -> Path:
    """A path inside ../shared, or skip the test when it is absent (a user's clone has none)."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} not present (../shared is only on the project's machines)")
    return path


def make_tiny_model(path: Path, seed: int = 0, attention: bool = True, name: str = "tiny") -> CaptionModel:
    """A complete model file with a random ``test_efficientnet`` encoder embedded (64x64 input)."""
    import timm

    torch.manual_seed(seed)
    encoder = timm.create_model("test_efficientnet", num_classes=0).eval()
    vocab = Vocabulary(SPECIAL_TOKENS + TINY_WORDS)
    cfg = DecoderConfig(
        vocab_size=len(vocab),
        feature_dim=encoder.num_features,
        embed_dim=16,
        hidden_dim=32,
        attention=attention,
        attention_dim=16,
        dropout=0.0,
    )
    decoder = CaptionDecoder(cfg)
    with torch.no_grad():  # make <end> likely enough that random captions end
        decoder.out.bias[vocab.end_id] += 1.5
    model = CaptionModel(
        name=name,
        encoder=EncoderSpec(name="test_efficientnet", spatial=True, feature_dim=encoder.num_features),
        preprocess=Preprocess(
            input_size=(3, 64, 64),
            resize="squash",
            interpolation="bilinear",
            mean=(0.485, 0.456, 0.406),
            std=(0.229, 0.224, 0.225),
        ),
        decoder=cfg,
        vocab=vocab,
        max_caption_len=12,
        decoder_state=decoder.state_dict(),
        encoder_state=encoder.state_dict(),
        training={"data": "random weights (test fixture)"},
    )
    return save_model(model, path)


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Path of a tiny random-weight model file (embedded encoder), shared by the session."""
    path = tmp_path_factory.mktemp("models") / "tiny.safetensors"
    make_tiny_model(path)
    return path


def write_images(
    folder: Path, count: int, size: tuple[int, int] = (48, 40), seed: int = 0, fmt: str = "JPEG", prefix: str = "img"
) -> list[Path]:
    """``count`` small random-noise pictures in ``folder`` (created), returned in name order."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    ext = {"JPEG": "jpg", "PNG": "png"}[fmt]
    for i in range(count):
        array = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
        path = folder / f"{prefix}{i:05d}.{ext}"
        Image.fromarray(array).save(path, format=fmt)
        paths.append(path)
    return paths


def write_oriented(path: Path, orientation: int = 6, size: tuple[int, int] = (40, 20)) -> Path:
    """A ``size`` (w, h) picture in the format of ``path``'s suffix (.heic/.heif through pillow-heif's
    writer, anything else through Pillow) with EXIF ``orientation``; 6 means it shows turned to (h, w)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(np.random.default_rng(orientation).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x0112] = orientation
    if path.suffix.lower() in (".heic", ".heif"):
        import pillow_heif  # its writer only: Pillow is taught to read HEIC by batchcap, not by the test

        pillow_heif.from_pillow(img).save(path, exif=exif.tobytes(), quality=90)
    else:
        img.save(path, exif=exif.tobytes())
    return path


@pytest.fixture
def one_torch_thread() -> Iterator[None]:
    """Run a test at one torch thread: on a busy 2-core machine two OpenMP threads can be 100x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    """A folder of 20 small JPEGs."""
    folder = tmp_path / "photos"
    write_images(folder, 20)
    return folder


@pytest.fixture(scope="session", autouse=True)
def encoder_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Converted (OpenVINO) encoders go to a session folder, never the user's cache; subprocesses inherit it."""
    folder = tmp_path_factory.mktemp("encoder-cache")
    os.environ["BATCHCAP_ENCODER_CACHE"] = str(folder)
    os.environ.pop("BATCHCAP_CALIBRATION_IMAGES", None)  # int8 calibrates only where a test asks for it
    return folder


@pytest.fixture(autouse=True)
def _sigchld_as_it_was() -> Iterator[None]:
    """Give every test the SIGCHLD disposition it started with.

    A DataLoader with workers installs PyTorch's SIGCHLD handler in this process for good. Once
    a later test had also loaded OpenVINO here, the next child process to exit (any subprocess
    a test waits for) made that handler crash the whole pytest process with SIGSEGV. A batchcap
    process meets neither combination with stale workers; the test session, which runs them all
    in one process, does.
    """
    import signal

    before = signal.getsignal(signal.SIGCHLD)
    yield
    signal.signal(signal.SIGCHLD, before if before is not None else signal.SIG_DFL)


@contextlib.contextmanager
def tmpfs(where: Path, size: str = "1m", options: str = "") -> Iterator[Path]:
    """A fresh tmpfs mounted at ``where``; skips the test unless root may mount here."""
    if os.geteuid() != 0:
        pytest.skip("needs root: the disk-fault tests mount small tmpfs file systems")
    where.mkdir(parents=True, exist_ok=True)
    opts = f"size={size}" + (f",{options}" if options else "")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(where)], capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


COLOURS = {"red": (220, 30, 30), "green": (30, 180, 40), "blue": (30, 60, 220), "yellow": (230, 220, 30)}


SHAPES = ("circle", "square")


SIDES = ("left", "right")


def _draw(colour: str, shape: str, side: str, rng: np.random.Generator) -> Image.Image:
    img = Image.new("RGB", (64, 64), tuple(int(v) for v in rng.integers(90, 140, 3)))
    draw = ImageDraw.Draw(img)
    cx = (16 if side == "left" else 48) + int(rng.integers(-3, 4))
    cy = 32 + int(rng.integers(-8, 9))
    r = int(rng.integers(9, 13))
    box = (cx - r, cy - r, cx + r, cy + r)
    (draw.ellipse if shape == "circle" else draw.rectangle)(box, fill=COLOURS[colour])
    return img


def write_shapes_dataset(root: Path, n_train: int = 240, n_val: int = 48, seed: int = 0) -> None:
    """A Flickr8k-layout dataset whose captions say colour, shape and side of one shape."""
    rng = np.random.default_rng(seed)
    photos = root / "Flicker8k_Dataset"
    text = root / "Flickr8k_text"
    photos.mkdir(parents=True)
    text.mkdir()
    tokens, splits = [], {"train": [], "dev": []}
    for split, count in (("train", n_train), ("dev", n_val)):
        for i in range(count):
            colour = list(COLOURS)[int(rng.integers(len(COLOURS)))]
            shape = SHAPES[int(rng.integers(2))]
            side = SIDES[int(rng.integers(2))]
            name = f"{split}{i:04d}.jpg"
            _draw(colour, shape, side, rng).save(photos / name, quality=95)
            splits[split].append(name)
            phrasings = [f"a {colour} {shape} on the {side}", f"a {shape} in {colour} on the {side} side"]
            tokens += [f"{name}#{k}\t{p} .\r\n" for k, p in enumerate(phrasings)]
    (text / "Flickr8k.token.txt").write_text("".join(tokens), newline="")
    (text / "Flickr_8k.trainImages.txt").write_text("\n".join(splits["train"]) + "\n")
    (text / "Flickr_8k.devImages.txt").write_text("\n".join(splits["dev"]) + "\n")
    (text / "Flickr_8k.testImages.txt").write_text("")
