"""Command-line values -> validated config objects, for the CLI and for library callers alike.

``cli.py`` and ``bench.py`` both turn user-facing option values into the frozen
dataclasses of :mod:`batchcap.config`. Doing that here keeps the library free of click:
a bad value raises :class:`OptionError`, which names the option as the user typed it
and says what to do; the click layer shows it as a usage error (exit 2).
"""
from __future__ import annotations

import os

from batchcap.config import BeamConfig, ImagePolicy, RuntimeConfig


class OptionError(ValueError):
    """A command-line value that cannot be used; ``option`` is the flag as typed (``--beam``)."""

    def __init__(self, option: str, message: str) -> None:
        super().__init__(f"{option}: {message}")
        self.option = option
        self.message = message


# Where a stored setting came from on the command line: how refusals name what differs.
_OPTION_OF_SETTING = {
    "model": "--model", "format": "--format", "beam_size": "--beam", "max_len": "--max-len",
    "min_len": "--min-len", "length_penalty": "--length-penalty", "no_repeat_ngram": "--no-repeat-ngram",
    "n_best": "--n-best",
}


def option_name(setting: str) -> str:
    """``"beam.beam_size"`` -> ``"--beam"``; a setting with no option of its own keeps a readable name.

    ``preprocess.*`` comes from the model file, so it reads ``the model's preprocessing (resize)``.
    """
    key = setting.removeprefix("resume_settings.")
    if key.startswith("preprocess."):
        return f"the model's preprocessing ({key.split('.', 1)[1].replace('_', ' ')})"
    leaf = key.removeprefix("beam.")
    return _OPTION_OF_SETTING.get(leaf, key.replace("_", " "))


def available_cpus() -> int:
    """CPUs this process may run on: the affinity mask (Slurm's, taskset's), not the node's count."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        return max(1, os.cpu_count() or 1)


def default_workers(cpus: int | None = None) -> int:
    """Decoding workers for ``--workers auto``: one per allocated CPU, leaving one for the model."""
    return max(1, (available_cpus() if cpus is None else cpus) - 1)


BACKENDS = ("auto", "torch", "openvino")


def resolve_backend(backend: str, device_type: str) -> tuple[str, str]:
    """``--backend`` made concrete, with a note saying why: ``auto`` is OpenVINO on CPU when importable, else torch."""
    from batchcap.openvino_backend import openvino_version

    if backend not in BACKENDS:
        raise OptionError("--backend", f"{backend!r}: use auto, torch or openvino")
    if backend == "torch":
        return "torch", "torch (asked for)"
    if device_type != "cpu":
        if backend == "openvino":
            raise OptionError("--backend", f"openvino runs the encoder on the CPU; use --device cpu, or --backend "
                                           f"torch on {device_type}")
        return "torch", f"auto: torch on {device_type}"
    version = openvino_version()
    if version is None:
        if backend == "openvino":
            raise OptionError("--backend", "openvino is not installed here (pip install openvino); "
                                           "use --backend torch")
        return "torch", "auto: openvino is not importable here, fell back to torch (pip install openvino)"
    return "openvino", f"{'auto: ' if backend == 'auto' else ''}openvino {version} on CPU"


#: ``--batch-size`` when not given. CUDA: 256 pictures keep an 80 GB GPU's encoder busy and
#: halve the beam search's per-word launch overhead per picture against 128, yet fit a 16 GB
#: T4 or V100 (README, Performance). CPU: 16 was the fastest measured (README, Performance).
DEFAULT_BATCH_SIZE = {"cuda": 256, "cpu": 16}


def runtime_config(device: str, precision: str, batch_size: int | None, workers: str, backend: str = "torch",
                   encoder_cache: str | None = None) -> RuntimeConfig:
    """A resolved :class:`RuntimeConfig`: backend, device, precision, batch size and workers made concrete.

    ``cuda:N`` becomes this process's current device, so that what allocates on "the" GPU
    (the DataLoader's pin-memory thread, cuDNN handles) uses GPU N, not GPU 0.
    """
    import torch

    from batchcap.encoder import resolve_device, resolve_precision

    resolved = resolve_device(device)
    if resolved.type == "cuda" and resolved.index is not None:
        torch.cuda.set_device(resolved)
    engine, note = resolve_backend(backend, resolved.type)
    if engine == "openvino":
        from batchcap import openvino_backend

        try:
            resolved_precision = openvino_backend.resolve_precision(precision)
        except ValueError as exc:
            raise OptionError("--precision", str(exc)) from None
    elif precision == "int8":
        raise OptionError("--precision", "int8 runs on the OpenVINO backend only; use --backend openvino "
                                         "(pip install openvino) or another precision")
    else:
        resolved_precision = resolve_precision(precision, resolved)
    if batch_size is None:
        batch_size = DEFAULT_BATCH_SIZE[resolved.type]
    if workers == "auto":
        n_workers = default_workers()
    else:
        try:
            n_workers = int(workers)
        except ValueError:
            raise OptionError("--workers", f"{workers!r} is not a number or auto") from None
        if n_workers < 0:
            raise OptionError("--workers", "must be 0 (decode in this process) or more")
    return RuntimeConfig(device=str(resolved), precision=resolved_precision, batch_size=batch_size,
                         workers=n_workers, channels_last=True, backend=engine, backend_note=note,
                         encoder_cache=str(encoder_cache) if encoder_cache else None)


def beam_config(beam: int, max_len: int | None, min_len: int, length_penalty: float, no_repeat_ngram: int,
                n_best: int, model_max_len: int) -> BeamConfig:
    """A validated :class:`BeamConfig`; ``max_len`` None means the model's own maximum."""
    max_len = max_len or model_max_len
    if n_best > beam:
        raise OptionError("--n-best", f"{n_best} is more than the beam keeps; use --beam {n_best} or more "
                                      f"for --n-best {n_best}")
    if min_len > max_len:
        raise OptionError("--min-len", f"{min_len} is longer than --max-len {max_len}; lower --min-len or "
                                       "raise --max-len")
    return BeamConfig(beam_size=beam, max_len=max_len, min_len=min_len, length_penalty=length_penalty,
                      no_repeat_ngram=no_repeat_ngram, n_best=n_best)


def image_policy(max_pixels: int, background: str, no_draft: bool, image_keys: str,
                 decode_on_device: bool = False, device: str = "cpu") -> ImagePolicy:
    """The :class:`ImagePolicy` for ``--max-pixels``, ``--background``, ``--no-draft``, ``--image-key``,
    ``--decode-on-device`` (which needs the resolved ``device`` to be CUDA)."""
    if decode_on_device and not device.startswith("cuda"):
        raise OptionError("--decode-on-device", f"decodes JPEGs with nvJPEG on a CUDA device, and this run is on "
                                                f"{device}; drop it, or pass --device cuda on a GPU node")
    try:
        rgb = tuple(int(v) for v in background.split(","))
        if len(rgb) != 3 or not all(0 <= v <= 255 for v in rgb):
            raise ValueError
    except ValueError:
        raise OptionError("--background", f"{background!r}: expected R,G,B with values 0-255, "
                                          "e.g. 255,255,255") from None
    keys = tuple(k.strip().lower().lstrip(".") for k in image_keys.split(",") if k.strip())
    if not keys:
        raise OptionError("--image-key", "name at least one extension, e.g. jpg,png")
    return ImagePolicy(max_pixels=max_pixels, background=rgb, draft=not no_draft,  # type: ignore[arg-type]
                       image_keys=keys, decode_on_device=decode_on_device)
