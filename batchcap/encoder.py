"""The encode stage: a timm network turns ``uint8`` image batches into features.

Weights come from, in order: the model file (embedded, or the file it references,
found beside the model or among the packaged assets); ``--encoder-weights`` /
``BATCHCAP_ENCODER_WEIGHTS``; timm's ``pretrained=True`` download (online users).
With none of these the encoder is refused -- never silently random at captioning time.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from batchcap.config import EncoderConfig, Preprocess, RuntimeConfig

ENV_WEIGHTS = "BATCHCAP_ENCODER_WEIGHTS"
ASSETS_DIR = Path(__file__).resolve().parent / "assets"

_AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class EncoderError(Exception):
    """The encoder cannot be built as asked (missing weights, bad device, bad precision)."""


# -- device and precision -------------------------------------------------------------------
def cpu_flags() -> set[str]:
    """The CPU's feature flags from ``/proc/cpuinfo`` (empty where it cannot be read)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="ignore") as fh:
            return {flag for line in fh if line.startswith("flags") for flag in line.split(":", 1)[1].split()}
    except OSError:
        return set()


def cpu_has_native_bf16() -> bool:
    """True on CPUs with bf16 matrix instructions (AVX512-BF16 or AMX), where bf16 pays off."""
    return bool({"avx512_bf16", "amx_bf16"} & cpu_flags())


def cuda_is_ampere_or_newer(device: torch.device,
                            capability: Callable[[torch.device], tuple[int, int]] | None = None) -> bool:
    """True when ``device`` has compute capability 8.0 or more: native bf16 and TF32 tensor cores.

    ``torch.cuda.is_bf16_supported()`` also counts emulated bf16 (slow on V100 and T4) and asks
    about the current device, not ``device``; the capability of ``device`` itself decides here.
    ``capability`` replaces ``torch.cuda.get_device_capability`` (tests have no GPU).
    """
    major, _minor = (capability or torch.cuda.get_device_capability)(device)
    return major >= 8


