"""The encode stage on OpenVINO: the model's own timm encoder, converted once, cached on disk.

On a CPU, PyTorch runs Xception at well under half of what the cores can do; OpenVINO's
CPU plugin runs the same network at close to the hardware's limit (see README,
Performance). The torch path (:class:`batchcap.encode.torch_backend.Encoder`) stays the reference
and the CUDA path; this module is an execution detail like the device, so a resumed
run may switch between them.

* **Conversion** -- ``ov.convert_model`` straight from the timm module the model file
  describes, with batchcap's ``uint8`` -> normalised input and the ``(B, R, F)`` output
  inside the graph, so one call does what :class:`~batchcap.encode.torch_backend.Encoder` does.
* **Cache** -- the converted graph is kept under :func:`cache_root` in a folder named by
  a hash of everything it depends on (:func:`cache_fields`): the encoder's weights,
  preprocessing, stored precision, batch shape policy and the OpenVINO version. It is
  built in a temporary folder and renamed into place, so concurrent Slurm tasks on one
  node share it safely and a reader never sees half a model. A rerun pays no conversion.
* **Precisions** -- ``fp32`` and ``bf16`` run the same fp32 graph (bf16 is the CPU
  plugin's inference-precision hint); ``int8`` is a post-training-quantised graph
  (:mod:`batchcap.encode.quantize`).
* **Streams** -- OpenVINO's throughput hint: several streams, each encoding a contiguous share of
  every batch, so a core taken by the decode worker or the search stalls one stream, not all
  (:func:`stream_settings`; ``$BATCHCAP_OPENVINO_STREAMS``).
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from batchcap.config import OptionError, Preprocess, RuntimeConfig
from batchcap.encode.graph_cache import backbone_identity, cache_fields, cache_root, cached_graph
from batchcap.encode.quantize import int8_graph
from batchcap.hardware import cpu_has_native_bf16

# OpenVINO reports usage to Google Analytics from a child process, on `import openvino.tools.ovc`
# and on every conversion, and NNCF likewise, unless the user opted out. A batch job over
# someone's archive must not phone home; offline (a cluster node) that child waits on the
# network and prints a traceback into the job's log when the job is interrupted. Both fall
# back to a no-op when `openvino_telemetry` cannot be imported, so make it so for this process
# (every path to OpenVINO in batchcap imports this module first).
sys.modules.setdefault("openvino_telemetry", None)  # type: ignore[arg-type]

PRECISIONS = ("fp32", "bf16", "int8")


class OpenVINOUnavailable(Exception):
    """``openvino`` cannot be imported here (not installed, or not for this platform)."""


def openvino_version() -> str | None:
    """The importable OpenVINO's version (``2026.4.1``), or None when it cannot be imported."""
    try:
        import openvino
    except Exception:  # ImportError, or a broken install that fails while loading its libraries
        return None
    return str(openvino.__version__).split("-")[0]


def import_openvino() -> Any:
    """The ``openvino`` module, or :class:`OpenVINOUnavailable` with how to get it."""
    try:
        import openvino
    except Exception as exc:
        raise OpenVINOUnavailable(
            f"openvino cannot be imported ({exc.__class__.__name__}: {exc}); "
            "pip install openvino (x86-64 and ARM64), or use --backend torch"
        ) from exc
    return openvino


def auto_precision() -> str:
    """What ``--precision auto`` runs on OpenVINO: bf16 on CPUs with native bf16, else fp32.

    Chosen by measurement (docs/performance.md): bf16 is the fastest precision whose dev
    CIDEr-D stays within 0.005 of fp32 with >= 90 % of captions unchanged.
    """

    return "bf16" if cpu_has_native_bf16() else "fp32"


def resolve_precision(precision: str) -> str:
    """``auto`` -> :func:`auto_precision`; fp32, bf16 and int8 as given; fp16 refused (a GPU precision)."""
    if precision == "auto":
        return auto_precision()
    if precision not in PRECISIONS:
        raise ValueError(f"{precision} is not an OpenVINO CPU precision; use auto, fp32, bf16 or int8")
    return precision


# -- conversion --------------------------------------------------------------------------------
class EncoderGraph(nn.Module):
    """What is converted: ``uint8`` (B, 3, H, W) -> normalised -> features.

    The same computation as :class:`~batchcap.encode.torch_backend.Encoder`."""

    def __init__(self, backbone: nn.Module, preprocess: Preprocess, spatial: bool) -> None:
        super().__init__()
        self.backbone: Any = backbone  # a timm network: forward_features is timm's, untyped
        self.spatial = spatial
        self.mean: torch.Tensor
        self.std: torch.Tensor
        self.register_buffer("mean", torch.tensor(preprocess.mean).view(1, 3, 1, 1) * 255.0)
        self.register_buffer("std", torch.tensor(preprocess.std).view(1, 3, 1, 1) * 255.0)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = (images.float() - self.mean) / self.std  # (B, 3, H, W)
        fmap = self.backbone.forward_features(x)  # (B, F, h, w)
        if self.spatial:
            return fmap.flatten(2).transpose(1, 2)  # (B, h*w, F)
        return fmap.mean(dim=(2, 3))  # (B, F)


def convert(backbone: nn.Module, preprocess: Preprocess, spatial: bool) -> Any:
    """``ov.convert_model`` of :class:`EncoderGraph` with a dynamic batch dimension."""
    import openvino as ov

    graph = EncoderGraph(backbone, preprocess, spatial).eval().float()
    example = torch.zeros((1, 3, preprocess.height, preprocess.width), dtype=torch.uint8)
    with torch.no_grad():
        model = ov.convert_model(graph, example_input=example)
    model.reshape({model.inputs[0]: ov.PartialShape([-1, 3, preprocess.height, preprocess.width])})
    return model


