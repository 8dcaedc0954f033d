"""Command-line values -> validated config objects, for the CLI and for library callers alike.

``cli.py`` and ``bench.py`` both turn user-facing option values into the frozen
dataclasses of :mod:`batchcap.config`. Doing that here keeps the library free of click:
a bad value raises :class:`OptionError`, which names the option as the user typed it
and says what to do; the click layer shows it as a usage error (exit 2).
"""

from __future__ import annotations

from batchcap.config import DEFAULT_CONSENSUS_WEIGHT, BeamConfig, ImagePolicy, OptionError, RuntimeConfig
from batchcap.encode import openvino_backend
from batchcap.encode.factory import resolve_backend
from batchcap.hardware import default_workers, resolve_device, resolve_precision

#: ``--batch-size`` when not given. CUDA: 256 pictures keep an 80 GB GPU's encoder busy and
#: halve the beam search's per-word launch overhead per picture against 128, yet fit a 16 GB
#: T4 or V100 (docs/performance.md). CPU: 16 was the fastest measured (docs/performance.md).
DEFAULT_BATCH_SIZE = {"cuda": 256, "cpu": 16}


def runtime_config(
    device: str,
    precision: str,
    batch_size: int | None,
    workers: str,
    backend: str = "torch",
    encoder_cache: str | None = None,
) -> RuntimeConfig:
    """A resolved :class:`RuntimeConfig`: backend, device, precision, batch size and workers made concrete.

    ``cuda:N`` becomes this process's current device, so that what allocates on "the" GPU
    (the DataLoader's pin-memory thread, cuDNN handles) uses GPU N, not GPU 0.
    """
    import torch

    resolved = resolve_device(device)
    if resolved.type == "cuda" and resolved.index is not None:
        torch.cuda.set_device(resolved)
    engine, note = resolve_backend(backend, resolved.type)
    if engine == "openvino":
        try:
            resolved_precision = openvino_backend.resolve_precision(precision)
        except ValueError as exc:
            raise OptionError("--precision", str(exc)) from None
    elif precision == "int8":
        raise OptionError(
            "--precision",
            "int8 runs on the OpenVINO backend only; use --backend openvino "
            "(pip install openvino) or another precision",
        )
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
    return RuntimeConfig(
        device=str(resolved),
        precision=resolved_precision,
        batch_size=batch_size,
        workers=n_workers,
        channels_last=True,
        backend=engine,
        backend_note=note,
        encoder_cache=str(encoder_cache) if encoder_cache else None,
    )


def beam_config(
    beam: int,
    max_len: int | None,
    min_len: int,
    length_penalty: float,
    no_repeat_ngram: int,
    n_best: int,
    model_max_len: int,
    *,
    no_ending_rule: bool = False,
    allow_repeated_words: bool = False,
    style: str = "auto",
    consensus_weight: float | None = None,
    has_neighbours: bool = True,
) -> BeamConfig:
    """A validated :class:`BeamConfig`; ``max_len`` None means the model's own maximum.

    ``consensus_weight`` None is the default: :data:`DEFAULT_CONSENSUS_WEIGHT` for a model with
    neighbour statistics (``has_neighbours``), 0 (no reranking) for one without. A weight given for
    a model without them is refused: it could not be honoured.
    """
    max_len = max_len or model_max_len
    if consensus_weight is None:
        consensus_weight = DEFAULT_CONSENSUS_WEIGHT if has_neighbours else 0.0
    elif not consensus_weight >= 0:
        raise OptionError("--consensus-weight", f"must be 0 (no reranking) or more, not {consensus_weight}")
    elif consensus_weight > 0 and not has_neighbours:
        raise OptionError(
            "--consensus-weight",
            "the model has no neighbour statistics to rerank by; fit them with `batchcap calibrate`, "
            "or use --consensus-weight 0",
        )
    if n_best > beam:
        raise OptionError(
            "--n-best", f"{n_best} is more than the beam keeps; use --beam {n_best} or more for --n-best {n_best}"
        )
    if min_len > max_len:
        raise OptionError(
            "--min-len", f"{min_len} is longer than --max-len {max_len}; lower --min-len or raise --max-len"
        )
    return BeamConfig(
        beam_size=beam,
        max_len=max_len,
        min_len=min_len,
        length_penalty=length_penalty,
        no_repeat_ngram=no_repeat_ngram,
        n_best=n_best,
        ending_rule=not no_ending_rule,
        allow_repeated_words=allow_repeated_words,
        style=style,
        consensus_weight=float(consensus_weight),
    )


def image_policy(
    max_pixels: int,
    background: str,
    no_draft: bool,
    image_keys: str,
    decode_on_device: bool = False,
    device: str = "cpu",
) -> ImagePolicy:
    """The :class:`ImagePolicy` for ``--max-pixels``, ``--background``, ``--no-draft``, ``--image-key``,
    ``--decode-on-device`` (which needs the resolved ``device`` to be CUDA)."""
    if decode_on_device and not device.startswith("cuda"):
        raise OptionError(
            "--decode-on-device",
            f"decodes JPEGs with nvJPEG on a CUDA device, and this run is on "
            f"{device}; drop it, or pass --device cuda on a GPU node",
        )
    try:
        rgb = tuple(int(v) for v in background.split(","))
        if len(rgb) != 3 or not all(0 <= v <= 255 for v in rgb):
            raise ValueError
    except ValueError:
        raise OptionError(
            "--background", f"{background!r}: expected R,G,B with values 0-255, e.g. 255,255,255"
        ) from None
    keys = tuple(k.strip().lower().lstrip(".") for k in image_keys.split(",") if k.strip())
    if not keys:
        raise OptionError("--image-key", "name at least one extension, e.g. jpg,png")
    return ImagePolicy(
        max_pixels=max_pixels,
        background=rgb,
        draft=not no_draft,
        image_keys=keys,
        decode_on_device=decode_on_device,
    )
