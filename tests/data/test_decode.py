"""The image policy on a corpus of awkward inputs generated in tmp_path."""

from __future__ import annotations

import io
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import shared_path, write_oriented
from PIL import Image, ImageFile

from batchcap.config import ImagePolicy, Preprocess
from batchcap.data.image_decode import decode_bytes, decode_file, to_rgb
from batchcap.data.loader import iter_batches
from batchcap.data.sources import open_sources

PRE = Preprocess(input_size=(3, 32, 32), resize="squash", interpolation="bilinear")
POLICY = ImagePolicy()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def bomb_png(width: int = 50000, height: int = 50000) -> bytes:
    """A ~70-byte PNG whose header claims ``width`` x ``height`` RGB pixels."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", zlib.compress(b"\0" * 16))
        + _png_chunk(b"IEND", b"")
    )


def bad_idat_png() -> bytes:
    """A PNG with a valid header and a garbage zlib stream (chunk CRCs intact)."""
    ihdr = struct.pack(">IIBBBBB", 16, 16, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", b"\x78\x9c" + b"\xff" * 100)
        + _png_chunk(b"IEND", b"")
    )


def encode(img: Image.Image, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def noise(size: tuple[int, int], seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def exif_rotated_jpeg(orientation: int = 6) -> bytes:
    img = Image.new("RGB", (40, 20), (200, 30, 30))
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(img, "JPEG", exif=exif.tobytes())


def animated_gif() -> bytes:
    frames = [Image.new("RGB", (32, 32), c) for c in ((255, 0, 0), (0, 0, 255), (0, 255, 0))]
    return encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)


def build_corpus(root: Path) -> dict[str, str]:
    """Write the awkward corpus under ``root``; returns id -> expected status (None: ignored)."""
    root.mkdir(parents=True, exist_ok=True)
    expected: dict[str, str] = {}

    def put(name: str, data: bytes, status: str) -> None:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        expected[name] = status

    good_jpeg = encode(noise((64, 48)), "JPEG", quality=90)
    put("truncated.jpg", good_jpeg[: len(good_jpeg) // 2], "corrupt")
    put("empty.jpg", b"", "corrupt")
    put("text.jpg", b"this is not a picture\n", "unsupported")
    rgba = Image.new("RGBA", (32, 32), (255, 0, 0, 255))
    rgba.paste((0, 0, 255, 0), (0, 0, 16, 32))
    put("alpha.png", encode(rgba, "PNG"), "ok")
    pal = Image.new("P", (32, 32), 1)
    pal.putpalette([0, 0, 0, 0, 200, 0] + [0] * 762)
    pal.paste(0, (0, 0, 16, 32))
    put("palette_transparent.png", encode(pal, "PNG", transparency=0), "ok")
    put("cmyk.jpg", encode(Image.new("CMYK", (32, 32), (0, 255, 255, 0)), "JPEG", quality=95), "ok")
    grey16 = Image.fromarray(np.full((32, 32), 65535, dtype=np.uint16))
    put("grey16.png", encode(grey16, "PNG"), "ok")
    put("exif6.jpg", exif_rotated_jpeg(6), "ok")
    put("animated.gif", animated_gif(), "ok")
    put("bomb.png", bomb_png(), "too_large")
    put("tiny_1x1.png", encode(Image.new("RGB", (1, 1), (9, 9, 9)), "PNG"), "ok")
    put("wide_10000x10.png", encode(Image.new("RGB", (10000, 10), (0, 128, 0)), "PNG"), "ok")
    put("unicodé 日本/café ☕.jpg", good_jpeg, "ok")
    put("la.png", encode(Image.new("LA", (8, 8), (0, 0)), "PNG"), "ok")
    put("bilevel.bmp", encode(Image.new("1", (8, 8), 1), "BMP"), "ok")
    put("sub/UPPER.JPEG", good_jpeg, "ok")
    put("photo.webp", encode(noise((16, 16)), "WEBP"), "ok")
    put("scan.TIFF", encode(noise((16, 16)), "TIFF"), "ok")
    put("bad_idat.png", bad_idat_png(), "corrupt")
    # ignored names
    (root / ".hidden.jpg").write_bytes(good_jpeg)
    (root / ".cache").mkdir()
    (root / ".cache" / "x.jpg").write_bytes(good_jpeg)
    (root / "notes.txt").write_text("not an image")
    # symlinks: a loop back to the root, a self-loop, and a dangling link
    os.symlink(".", root / "sub" / "loop")
    os.symlink("self.jpg", root / "self.jpg")
    expected["self.jpg"] = "unreadable"
    os.symlink("nowhere.jpg", root / "dangling.jpg")
    expected["dangling.jpg"] = "missing"
    return expected


IGNORED_IN_CORPUS = 3  # .hidden.jpg, .cache/, notes.txt


def decode_path(path: Path, policy: ImagePolicy = POLICY, pre: Preprocess = PRE):
    return decode_file(str(path), pre, policy)


@pytest.fixture
def corpus(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    root = tmp_path / "corpus"
    return root, build_corpus(root)


def test_every_awkward_input_gets_its_status(corpus: tuple[Path, dict[str, str]]) -> None:
    root, expected = corpus
    got = {name: decode_path(root / name) for name in expected}
    wrong = {n: (d.status, d.error) for n, d in got.items() if d.status != expected[n]}
    assert not wrong
    for d in got.values():
        if d.status == "ok":
            assert d.tensor is not None and d.tensor.dtype == torch.uint8 and d.tensor.shape == (3, 32, 32)
            assert d.error is None
        else:
            assert d.tensor is None and d.error and "\n" not in d.error


def test_pixels_after_mode_conversion(corpus: tuple[Path, dict[str, str]]) -> None:
    root, _ = corpus
    alpha = decode_path(root / "alpha.png").tensor
    assert alpha[:, :, :15].flatten(1).unique(dim=1).tolist() == [[255], [255], [255]]  # transparent -> white
    assert alpha[:, :, 17:].flatten(1).unique(dim=1).tolist() == [[255], [0], [0]]
    pal = decode_path(root / "palette_transparent.png").tensor
    assert pal[:, 5, 3].tolist() == [255, 255, 255] and pal[:, 5, 28].tolist() == [0, 200, 0]
    cmyk = decode_path(root / "cmyk.jpg").tensor.float().mean((1, 2))
    assert cmyk[0] > 200 and cmyk[1] < 60 and cmyk[2] < 60  # C=0, M=Y=full: red
    grey = decode_path(root / "grey16.png").tensor
    assert grey.min() == 255  # 16-bit full scale is white, not clipped garbage
    gif = decode_path(root / "animated.gif").tensor
    assert gif[:, 16, 16].tolist() == [255, 0, 0]  # first frame
    la = decode_path(root / "la.png").tensor
    assert la.min() == 255  # fully transparent black on white
    assert decode_path(root / "tiny_1x1.png").tensor.flatten(1).unique(dim=1).tolist() == [[9], [9], [9]]


def test_background_colour_is_configurable(corpus: tuple[Path, dict[str, str]]) -> None:
    root, _ = corpus
    d = decode_path(root / "alpha.png", ImagePolicy(background=(0, 10, 20)))
    assert d.tensor[:, 4, 4].tolist() == [0, 10, 20]


def test_exif_orientation_rotates_the_picture() -> None:
    d = decode_bytes(exif_rotated_jpeg(6), PRE, POLICY)
    assert (d.status, d.width, d.height) == ("ok", 20, 40)
    d = decode_bytes(exif_rotated_jpeg(1), PRE, POLICY)
    assert (d.width, d.height) == (40, 20)


def test_sizes_are_reported(corpus: tuple[Path, dict[str, str]]) -> None:
    root, _ = corpus
    d = decode_path(root / "wide_10000x10.png")
    assert (d.width, d.height) == (10000, 10)
    assert d.tensor[:, 5, 5].tolist() == [0, 128, 0]


def test_pixel_cap_refuses_from_the_header_without_decoding() -> None:
    d = decode_bytes(bomb_png(), PRE, POLICY)
    assert d.status == "too_large" and "exceeds" in d.error
    small_cap = ImagePolicy(max_pixels=1000)
    d = decode_bytes(encode(noise((40, 30)), "PNG"), PRE, small_cap)  # 1200 pixels
    assert (d.status, d.width, d.height) == ("too_large", 40, 30)
    # a cap above Pillow's own bomb threshold is honoured (Pillow would refuse 2x its limit)
    big = ImagePolicy(max_pixels=10**10)
    d = decode_bytes(bomb_png(3000, 3000), PRE, big)  # a header read passes; pixels are garbage
    assert d.status == "corrupt"


def test_truncated_files_are_never_padded() -> None:
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    data = encode(noise((64, 64)), "JPEG")
    for cut in (len(data) - 2, len(data) // 2, 200):
        d = decode_bytes(data[:cut], PRE, POLICY)
        assert d.status in ("corrupt", "unsupported"), cut
    assert decode_bytes(data[:20], PRE, POLICY).status in ("corrupt", "unsupported")


def test_unreadable_permissions(tmp_path: Path) -> None:
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        pytest.skip("root reads files regardless of permissions")
    path = tmp_path / "secret.jpg"
    path.write_bytes(encode(noise((8, 8)), "JPEG"))
    path.chmod(0)
    try:
        assert decode_path(path).status == "unreadable"
    finally:
        path.chmod(0o644)


def test_missing_and_directory(tmp_path: Path) -> None:
    assert decode_path(tmp_path / "gone.jpg").status == "missing"
    (tmp_path / "dir.jpg").mkdir()
    assert decode_path(tmp_path / "dir.jpg").status == "unsupported"


def test_code_errors_are_not_rows() -> None:
    with pytest.raises(AttributeError):
        decode_bytes(encode(noise((8, 8)), "PNG"), PRE, "not a policy")  # type: ignore[arg-type]


def test_to_rgb_handles_every_mode() -> None:
    modes = ["1", "L", "P", "RGB", "RGBA", "CMYK", "YCbCr", "LA", "PA", "I", "F", "I;16", "LAB", "HSV", "RGBX"]
    for mode in modes:
        out = to_rgb(Image.new(mode, (4, 4)), (255, 255, 255))
        assert out.mode == "RGB" and out.size == (4, 4), mode


def test_whole_corpus_through_the_loader(corpus: tuple[Path, dict[str, str]]) -> None:
    root, expected = corpus
    sources = open_sources([str(root)])
    seen: dict[str, str] = {}
    ignored = 0
    for batch in iter_batches(sources, PRE, POLICY, batch_size=4, workers=0):
        assert batch.images.shape == (len(batch.ok), 3, 32, 32)
        for r in batch.ok + batch.failed:
            assert r.item.id not in seen
            seen[r.item.id] = r.status
        ignored += batch.ignored
    assert seen == expected
    assert ignored == IGNORED_IN_CORPUS
    assert sources.count() == len(expected)


def test_real_flickr_photos_decode() -> None:
    folder = shared_path("data", "flickr8k-sample", "Flicker8k_Dataset")
    photos = sorted(folder.glob("*.jpg"))[:24]
    assert photos
    for photo in photos:
        d = decode_path(photo, pre=Preprocess())
        assert d.status == "ok", (photo, d.error)
        assert d.tensor.shape == (3, 299, 299) and d.width >= 100 and d.height >= 100


def test_draft_stays_close_to_full_decode(tmp_path: Path) -> None:
    folder = shared_path("data", "flickr8k-sample", "Flicker8k_Dataset")
    photos = sorted(folder.glob("*.jpg"))[:4]
    pre = Preprocess()  # 299 x 299 squash, bicubic
    for photo in photos:
        big = Image.open(photo).convert("RGB").resize((2000, 1500), Image.Resampling.BICUBIC)
        data = encode(big, "JPEG", quality=92)
        full = decode_bytes(data, pre, ImagePolicy(draft=False)).tensor.float()
        drafted = decode_bytes(data, pre, ImagePolicy(draft=True)).tensor.float()
        mad = (full - drafted).abs().mean().item()
        cos = torch.nn.functional.cosine_similarity(full.flatten() - 127.5, drafted.flatten() - 127.5, dim=0)
        assert mad < 1.5 and cos > 0.999, (photo.name, mad, cos.item())


# -- HEIC/HEIF (iPhones) and AVIF -----------------------------------------------------------


@pytest.mark.parametrize("name", ["IMG_0001.HEIC", "photo.heif", "photo.avif"])
def test_heic_and_avif_are_decoded_turned_by_their_exif_orientation(tmp_path: Path, name: str) -> None:
    """Written 40x20 with EXIF orientation 6 (turned 90 degrees): decoded as 20x40, like a JPEG would be."""
    path = write_oriented(tmp_path / "photos" / name, orientation=6, size=(40, 20))
    outcome = decode_file(str(path), PRE, POLICY)
    assert outcome.status == "ok", outcome.error
    assert (outcome.width, outcome.height) == (20, 40)
    # The same in a DataLoader worker, which registers the HEIC opener for itself.
    [batch] = list(iter_batches(open_sources([str(tmp_path / "photos")]), PRE, POLICY, batch_size=4, workers=1))
    assert [(r.item.id, r.status, r.width, r.height) for r in batch.ok] == [(name, "ok", 20, 40)]
    assert batch.ignored == 0
