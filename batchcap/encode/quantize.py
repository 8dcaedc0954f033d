"""int8 encoders: NNCF post-training quantisation of the cached fp32 OpenVINO graph.

Calibration happens once, at first use, and the result joins the encoder cache
(:func:`batchcap.encode.graph_cache.cached_graph`), so later runs load it like any other.
It needs ``nncf`` (``pip install 'batchcap[int8]'``) and training photos, named by
``$BATCHCAP_CALIBRATION_IMAGES``: a caption dataset ``batchcap train`` reads (its
``train`` split is used) or a plain folder of pictures.

The calibration set is deterministic: the photos sorted by path, then
:data:`CALIBRATION_PHOTOS` of them evenly spaced (``photos[i * n // count]``), each
decoded with the model's own preprocessing. For Flickr8k that is 144 of the 6,000
training photos. The int8 graph's cache key is the fp32 graph's plus this recipe; the
photos actually used are recorded in its ``info.json``.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from batchcap.config import ImagePolicy, Preprocess
from batchcap.data.captions.factory import load_caption_dataset
from batchcap.data.captions.records import DatasetError
from batchcap.data.extensions import is_image_name
from batchcap.data.image_decode import decode_file
from batchcap.encode.graph_cache import cached_graph

ENV_CALIBRATION = "BATCHCAP_CALIBRATION_IMAGES"
CALIBRATION_PHOTOS = 144
#: What the int8 graph depends on besides the fp32 graph: how it was calibrated.
RECIPE = {
    "calibration": f"{CALIBRATION_PHOTOS} evenly spaced training photos",
    "preset": "performance",
    "fast_bias_correction": True,
}


class CalibrationError(Exception):
    """int8 cannot be calibrated here (no nncf, no calibration photos)."""


def calibration_photos(source: str | os.PathLike[str], count: int = CALIBRATION_PHOTOS) -> list[str]:
    """``count`` evenly spaced photos of ``source``'s training split (a dataset) or of the folder."""

    source = os.fspath(source)
    if not os.path.exists(source):
        raise CalibrationError(f"${ENV_CALIBRATION}={source}: no such file or folder")
    try:
        dataset = load_caption_dataset(source)
        photos = sorted(r.path for r in dataset.splits.get("train", []) if r.path and os.path.isfile(r.path))
    except DatasetError:
        photos = sorted(str(p) for p in Path(source).rglob("*") if p.is_file() and is_image_name(p.name))
    if not photos:
        raise CalibrationError(f"${ENV_CALIBRATION}={source}: no training photos found there")
    count = min(count, len(photos))
    return [photos[i * len(photos) // count] for i in range(count)]


def calibration_arrays(photos: list[str], preprocess: Preprocess) -> list[np.ndarray]:
    """The photos as the encoder sees them: ``uint8`` (1, 3, H, W), the model's preprocessing."""

    arrays = []
    for path in photos:
        decoded = decode_file(path, preprocess, ImagePolicy())
        if decoded.tensor is not None:
            arrays.append(decoded.tensor.numpy()[None])
    if not arrays:
        raise CalibrationError("none of the calibration photos could be decoded")
    return arrays


def quantize_graph(fp32_xml: Path, arrays: list[np.ndarray]) -> Any:
    """NNCF post-training quantisation of the fp32 graph at ``fp32_xml`` on ``arrays``."""
    import openvino as ov

    with contextlib.redirect_stdout(sys.stderr):  # NNCF's progress bars and log: stdout stays for results (--json)
        try:
            import nncf
        except ImportError as exc:
            raise CalibrationError(
                "int8 needs nncf to calibrate the encoder once: pip install 'batchcap[int8]' "
                "(or pip install nncf); or use --precision bf16"
            ) from exc
        model = ov.Core().read_model(str(fp32_xml))
        return nncf.quantize(
            model,
            nncf.Dataset(arrays),
            subset_size=len(arrays),
            preset=nncf.QuantizationPreset.PERFORMANCE,
            fast_bias_correction=True,
        )


def int8_graph(
    root: Path,
    fp32_xml: Path,
    fp32_fields: dict[str, Any],
    preprocess: Preprocess,
    log: Callable[[str], None] | None = None,
    source: str | None = None,
) -> tuple[Path, dict[str, Any]]:
    """The cached int8 graph for the fp32 graph ``fp32_xml``, calibrated now when it is not cached yet."""

    fields = {**fp32_fields, "precision": "int8", **RECIPE}
    recorded: dict[str, Any] = {}

    def build() -> Any:
        where = source or os.environ.get(ENV_CALIBRATION)
        if not where:
            raise CalibrationError(
                f"int8 is calibrated once on training photos: set {ENV_CALIBRATION} to the "
                "training data (a dataset folder or a folder of photos); or use --precision bf16"
            )
        photos = calibration_photos(where)
        if log:
            log(f"calibrating int8 on {len(photos)} photos from {where}; first use only, the result is cached")
        recorded["calibration_photos"] = [os.path.basename(p) for p in photos]
        recorded["calibration_sha256"] = hashlib.sha256("\n".join(photos).encode()).hexdigest()
        return quantize_graph(fp32_xml, calibration_arrays(photos, preprocess))

    return cached_graph(root, fields, build, log, extra_info=recorded, announce=False)
