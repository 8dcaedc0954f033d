"""Decode: bytes become an RGB picture and the encoder's uint8 tensor, or a status.

The image policy, applied to every input:

* the pixel count is read from the header and checked against ``ImagePolicy.max_pixels``
  *before* any pixel is decoded, so a decompression bomb costs a header read;
* large JPEGs are DCT-downscaled with ``draft()`` to about twice the resize target
  (see :func:`batchcap.data.preprocess.draft_request`) when ``ImagePolicy.draft`` is true;
* truncated data is an error (``ImageFile.LOAD_TRUNCATED_IMAGES`` is never set);
* the first frame of an animation is used; EXIF orientation is applied;
* every mode becomes RGB: alpha (RGBA, LA, PA, P or L/RGB with a transparency key) is
  composited on ``ImagePolicy.background``; 16-bit and 32-bit greys are scaled, not clipped.

Statuses: ``ok``, ``corrupt`` (damaged or truncated data), ``unreadable`` (permission or
I/O error), ``too_large`` (over the pixel cap), ``unsupported`` (not a picture Pillow
knows), ``missing`` (no such file). Only the exception types that data and I/O raise
are caught; anything else is a bug and propagates.
"""

from __future__ import annotations

import errno
import io
import os
import struct
import warnings
import zlib
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageFile, UnidentifiedImageError

from batchcap.config import ImagePolicy, Preprocess
from batchcap.data.extensions import enable_heif, is_remote
from batchcap.data.preprocess import DEVICE_INTERPOLATIONS, draft_request, to_input_tensor
from batchcap.data.remote import RemoteUnreadable, fetch
from batchcap.messages import one_line

OK, CORRUPT, UNREADABLE, TOO_LARGE, UNSUPPORTED, MISSING, SHARD_ERROR = (
    "ok",
    "corrupt",
    "unreadable",
    "too_large",
    "unsupported",
    "missing",
    "shard_error",
)
#: An input whose id an earlier input of the run already has (see ``batchcap.data.sources.Duplicate``).
DUPLICATE_ID = "duplicate_id"
STATUSES = (OK, CORRUPT, UNREADABLE, TOO_LARGE, UNSUPPORTED, MISSING, SHARD_ERROR, DUPLICATE_ID)

#: What Pillow raises for damaged data: truncation and bad streams (OSError), broken
#: headers (SyntaxError), bad values (ValueError), short reads (EOFError), bad EXIF/TIFF
#: tables (struct.error), and zlib streams decoded in Python (zlib.error).
DATA_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, zlib.error)

_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_EXIF_ORIENTATION = 0x0112
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


@dataclass
class Decoded:
    """The outcome for one input: a tensor when ``status == "ok"``, else a one-line error."""

    status: str
    error: str | None = None
    width: int | None = None  # picture size after EXIF orientation (before draft)
    height: int | None = None
    tensor: torch.Tensor | None = None  # uint8 (3, H, W)
    #: With ``ImagePolicy.decode_on_device``: the JPEG's bytes, checked but not decoded
    #: (:mod:`batchcap.data.device_decode` finishes it), and the EXIF orientation to apply.
    encoded: bytes | None = None
    orientation: int = 1


def _fail(status: str, message: object, size: tuple[int, int] | None = None) -> Decoded:
    w, h = size if size else (None, None)
    return Decoded(status, one_line(message), w, h)


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def max_file_bytes(policy: ImagePolicy) -> int:
    """Largest file read into memory: the pixel cap at 8 bytes a pixel (16-bit RGBA) plus 16 MiB."""
    return policy.max_pixels * 8 + (16 << 20)


def read_file(path: str, policy: ImagePolicy, size: int | None = None) -> bytes | Decoded:
    """The bytes of ``path``, or a ``missing`` / ``unreadable`` / ``unsupported`` / ``too_large`` outcome.

    ``size``: a URL's size from its folder's listing, so that an object too large is refused unread.
    """
    if is_remote(path):
        return _read_url(path, policy, size)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size > max_file_bytes(policy):
                return _fail(
                    TOO_LARGE,
                    f"file of {size} bytes is larger than any picture under the {policy.max_pixels}-pixel cap",
                )
            return f.read()
    except (FileNotFoundError, NotADirectoryError) as exc:
        return _fail(MISSING, _describe(exc))
    except IsADirectoryError as exc:
        return _fail(UNSUPPORTED, _describe(exc))
    except OSError as exc:  # permissions, ELOOP, EIO, ...
        if exc.errno == errno.ELOOP:
            return _fail(UNREADABLE, f"symbolic link loop: {exc}")
        return _fail(UNREADABLE, _describe(exc))


def _too_large(size: int, policy: ImagePolicy) -> Decoded | None:
    if size > max_file_bytes(policy):
        return _fail(
            TOO_LARGE, f"file of {size} bytes is larger than any picture under the {policy.max_pixels}-pixel cap"
        )
    return None


