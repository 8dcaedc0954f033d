"""What this machine has, and what follows from it: CPU flags, the device, the precision, the CPUs to use.

Every stage asks here rather than probing on its own, so one answer holds for a whole run.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch

from batchcap.config import RuntimeConfig


class HardwareError(Exception):
    """A device or precision this machine cannot run (no CUDA here, fp16 on a CPU, an unknown name)."""


_AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


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


def cuda_is_ampere_or_newer(
    device: torch.device, capability: Callable[[torch.device], tuple[int, int]] | None = None
) -> bool:
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
        raise HardwareError(f"unknown device {spec!r}; use auto, cpu, cuda or cuda:N") from exc
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise HardwareError(f"--device {spec}: CUDA is not available on this machine; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise HardwareError(f"--device {spec}: only {torch.cuda.device_count()} CUDA device(s) here")
    elif device.type != "cpu":
        raise HardwareError(f"unsupported device {spec!r}; use auto, cpu, cuda or cuda:N")
    return device


def resolve_precision(
    precision: str, device: torch.device, capability: Callable[[torch.device], tuple[int, int]] | None = None
) -> str:
    """``auto`` -> bf16 on Ampere+ GPUs and CPUs with native bf16, fp16 on older GPUs, else fp32."""
    if precision == "auto":
        if device.type == "cuda":
            return "bf16" if cuda_is_ampere_or_newer(device, capability) else "fp16"
        return "bf16" if cpu_has_native_bf16() else "fp32"
    if precision not in ("fp32", "bf16", "fp16"):
        raise HardwareError(f"unknown precision {precision!r}; use auto, fp32, bf16 or fp16")
    if precision == "fp16" and device.type == "cpu":
        raise HardwareError("fp16 is not supported on CPU; use --precision bf16 or fp32")
    return precision


def autocast(runtime: RuntimeConfig) -> torch.autocast:
    """The autocast context for ``runtime`` (disabled for fp32)."""
    device_type = torch.device(runtime.device).type
    dtype = _AUTOCAST_DTYPES.get(runtime.precision, torch.bfloat16)
    return torch.autocast(device_type, dtype=dtype, enabled=runtime.precision in _AUTOCAST_DTYPES)


def available_cpus() -> int:
    """CPUs this process may run on: the affinity mask (Slurm's, taskset's), not the node's count."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        return max(1, os.cpu_count() or 1)


def default_workers(cpus: int | None = None) -> int:
    """Decoding workers for ``--workers auto``: one per allocated CPU, leaving one for the model."""
    return max(1, (available_cpus() if cpus is None else cpus) - 1)
