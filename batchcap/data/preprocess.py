"""Preprocessing: a decoded RGB picture becomes the encoder's ``uint8`` input tensor.

Resizing happens in the DataLoader workers and yields ``uint8`` (3, H, W) tensors --
a quarter of the bytes of float32 through the worker queues. Normalisation
(``(x / 255 - mean) / std``) happens in :class:`batchcap.encode.torch_backend.Encoder`, on the
device, where it is nearly free.

The settings come from the model file (which always wins) or from timm's
``resolve_model_data_config`` for a bare encoder; see :func:`from_timm`.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from PIL import Image

from batchcap.config import Preprocess

_INTERPOLATION = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}


def from_timm(data_config: dict[str, Any], resize: str = "crop") -> Preprocess:
    """A :class:`Preprocess` from timm's ``resolve_model_data_config`` output."""
    return Preprocess(
        input_size=tuple(int(v) for v in data_config["input_size"]),  # type: ignore[arg-type]
        resize=resize,
        interpolation=str(data_config.get("interpolation", "bicubic")),
        crop_pct=float(data_config.get("crop_pct", 1.0)) if resize == "crop" else 1.0,
        mean=tuple(float(v) for v in data_config["mean"]),  # type: ignore[arg-type]
        std=tuple(float(v) for v in data_config["std"]),  # type: ignore[arg-type]
    )


def resize_target(width: int, height: int, cfg: Preprocess) -> tuple[int, int]:
    """The (width, height) the picture is resized to before any crop."""
    if cfg.resize == "squash":
        return cfg.width, cfg.height
    scale_to = math.floor(min(cfg.height, cfg.width) / cfg.crop_pct)
    if width <= height:
        return scale_to, max(1, round(height * scale_to / width))
    return max(1, round(width * scale_to / height)), scale_to


def draft_request(width: int, height: int, cfg: Preprocess) -> tuple[int, int]:
    """The smallest size a JPEG may be DCT-downscaled to without losing resize quality.

    Pillow's ``draft`` picks the largest 1/2, 1/4, 1/8 scale that still covers the
    requested size; asking for twice the resize target keeps the bicubic filter's
    input at least 2x oversampled, which keeps features within cosine 0.99 of a full decode.
    """
    tw, th = resize_target(width, height, cfg)
    return 2 * tw, 2 * th


def to_input_tensor(img: Image.Image, cfg: Preprocess) -> torch.Tensor:
    """Resize (and crop) an RGB picture to ``cfg``'s input size: ``uint8`` (3, H, W)."""
    if img.mode != "RGB":
        raise ValueError(f"expected an RGB picture, got mode {img.mode}")
    resample = _INTERPOLATION[cfg.interpolation]
    tw, th = resize_target(img.width, img.height, cfg)
    if (img.width, img.height) != (tw, th):
        img = img.resize((tw, th), resample=resample, reducing_gap=None)
    if cfg.resize == "crop":
        left = max(0, round((tw - cfg.width) / 2))
        top = max(0, round((th - cfg.height) / 2))
        img = img.crop((left, top, left + cfg.width, top + cfg.height))
    array = np.asarray(img, dtype=np.uint8)  # (H, W, 3)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()  # (3, H, W)


#: Filters torch resizes with as Pillow does (antialiased when shrinking); others stay on Pillow.
DEVICE_INTERPOLATIONS = ("bicubic", "bilinear", "nearest")