def _read_url(url: str, policy: ImagePolicy, size: int | None) -> bytes | Decoded:
    """The bytes at ``url`` (transient failures retried), or the outcome a local file would get.

    A missing object is ``missing`` at once; a failure that outlasts the retries, or one no
    retry mends (a refusal, a 4xx), is ``unreadable`` with the error. With no ``size`` known
    (a URL named alone or in a list), the size cap is checked once the object is read.
    """
    refused = _too_large(size, policy) if size is not None else None
    if refused is not None:
        return refused
    try:
        data = fetch(url)
    except FileNotFoundError as exc:
        return _fail(MISSING, _describe(exc))
    except RemoteUnreadable as exc:
        return _fail(UNREADABLE, str(exc))
    return _too_large(len(data), policy) or data


def allow_pillow_up_to(policy: ImagePolicy) -> None:
    """Raise Pillow's global bomb threshold to ``policy.max_pixels`` so our cap is the one that binds.

    Pillow refuses pictures over ``2 * Image.MAX_IMAGE_PIXELS`` itself; without this a
    ``--max-pixels`` above that would refuse pictures the user allowed. Only ever loosens.
    """
    if Image.MAX_IMAGE_PIXELS is not None and policy.max_pixels > Image.MAX_IMAGE_PIXELS:
        Image.MAX_IMAGE_PIXELS = policy.max_pixels