def inference_precision(precision: str) -> str:
    """The CPU plugin's precision hint: f32 or bf16; int8 graphs run their unquantised layers in bf16 where native."""

    if precision == "int8":
        return "bf16" if cpu_has_native_bf16() else "f32"
    return {"fp32": "f32", "bf16": "bf16"}[precision]


ENV_STREAMS = "BATCHCAP_OPENVINO_STREAMS"


def stream_settings(environ: os._Environ[str] | dict[str, str] | None = None) -> dict[str, Any]:
    """The CPU plugin's stream settings from ``$BATCHCAP_OPENVINO_STREAMS``: ``auto`` (the default) or a number.

    ``auto`` is OpenVINO's throughput hint: several streams of a few threads each (two of one
    thread on a 2-core machine), each encoding its share of a batch. ``1`` is one stream on every
    core, whose threads wait for each other at every layer: whenever the decode worker, the search
    or the writer takes a core, the whole encoder stalls: beside a process decoding on one core it
    ran at under half its rate alone, and two streams at 1.34x one (docs/performance.md).
    """
    value = (os.environ if environ is None else environ).get(ENV_STREAMS, "auto").strip().lower()
    if value == "auto":
        return {"PERFORMANCE_HINT": "THROUGHPUT"}
    if not value.isdigit() or int(value) < 1:
        raise OptionError(f"${ENV_STREAMS}", f"{value!r}: use auto or a number of streams (1 or more)")
    if int(value) == 1:
        return {"PERFORMANCE_HINT": "LATENCY"}
    return {"PERFORMANCE_HINT": "THROUGHPUT", "NUM_STREAMS": int(value)}


def compile_graph(xml: Path, precision: str, streams: dict[str, Any] | None = None) -> Any:
    """The graph compiled for the CPU, with :func:`stream_settings` (default: from the environment)."""
    import openvino as ov

    core = ov.Core()
    return core.compile_model(
        core.read_model(str(xml)),
        "CPU",
        {"INFERENCE_PRECISION_HINT": inference_precision(precision), **(streams or stream_settings())},
    )


def _stderr(message: str) -> None:
    import sys

    print(f"batchcap: {message}", file=sys.stderr, flush=True)


# -- the stage ---------------------------------------------------------------------------------
class OpenVINOEncoder:
    """Drop-in for :class:`~batchcap.encode.torch_backend.Encoder` on the CPU: ``uint8`` batch in, fp32 features out.

    Builds (or finds in the cache) the fp32 graph, and for int8 the quantised one
    (:func:`batchcap.encode.quantize.int8_graph`); ``info`` is the used graph's cache record.
    """

    def __init__(
        self,
        backbone: nn.Module | Callable[[], nn.Module],
        preprocess: Preprocess,
        runtime: RuntimeConfig,
        spatial: bool = True,
        log: Callable[[str], None] | None = None,
        identity: tuple[str, str] | None = None,
    ) -> None:
        """``backbone`` may be a function that builds it: with ``identity`` (architecture, weights digest)
        given, the network is built only when its graph is not cached yet, so a run from the cache
        never imports timm or builds Xception (seconds of start-up)."""
        ov = import_openvino()
        log = log or _stderr
        self.runtime = runtime
        self.spatial = spatial
        precision = runtime.precision
        if precision not in PRECISIONS:
            raise ValueError(f"OpenVINO encoder: unsupported precision {precision!r}")
        version = str(ov.__version__).split("-")[0]
        root = cache_root(runtime.encoder_cache)

        def network() -> nn.Module:
            return backbone if isinstance(backbone, nn.Module) else backbone()

        if identity is None:
            identity = backbone_identity(network())
        fp32_fields = cache_fields(identity, preprocess, spatial, "fp32", version)
        fp32_xml, fp32_info = cached_graph(root, fp32_fields, lambda: convert(network(), preprocess, spatial), log)
        self.xml, self.info = fp32_xml, fp32_info
        if precision == "int8":
            self.xml, self.info = int8_graph(root, fp32_xml, fp32_fields, preprocess, log)
        started = time.perf_counter()
        self.compiled = compile_graph(self.xml, precision)
        self.compile_seconds = time.perf_counter() - started
        streams = max(1, int(self.compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS")))
        self._requests = [self.compiled.create_infer_request() for _ in range(streams)]

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """Features of one batch: split into one contiguous share per stream, encoded at once, in order."""
        x = images.cpu().numpy()
        if x.dtype != np.uint8:
            raise TypeError(f"the OpenVINO encoder takes uint8 images, not {x.dtype}")
        shares = [np.ascontiguousarray(s) for s in np.array_split(x, min(len(self._requests), max(1, len(x))))]
        if len(shares) == 1:
            out = self._requests[0].infer({0: shares[0]}, share_inputs=True, share_outputs=False)
            return torch.from_numpy(np.asarray(out[0], dtype=np.float32))  # (B, R, F) or (B, F)
        for request, share in zip(self._requests, shares, strict=False):
            request.start_async({0: share}, share_inputs=True)  # `shares` keeps the inputs alive until wait()
        features = []
        for request, _ in zip(self._requests, shares, strict=False):
            request.wait()
            features.append(np.array(request.get_output_tensor(0).data, dtype=np.float32))  # a copy
        return torch.from_numpy(np.concatenate(features))
