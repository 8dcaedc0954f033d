"""The encode stage on OpenVINO: the model's own timm encoder, converted once, cached on disk.

On a CPU, PyTorch runs Xception at well under half of what the cores can do; OpenVINO's
CPU plugin runs the same network at close to the hardware's limit (see README,
Performance). The torch path (:class:`batchcap.encoder.Encoder`) stays the reference
and the CUDA path; this module is an execution detail like the device, so a resumed
run may switch between them.

* **Conversion** -- ``ov.convert_model`` straight from the timm module the model file
  describes, with batchcap's ``uint8`` -> normalised input and the ``(B, R, F)`` output
  inside the graph, so one call does what :class:`~batchcap.encoder.Encoder` does.
* **Cache** -- the converted graph is kept under :func:`cache_root` in a folder named by
  a hash of everything it depends on (:func:`cache_fields`): the encoder's weights,
  preprocessing, stored precision, batch shape policy and the OpenVINO version. It is
  built in a temporary folder and renamed into place, so concurrent Slurm tasks on one
  node share it safely and a reader never sees half a model. A rerun pays no conversion.
* **Precisions** -- ``fp32`` and ``bf16`` run the same fp32 graph (bf16 is the CPU
  plugin's inference-precision hint); ``int8`` is a post-training-quantised graph
  (:mod:`batchcap.quantize`).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from batchcap.config import Preprocess, RuntimeConfig, to_dict

# OpenVINO reports usage to Google Analytics from a child process, on `import openvino.tools.ovc`
# and on every conversion, and NNCF likewise, unless the user opted out. A batch job over
# someone's archive must not phone home; offline (a cluster node) that child waits on the
# network and prints a traceback into the job's log when the job is interrupted. Both fall
# back to a no-op when `openvino_telemetry` cannot be imported, so make it so for this process
# (every path to OpenVINO in batchcap imports this module first).
sys.modules.setdefault("openvino_telemetry", None)  # type: ignore[arg-type]

ENV_CACHE = "BATCHCAP_ENCODER_CACHE"
#: Bump when the converted graph changes meaning (input/output layout, normalisation), so old caches are not used.
GRAPH_FORMAT = 1
#: The batch dimension of the converted graph is dynamic: one graph serves every batch size, last batch included.
BATCH_POLICY = "dynamic-batch"
PRECISIONS = ("fp32", "bf16", "int8")


class OpenVINOUnavailable(Exception):
    """``openvino`` cannot be imported here (not installed, or not for this platform)."""


class CacheUnusable(Exception):
    """The encoder cache folder cannot be created or written."""


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
        raise OpenVINOUnavailable(f"openvino cannot be imported ({exc.__class__.__name__}: {exc}); "
                                  "pip install openvino (x86-64 and ARM64), or use --backend torch") from exc
    return openvino


def auto_precision() -> str:
    """What ``--precision auto`` runs on OpenVINO: bf16 on CPUs with native bf16, else fp32.

    Chosen by measurement (README, Performance): bf16 is the fastest precision whose dev
    CIDEr-D stays within 0.005 of fp32 with >= 90 % of captions unchanged.
    """
    from batchcap.encoder import cpu_has_native_bf16

    return "bf16" if cpu_has_native_bf16() else "fp32"


def resolve_precision(precision: str) -> str:
    """``auto`` -> :func:`auto_precision`; fp32, bf16 and int8 as given; fp16 refused (a GPU precision)."""
    if precision == "auto":
        return auto_precision()
    if precision not in PRECISIONS:
        raise ValueError(f"{precision} is not an OpenVINO CPU precision; use auto, fp32, bf16 or int8")
    return precision


# -- the cache ---------------------------------------------------------------------------------
def cache_root(explicit: str | os.PathLike[str] | None = None,
               environ: "os._Environ[str] | dict[str, str] | None" = None) -> Path:
    """Where converted encoders live: ``explicit``, else ``$BATCHCAP_ENCODER_CACHE``, else
    ``$XDG_CACHE_HOME/batchcap``, else ``~/.cache/batchcap``."""
    environ = os.environ if environ is None else environ
    if explicit:
        return Path(explicit)
    if environ.get(ENV_CACHE):
        return Path(environ[ENV_CACHE])
    base = environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "batchcap"


def weights_sha256(backbone: nn.Module) -> str:
    """A hash of the encoder's tensors as loaded (names, dtypes, shapes, bytes): tells fine-tuned weights apart."""
    digest = hashlib.sha256()
    for name, tensor in sorted(backbone.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def backbone_identity(backbone: nn.Module) -> tuple[str, str]:
    """(architecture, weights digest) of a built network, for the cache key."""
    arch = getattr(backbone, "pretrained_cfg", {}).get("architecture") or type(backbone).__name__
    return arch, weights_sha256(backbone)


def cache_fields(identity: tuple[str, str], preprocess: Preprocess, spatial: bool, stored_precision: str,
                 version: str, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Everything a converted graph depends on; its hash names the cache folder.

    ``identity`` is (architecture, weights digest): :func:`backbone_identity` of a built network, or
    :func:`batchcap.encoder.stored_identity` of the weights as stored, which needs no network.
    """
    arch, digest = identity
    return {"graph_format": GRAPH_FORMAT, "encoder": arch,
            "weights_sha256": digest,
            "preprocess": to_dict(preprocess), "spatial": spatial, "precision": stored_precision,
            "batch": BATCH_POLICY, "openvino": version, **(extra or {})}


def cache_key(fields: dict[str, Any]) -> str:
    """A short, stable name for ``fields``."""
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:24]


def cached_graph(root: Path, fields: dict[str, Any], build: Callable[[], Any],
                 log: Callable[[str], None] | None = None, extra_info: dict[str, Any] | None = None,
                 announce: bool = True) -> tuple[Path, dict[str, Any]]:
    """The cached graph for ``fields`` (``encoder.xml``), calling ``build`` to make it on a miss.

    The graph is written into a temporary folder beside its final place and renamed
    there in one step; when another process got there first its copy is kept (it is the
    same graph) and ours is removed. Returns the XML path and the folder's ``info.json``
    (``fields``, the build time, and ``extra_info`` as ``build`` left it). ``announce``
    logs the conversion before it starts (a builder that may refuse says it itself).
    """
    import openvino as ov

    key = cache_key(fields)
    folder = root / "openvino" / f"{fields['encoder']}-{fields['precision']}-{key}"
    xml = folder / "encoder.xml"
    if xml.is_file():
        return xml, _read_info(folder, fields)
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{key}-", dir=folder.parent))
    except OSError as exc:
        raise CacheUnusable(f"encoder cache {root}: cannot write there ({exc.strerror or exc}); pass "
                            f"--encoder-cache DIR or set {ENV_CACHE} to a writable folder") from exc
    if log and announce:
        log(f"converting the encoder to OpenVINO ({fields['precision']}); first use only, the result is cached")
    started = time.perf_counter()
    try:
        graph = build()
        ov.save_model(graph, str(tmp / "encoder.xml"), compress_to_fp16=False)
        info = {**fields, **(extra_info or {}), "build_seconds": round(time.perf_counter() - started, 2),
                "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        (tmp / "info.json").write_text(json.dumps(info, indent=2) + "\n")
        try:
            os.rename(tmp, folder)  # atomic; fails when the folder already exists
        except OSError:
            if not xml.is_file():
                raise
        else:
            if log:
                log(f"converted in {info['build_seconds']:.1f} s; cached in {folder}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return xml, _read_info(folder, fields)


def _read_info(folder: Path, fields: dict[str, Any]) -> dict[str, Any]:
    """A cache folder's ``info.json``; its key fields when the file was removed by hand."""
    try:
        return json.loads((folder / "info.json").read_text())
    except (OSError, ValueError):
        return dict(fields)


# -- conversion --------------------------------------------------------------------------------
class EncoderGraph(nn.Module):
    """What is converted: ``uint8`` (B, 3, H, W) -> normalised -> features, as :class:`~batchcap.encoder.Encoder`."""

    def __init__(self, backbone: nn.Module, preprocess: Preprocess, spatial: bool) -> None:
        super().__init__()
        self.backbone = backbone
        self.spatial = spatial
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
    from batchcap.encoder import cpu_has_native_bf16

    if precision == "int8":
        return "bf16" if cpu_has_native_bf16() else "f32"
    return {"fp32": "f32", "bf16": "bf16"}[precision]


def compile_graph(xml: Path, precision: str) -> Any:
    """The graph compiled for the CPU: one stream on every core (one batch at a time, as the pipeline feeds it)."""
    import openvino as ov

    core = ov.Core()
    return core.compile_model(core.read_model(str(xml)), "CPU",
                              {"INFERENCE_PRECISION_HINT": inference_precision(precision),
                               "PERFORMANCE_HINT": "LATENCY"})


def _stderr(message: str) -> None:
    import sys

    print(f"batchcap: {message}", file=sys.stderr, flush=True)


# -- the stage ---------------------------------------------------------------------------------
class OpenVINOEncoder:
    """Drop-in for :class:`~batchcap.encoder.Encoder` on the CPU: ``uint8`` batch in, fp32 features out.

    Builds (or finds in the cache) the fp32 graph, and for int8 the quantised one
    (:func:`batchcap.quantize.int8_graph`); ``info`` is the used graph's cache record.
    """

    def __init__(self, backbone: nn.Module | Callable[[], nn.Module], preprocess: Preprocess, runtime: RuntimeConfig,
                 spatial: bool = True, log: Callable[[str], None] | None = None,
                 identity: tuple[str, str] | None = None) -> None:
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
            from batchcap.quantize import int8_graph

            self.xml, self.info = int8_graph(root, fp32_xml, fp32_fields, preprocess, log)
        started = time.perf_counter()
        self.compiled = compile_graph(self.xml, precision)
        self.compile_seconds = time.perf_counter() - started
        self._request = self.compiled.create_infer_request()

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = images.cpu().numpy()
        if x.dtype != np.uint8:
            raise TypeError(f"the OpenVINO encoder takes uint8 images, not {x.dtype}")
        out = self._request.infer({0: np.ascontiguousarray(x)}, share_inputs=True, share_outputs=False)
        return torch.from_numpy(np.asarray(out[0], dtype=np.float32))  # (B, R, F) or (B, F)