def _orientation(img: Image.Image) -> int:
    """EXIF orientation 1..8; 1 when absent or unreadable (broken EXIF is no reason to drop a photo)."""
    try:
        value = img.getexif().get(_EXIF_ORIENTATION, 1)
    except DATA_ERRORS:
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def _grey16_to_rgb(img: Image.Image) -> Image.Image:
    """Scale 16/32-bit integer or float greys to 8 bits (Pillow's convert would clip at 255)."""
    array = np.asarray(img)
    if array.dtype.kind == "f":
        top = 1.0 if float(np.nanmax(array, initial=0.0)) <= 1.0 else 255.0
        grey = np.clip(np.nan_to_num(array) * (255.0 / top), 0, 255).round().astype(np.uint8)
    else:
        wide = array.astype(np.int64)
        if wide.max(initial=0) > 255 or img.mode.startswith("I;16"):
            grey = (np.clip(wide, 0, 65535) // 257).astype(np.uint8)
        else:
            grey = np.clip(wide, 0, 255).astype(np.uint8)
    return Image.fromarray(grey, "L").convert("RGB")


def to_rgb(img: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    """Any loaded Pillow picture as mode RGB, alpha composited on ``background``."""
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    elif img.mode in ("L", "RGB") and "transparency" in img.info:
        img = img.convert("RGBA")
    elif img.mode in ("I", "F") or img.mode.startswith("I;16"):
        return _grey16_to_rgb(img)
    if img.mode in _ALPHA_MODES:
        rgba = img.convert("RGBA")
        canvas = Image.new("RGB", rgba.size, tuple(background))
        canvas.paste(rgba.convert("RGB"), mask=rgba.getchannel("A"))
        return canvas
    return img if img.mode == "RGB" else img.convert("RGB")


def decode_bytes(data: bytes, preprocess: Preprocess, policy: ImagePolicy) -> Decoded:
    """Decode one picture's bytes under ``policy`` into ``preprocess``'s uint8 (3, H, W) tensor."""
    assert not ImageFile.LOAD_TRUNCATED_IMAGES, "truncated pictures must fail, not be padded"
    enable_heif()
    if not data:
        return _fail(CORRUPT, "empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own cap decides
            img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:
        return _fail(TOO_LARGE, _describe(exc))
    except UnidentifiedImageError:
        return _fail(UNSUPPORTED, "not a picture Pillow can identify")
    except DATA_ERRORS as exc:
        return _fail(CORRUPT, _describe(exc))

    width, height = img.size
    refused = _over_cap(width, height, policy)
    if refused is not None:
        return refused
    if policy.decode_on_device and _device_decodable(img, data, preprocess):
        orientation = _orientation(img)
        size = (height, width) if orientation >= 5 else (width, height)
        return Decoded(OK, None, size[0], size[1], encoded=data, orientation=orientation)
    try:
        if policy.draft and img.format == "JPEG":
            # JPEG EXIF sits in the header; other formats may keep it after the pixels, and
            # reading it there would load (and a failed load must not be retried: it pads).
            turned = _orientation(img) >= 5
            rw, rh = draft_request(*((height, width) if turned else (width, height)), preprocess)
            img.draft("RGB", (rh, rw) if turned else (rw, rh))
    except Image.DecompressionBombError as exc:
        return _fail(TOO_LARGE, _describe(exc), (width, height))
    except DATA_ERRORS as exc:
        return _fail(CORRUPT, _describe(exc), (width, height))
    return _finish(img, width, height, preprocess, policy)


def _finish(img: Image.Image, width: int, height: int, preprocess: Preprocess, policy: ImagePolicy) -> Decoded:
    """Load an opened picture whose size passed the cap, make it RGB, apply its EXIF orientation, resize.

    ``width`` x ``height`` is its size as stored (before any ``draft``), what the row reports.
    """
    try:
        img.load()  # Image.open stands on frame 0: the first frame of an animation
        rgb = to_rgb(img, policy.background)
    except Image.DecompressionBombError as exc:
        return _fail(TOO_LARGE, _describe(exc), (width, height))
    except DATA_ERRORS as exc:
        return _fail(CORRUPT, _describe(exc), (width, height))
    orientation = _orientation(img)
    if orientation != 1:
        rgb = rgb.transpose(_TRANSPOSE[orientation])
    size = (height, width) if orientation >= 5 else (width, height)
    return Decoded(OK, None, size[0], size[1], to_input_tensor(rgb, preprocess))


def _over_cap(width: int, height: int, policy: ImagePolicy) -> Decoded | None:
    if width * height > policy.max_pixels:
        return _fail(
            TOO_LARGE,
            f"{width}x{height} = {width * height} pixels exceeds the cap of {policy.max_pixels}",
            (width, height),
        )
    return None


def decode_image(img: Image.Image, preprocess: Preprocess, policy: ImagePolicy) -> Decoded:
    """A Pillow picture already opened by the caller, under :func:`decode_bytes`' rules.

    The pixel cap, the modes (alpha on ``policy.background``, 16-bit greys scaled), the first
    frame and the EXIF orientation apply as to bytes; ``draft`` does not (the caller chose how to
    open it). A lazily opened picture whose data turns out damaged is ``corrupt``.
    """
    width, height = img.size
    refused = _over_cap(width, height, policy)
    if refused is not None:
        return refused
    if width == 0 or height == 0:
        return _fail(CORRUPT, f"empty picture ({width}x{height})", (width, height))
    return _finish(img, width, height, preprocess, policy)


def decode_array(array: np.ndarray, preprocess: Preprocess, policy: ImagePolicy) -> Decoded:
    """A ``uint8`` pixel array: RGB (H, W, 3), grey (H, W) or RGBA (H, W, 4), composited on the background.

    Any other shape or dtype is ``unsupported``, with the shape and dtype in the error; an array
    over the pixel cap is ``too_large``.
    """
    shape = tuple(array.shape)
    expected = "expected uint8 (H, W, 3) RGB, (H, W) grey or (H, W, 4) RGBA"
    if array.dtype != np.uint8 or not (array.ndim == 2 or (array.ndim == 3 and shape[2] in (3, 4))):
        return _fail(UNSUPPORTED, f"array of shape {shape} and dtype {array.dtype}: {expected}")
    height, width = shape[:2]
    refused = _over_cap(width, height, policy)
    if refused is not None:
        return refused
    if width == 0 or height == 0:
        return _fail(UNSUPPORTED, f"array of shape {shape} holds no pixels: {expected}", (width, height))
    img = Image.fromarray(np.ascontiguousarray(array))  # uint8: L, RGB or RGBA by the channel count
    return _finish(img, width, height, preprocess, policy)


def _device_decodable(img: Image.Image, data: bytes, preprocess: Preprocess) -> bool:
    """A JPEG the device decoder can take: RGB or grey, complete (ends with EOI), a filter torch has."""

    return (
        img.format == "JPEG"
        and img.mode in ("RGB", "L")
        and preprocess.interpolation in DEVICE_INTERPOLATIONS
        and data.rstrip(b"\x00\r\n\t ").endswith(b"\xff\xd9")
    )


def decode_file(path: str, preprocess: Preprocess, policy: ImagePolicy) -> Decoded:
    """Read ``path`` and decode it; I/O failures become ``missing`` / ``unreadable`` outcomes."""
    data = read_file(path, policy)
    if isinstance(data, Decoded):
        return data
    return decode_bytes(data, preprocess, policy)


def open_rgb(data: bytes, policy: ImagePolicy = ImagePolicy()) -> Image.Image:
    """A full-resolution RGB picture from bytes, under the same rules minus draft (for tests and tools).

    Raises the data error instead of returning a status.
    """
    enable_heif()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        img = Image.open(io.BytesIO(data))
    if img.width * img.height > policy.max_pixels:
        raise Image.DecompressionBombError(f"{img.width}x{img.height} exceeds {policy.max_pixels} pixels")
    img.load()
    rgb = to_rgb(img, policy.background)
    orientation = _orientation(img)
    return rgb.transpose(_TRANSPOSE[orientation]) if orientation != 1 else rgb