def resolve_device(spec: str) -> torch.device:
    """``auto`` -> the first CUDA device when present, else CPU; validates ``cuda:N``."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError as exc:
        raise EncoderError(f"unknown device {spec!r}; use auto, cpu, cuda or cuda:N") from exc
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise EncoderError(f"--device {spec}: CUDA is not available on this machine; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise EncoderError(f"--device {spec}: only {torch.cuda.device_count()} CUDA device(s) here")
    elif device.type != "cpu":
        raise EncoderError(f"unsupported device {spec!r}; use auto, cpu, cuda or cuda:N")
    return device


def resolve_precision(precision: str, device: torch.device,
                      capability: Callable[[torch.device], tuple[int, int]] | None = None) -> str:
    """``auto`` -> bf16 on Ampere+ GPUs and CPUs with native bf16, fp16 on older GPUs, else fp32."""
    if precision == "auto":
        if device.type == "cuda":
            return "bf16" if cuda_is_ampere_or_newer(device, capability) else "fp16"
        return "bf16" if cpu_has_native_bf16() else "fp32"
    if precision not in ("fp32", "bf16", "fp16"):
        raise EncoderError(f"unknown precision {precision!r}; use auto, fp32, bf16 or fp16")
    if precision == "fp16" and device.type == "cpu":
        raise EncoderError("fp16 is not supported on CPU; use --precision bf16 or fp32")
    return precision


def autocast(runtime: RuntimeConfig) -> torch.autocast:
    """The autocast context for ``runtime`` (disabled for fp32)."""
    device_type = torch.device(runtime.device).type
    dtype = _AUTOCAST_DTYPES.get(runtime.precision, torch.bfloat16)
    return torch.autocast(device_type, dtype=dtype, enabled=runtime.precision in _AUTOCAST_DTYPES)


# -- weights -----------------------------------------------------------------------------
def load_state_dict_file(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """A state dict from safetensors, or from a torch file loaded with ``weights_only=True``."""
    path = Path(path)
    if not path.is_file():
        raise EncoderError(f"encoder weights {path}: no such file")
    with open(path, "rb") as fh:
        head = fh.read(8)
    if head[:2] == b"PK" or head[:1] == b"\x80":  # zip (torch.save) or legacy pickle
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise EncoderError(f"encoder weights {path}: not a loadable weights-only state dict ({exc})") from exc
        if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
            state = state["state_dict"]
        if not isinstance(state, dict):
            raise EncoderError(f"encoder weights {path}: expected a state dict, found {type(state).__name__}")
        return state
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as exc:
        raise EncoderError(f"encoder weights {path}: not a safetensors or torch weights file ({exc})") from exc


@dataclass(frozen=True)
class WeightsSource:
    """Where the encoder's weights come from: a state dict in memory, a file, or timm's download."""

    kind: str  # "embedded" | "file" | "pretrained"
    path: str | None = None
    state: dict[str, torch.Tensor] | None = None
    file_sha256: str | None = None  # the file's, when the model's check already hashed it
    #: A model file's fine-tuned exit flow, loaded over the file's or the download's weights.
    exit_flow: dict[str, torch.Tensor] | None = None

    def describe(self) -> str:
        base = {"embedded": "embedded in the model file", "pretrained": "timm pretrained download"}.get(
            self.kind, str(self.path))
        return base + (" with the model file's fine-tuned exit flow" if self.exit_flow is not None else "")


def find_referenced_weights(weights_file: str | None, model_path: str | None) -> Path | None:
    """The encoder weights file a model file names, beside it or among the packaged assets."""
    if not weights_file:
        return None
    candidates = []
    if model_path:
        candidates.append(Path(model_path).resolve().parent / weights_file)
    candidates.append(ASSETS_DIR / weights_file)
    return next((c for c in candidates if c.is_file()), None)


def build_backbone(cfg: EncoderConfig, source: WeightsSource) -> nn.Module:
    """The timm network as a feature extractor (``num_classes=0``) with weights loaded, eval mode."""
    import timm

    try:
        if source.kind == "pretrained":
            model = timm.create_model(cfg.name, pretrained=True, num_classes=0)
        else:
            model = timm.create_model(cfg.name, pretrained=False, num_classes=0)
    except RuntimeError as exc:
        raise EncoderError(f"encoder {cfg.name!r}: {exc}") from exc
    except Exception as exc:
        if source.kind == "pretrained":
            raise EncoderError(
                f"could not download pretrained weights for {cfg.name!r} ({exc.__class__.__name__}: {exc}); "
                f"offline, pass --encoder-weights FILE or set {ENV_WEIGHTS}") from exc
        raise
    if source.kind != "pretrained":
        state = source.state if source.state is not None else load_state_dict_file(source.path or "")
        state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
        missing, unexpected = model.load_state_dict(state, strict=False)
        unexpected = [k for k in unexpected if not k.startswith(("fc.", "head.", "classifier."))]
        if missing or unexpected:
            raise EncoderError(
                f"encoder weights ({source.describe()}) do not fit {cfg.name!r}: "
                f"{len(missing)} missing keys (e.g. {missing[:3]}), {len(unexpected)} unexpected "
                f"(e.g. {unexpected[:3]}); check --encoder-name")
    if source.exit_flow is not None:
        from batchcap.exit_flow import ExitFlowError, apply_exit_flow

        try:
            apply_exit_flow(model, source.exit_flow, source.describe())
        except ExitFlowError as exc:
            raise EncoderError(str(exc)) from exc
    return model.eval()


# -- the stage ----------------------------------------------------------------------------
class Encoder(nn.Module):
    """Normalise a ``uint8`` batch on the device and return fp32 features.

    Output is ``(B, R, F)`` (the spatial map, ``R = h * w`` regions) when ``spatial``,
    else pooled ``(B, F)``.
    """

    def __init__(self, backbone: nn.Module, preprocess: Preprocess, runtime: RuntimeConfig,
                 spatial: bool = True) -> None:
        super().__init__()
        self.backbone = backbone
        self.runtime = runtime
        self.spatial = spatial
        self.register_buffer("mean", torch.tensor(preprocess.mean).view(1, 3, 1, 1) * 255.0)
        self.register_buffer("std", torch.tensor(preprocess.std).view(1, 3, 1, 1) * 255.0)
        self.to(runtime.device)
        if runtime.channels_last:
            self.backbone.to(memory_format=torch.channels_last)
        if torch.device(runtime.device).type == "cuda":
            torch.backends.cudnn.benchmark = True  # fixed input shapes: cuDNN picks its fastest kernels once

    @torch.inference_mode()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.to(self.runtime.device, non_blocking=True).float()  # (B, 3, H, W)
        x = (x - self.mean) / self.std
        if self.runtime.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(self.runtime):
            fmap = self.backbone.forward_features(x)  # (B, F, h, w)
        fmap = fmap.float()
        if self.spatial:
            return fmap.flatten(2).transpose(1, 2).contiguous()  # (B, h*w, F)
        return fmap.mean(dim=(2, 3))  # (B, F)


def stored_identity(cfg: EncoderConfig, source: WeightsSource) -> tuple[str, str] | None:
    """(architecture, digest of the weights as stored) without building the network; None for a download.

    The digest is the weights file's sha256 (the one :func:`batchcap.modelfile.check_encoder_weights`
    computed, when given) or, for an embedded encoder, the hash of its tensors.

    What the OpenVINO cache is keyed by, so a cached graph is found before timm is even imported.
    """
    if source.kind == "pretrained":
        return None
    from batchcap.modelfile import file_sha256, tensors_sha256

    if source.file_sha256:  # hashed already when the weights were checked against the model
        digest = "file:" + source.file_sha256
    elif source.state is not None:
        digest = "stored:" + tensors_sha256(source.state)
    else:
        digest = "file:" + file_sha256(source.path or "")
    if source.exit_flow is not None:
        digest += "+exit_flow:" + tensors_sha256(source.exit_flow)
    return cfg.name, digest


def build_encoder(backbone: nn.Module | Callable[[], nn.Module], preprocess: Preprocess, runtime: RuntimeConfig,
                  spatial: bool = True, log: Callable[[str], None] | None = None,
                  identity: tuple[str, str] | None = None) -> Encoder | Any:
    """The encode stage for ``runtime.backend``: :class:`Encoder` (torch), or the OpenVINO one on the CPU.

    ``backbone`` may be a function that builds it; with the weights' ``identity``
    (:func:`stored_identity`) the OpenVINO backend calls it only to convert a graph it has not
    cached. ``log`` hears about a first-use conversion (default: stderr), which takes a minute.
    """
    if runtime.backend == "openvino":
        from batchcap.openvino_backend import CacheUnusable, OpenVINOEncoder, OpenVINOUnavailable
        from batchcap.quantize import CalibrationError

        try:
            return OpenVINOEncoder(backbone, preprocess, runtime, spatial=spatial, log=log, identity=identity)
        except (OpenVINOUnavailable, CacheUnusable, CalibrationError) as exc:
            raise EncoderError(str(exc)) from exc
    network = backbone if isinstance(backbone, nn.Module) else backbone()
    return Encoder(network, preprocess, runtime, spatial=spatial)
