"""Which encoder runs a model: the torch backend, or OpenVINO on a CPU; the one place that chooses."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from batchcap.config import OptionError, Preprocess, RuntimeConfig
from batchcap.encode.graph_cache import CacheUnusable
from batchcap.encode.openvino_backend import OpenVINOEncoder, OpenVINOUnavailable, openvino_version
from batchcap.encode.quantize import CalibrationError
from batchcap.encode.torch_backend import Encoder
from batchcap.encode.weights import EncoderError


def build_encoder(
    backbone: nn.Module | Callable[[], nn.Module],
    preprocess: Preprocess,
    runtime: RuntimeConfig,
    spatial: bool = True,
    log: Callable[[str], None] | None = None,
    identity: tuple[str, str] | None = None,
) -> Encoder | Any:
    """The encode stage for ``runtime.backend``: :class:`Encoder` (torch), or the OpenVINO one on the CPU.

    ``backbone`` may be a function that builds it; with the weights' ``identity``
    (:func:`stored_identity`) the OpenVINO backend calls it only to convert a graph it has not
    cached. ``log`` hears about a first-use conversion (default: stderr), which takes a minute.
    """
    if runtime.backend == "openvino":
        try:
            return OpenVINOEncoder(backbone, preprocess, runtime, spatial=spatial, log=log, identity=identity)
        except (OpenVINOUnavailable, CacheUnusable, CalibrationError) as exc:
            raise EncoderError(str(exc)) from exc
    network = backbone if isinstance(backbone, nn.Module) else backbone()
    return Encoder(network, preprocess, runtime, spatial=spatial)


BACKENDS = ("auto", "torch", "openvino")


def resolve_backend(backend: str, device_type: str) -> tuple[str, str]:
    """``--backend`` made concrete, with a note saying why: ``auto`` is OpenVINO on CPU when importable, else torch."""

    if backend not in BACKENDS:
        raise OptionError("--backend", f"{backend!r}: use auto, torch or openvino")
    if backend == "torch":
        return "torch", "torch (asked for)"
    if device_type != "cpu":
        if backend == "openvino":
            raise OptionError(
                "--backend",
                f"openvino runs the encoder on the CPU; use --device cpu, or --backend torch on {device_type}",
            )
        return "torch", f"auto: torch on {device_type}"
    version = openvino_version()
    if version is None:
        if backend == "openvino":
            raise OptionError("--backend", "openvino is not installed here (pip install openvino); use --backend torch")
        return "torch", "auto: openvino is not importable here, fell back to torch (pip install openvino)"
    return "openvino", f"{'auto: ' if backend == 'auto' else ''}openvino {version} on CPU"
