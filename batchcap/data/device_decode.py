"""Decode JPEGs on the model's device (nvJPEG through ``torchvision.io.decode_jpeg``), Pillow as fallback.

On a GPU node the decoding workers, not the GPU, are the first limit: one core decodes about
250 photos/s of 500x375. With ``--decode-on-device`` the work splits differently:

* a **worker** still reads each file and its header: the pixel cap, the format, the mode, the
  EXIF orientation, and whether the stream is complete (it must end with the JPEG end-of-image
  marker: a truncated JPEG stays ``corrupt``, as with Pillow). A baseline or progressive RGB or
  greyscale JPEG is then passed on *undecoded* (:attr:`batchcap.data.image_decode.Decoded.encoded`; a batch's
  files travel end to end in one tensor); every other picture is decoded by Pillow in the worker;
* the **main process** decodes a batch's JPEGs in one batched ``decode_jpeg`` call on the device,
  applies the EXIF orientation, resizes with the model's filter (antialiased, as Pillow's) and
  crops, all on the device (:func:`fill_batch`);
* a picture the device cannot decode (a batched call that fails is retried one picture at a
  time) is decoded by Pillow in the main process: when that fails too it becomes a ``corrupt``
  row, like any damaged file. Nothing is skipped.

The device path decodes at full size (no DCT ``draft``) and resizes with torch's antialiased
filter, so its pixels differ slightly from the Pillow path's; features stay within cosine 0.99
(``tests/data/test_device_decode.py``). The same code runs on a CPU device, which is how it is tested
without a GPU; on a CPU it buys nothing.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from batchcap.config import Preprocess
from batchcap.data.preprocess import DEVICE_INTERPOLATIONS, resize_target

#: What torchvision's decoders raise for data they cannot decode.
DEVICE_DECODE_ERRORS = (RuntimeError, ValueError)


def orient(image: torch.Tensor, orientation: int) -> torch.Tensor:
    """Apply EXIF ``orientation`` (1..8) to a ``(C, H, W)`` tensor, as Pillow's transposes do."""
    if orientation == 2:
        return image.flip(-1)  # FLIP_LEFT_RIGHT
    if orientation == 3:
        return image.flip(-1, -2)  # ROTATE_180
    if orientation == 4:
        return image.flip(-2)  # FLIP_TOP_BOTTOM
    if orientation == 5:
        return image.transpose(-1, -2)  # TRANSPOSE
    if orientation == 6:
        return torch.rot90(image, -1, dims=(-2, -1))  # ROTATE_270: a quarter turn clockwise
    if orientation == 7:
        return image.flip(-1, -2).transpose(-1, -2)  # TRANSVERSE
    if orientation == 8:
        return torch.rot90(image, 1, dims=(-2, -1))  # ROTATE_90: a quarter turn anticlockwise
    return image


def resize_on_device(image: torch.Tensor, cfg: Preprocess) -> torch.Tensor:
    """A decoded ``uint8 (3, h, w)`` picture at ``cfg``'s input size: resize (and crop) where it lies."""
    if cfg.interpolation not in DEVICE_INTERPOLATIONS:
        raise ValueError(f"interpolation {cfg.interpolation!r} is not available on the device")
    height, width = image.shape[-2:]
    tw, th = resize_target(width, height, cfg)
    if (width, height) != (tw, th):
        smooth = cfg.interpolation != "nearest"
        resized = F.interpolate(
            image[None].float(),
            size=(th, tw),
            mode=cfg.interpolation,
            antialias=smooth,
            **({"align_corners": False} if smooth else {}),
        )
        image = resized[0].round_().clamp_(0, 255).to(torch.uint8)
    if cfg.resize == "crop":
        left = max(0, round((tw - cfg.width) / 2))
        top = max(0, round((th - cfg.height) / 2))
        image = image[:, top : top + cfg.height, left : left + cfg.width]
    return image.contiguous()


def decode_jpegs(encoded: Sequence[torch.Tensor], device: str | torch.device) -> list[torch.Tensor | Exception]:
    """``uint8 (3, h, w)`` pictures on ``device`` from JPEG bytes, or the error, one entry per input.

    One batched call first (nvJPEG decodes a list in one go); if it fails, each picture again
    alone, so one bad file costs only itself.
    """
    from torchvision.io import ImageReadMode, decode_jpeg

    if not encoded:
        return []
    try:
        return list(decode_jpeg(list(encoded), mode=ImageReadMode.RGB, device=device))
    except DEVICE_DECODE_ERRORS:
        pass
    out: list[torch.Tensor | Exception] = []
    for data in encoded:
        try:
            out.append(decode_jpeg(data, mode=ImageReadMode.RGB, device=device))
        except DEVICE_DECODE_ERRORS as exc:
            out.append(exc)
    return out
