"""The Python API: caption pictures in memory, or run a whole job, under the command line's rules.

Two entry points, both exported from ``batchcap`` (reference: ``docs/api.md``):

* :func:`load_model` gives an :class:`ImageCaptioner`, whose :meth:`~ImageCaptioner.caption`
  takes paths, encoded bytes, Pillow pictures or ``uint8`` arrays and returns one
  :class:`CaptionResult` per item, in order; :meth:`~ImageCaptioner.caption_stream` does the
  same for an iterable of any length, a batch at a time. Items are decoded by
  :mod:`batchcap.data.image_decode`, as ``batchcap run`` decodes files; a bad item is a result
  with a ``status`` and an ``error``, never an exception.
* :func:`run` is ``batchcap run``: the click command is a thin layer over it, so the two take
  the same options (``--no-draft`` is ``no_draft=True``), resume the same way and return the
  same exit code and summary.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TextIO, Union

import numpy as np
import torch
from PIL import Image

from batchcap.config import BeamConfig, ImagePolicy, Preprocess, RunConfig, RuntimeConfig, UsageError
from batchcap.data.image_decode import (
    OK,
    Decoded,
    allow_pillow_up_to,
    decode_array,
    decode_bytes,
    decode_file,
    decode_image,
)
from batchcap.data.sharding import resolve_shard
from batchcap.model.modelfile import CaptionModel, read_metadata, resolve_model_path
from batchcap.model.modelfile import load_model as read_model_file
from batchcap.outputs.schema import infer_format
from batchcap.pipeline.captioner import NO_CAPTION, Caption, Captioner
from batchcap.pipeline.progress import parse_max_failures
from batchcap.pipeline.runner import RunResult, run_job
from batchcap.pipeline.settings import beam_config, image_policy, runtime_config

__all__ = ["CaptionResult", "ImageCaptioner", "Item", "RunResult", "load_model", "run"]

#: What :meth:`ImageCaptioner.caption` takes: a path, a picture file's bytes, a Pillow picture, or
#: a ``uint8`` array (H, W, 3) RGB, (H, W) grey or (H, W, 4) RGBA.
Item = Union[str, "os.PathLike[str]", bytes, bytearray, memoryview, Image.Image, np.ndarray]

#: One item where a list of them is expected (a string or an array would be iterated piece by piece).
_SINGLE_ITEMS = (str, os.PathLike, bytes, bytearray, memoryview, Image.Image, np.ndarray)

_DEFAULT_MAX_PIXELS = ImagePolicy().max_pixels


@dataclass(frozen=True)
class CaptionResult:
    """One item's outcome, with the output file's columns of the same names.

    ``status`` is ``ok``, or why there is no caption: ``missing``, ``unreadable``, ``corrupt``,
    ``unsupported`` (not a picture, or an array of another shape or dtype), ``too_large``
    (over ``max_pixels``) or ``no_caption``; ``error`` then says what went wrong, and
    ``caption``, ``score``, ``logprob`` and ``n_best`` are ``None``.

    ``score`` is what the beam search ranked by; ``logprob`` the caption's mean log-probability
    per token; ``confidence`` the calibrated probability that the caption is acceptable (``None``
    when the model has no calibration). ``n_best`` lists ``{"caption", "score"}`` best first
    when more than one caption was asked for, else ``None``. ``width`` and ``height`` are the
    picture's, after EXIF orientation (``None`` when it could not be read).
    """

    caption: str | None
    score: float | None
    logprob: float | None
    confidence: float | None
    n_best: list[dict[str, Any]] | None
    status: str
    error: str | None
    width: int | None
    height: int | None

    @property
    def ok(self) -> bool:
        """Whether the item got a caption."""
        return self.status == OK

    def as_dict(self) -> dict[str, Any]:
        """The fields as a dict (e.g. a row for ``pandas.DataFrame``)."""
        return dataclasses.asdict(self)


def _failed(decoded: Decoded) -> CaptionResult:
    return CaptionResult(None, None, None, None, None, decoded.status, decoded.error, decoded.width, decoded.height)


def _captioned(decoded: Decoded, caption: Caption, n_best: int) -> CaptionResult:
    if caption.error is not None:
        return CaptionResult(None, None, None, None, None, NO_CAPTION, caption.error, decoded.width, decoded.height)
    ranked = [{"caption": c, "score": s} for c, s in caption.n_best[:n_best]] if n_best > 1 else None
    return CaptionResult(
        caption.text,
        caption.score,
        caption.logprob,
        caption.confidence,
        ranked,
        OK,
        None,
        decoded.width,
        decoded.height,
    )


class ImageCaptioner:
    """A loaded model and its settings: pictures in, :class:`CaptionResult` s out (see :func:`load_model`)."""

    def __init__(self, captioner: Captioner, policy: ImagePolicy) -> None:
        self._captioner = captioner
        self._by_n_best: dict[int, Captioner] = {captioner.beam.n_best: captioner}
        self.policy = policy
        allow_pillow_up_to(policy)

    @property
    def model(self) -> CaptionModel:
        """The loaded model file (vocabulary, preprocessing, decoder)."""
        return self._captioner.model

    @property
    def beam(self) -> BeamConfig:
        """The caption search settings."""
        return self._captioner.beam

    @property
    def runtime(self) -> RuntimeConfig:
        """Device, precision, backend and default batch size, as resolved."""
        return self._captioner.runtime

    @property
    def identity(self) -> str:
        """``name@hash12``: what the output file's ``model`` column records for this model."""
        return self.model.identity

    def __repr__(self) -> str:
        return (
            f"ImageCaptioner({self.identity}, device={self.runtime.device!r}, "
            f"precision={self.runtime.precision!r}, backend={self.runtime.backend!r}, beam={self.beam.beam_size})"
        )

    def caption(self, items: Iterable[Item], n_best: int = 1, batch_size: int | None = None) -> list[CaptionResult]:
        """One :class:`CaptionResult` per item, in order.

        Args:
            items: paths, picture files' bytes, Pillow pictures or ``uint8`` arrays (H, W, 3),
                in any mix. A bad item (a missing file, damaged bytes, an array of another
                shape) becomes a result with its ``status`` and ``error``.
            n_best: captions per item in ``CaptionResult.n_best`` (at most the beam width).
            batch_size: pictures per encoder batch; default: the runtime's (16 on CPU, 256 on CUDA).

        Raises:
            TypeError: an item of none of the types above (a bug in the caller, not bad data).
        """
        return list(self.caption_stream(items, n_best=n_best, batch_size=batch_size))

    def caption_stream(
        self, items: Iterable[Item], n_best: int = 1, batch_size: int | None = None
    ) -> Iterator[CaptionResult]:
        """:meth:`caption` for an iterable of any length: reads ``batch_size`` items at a time, yields in order.

        Memory holds one batch of decoded pictures; the results of a batch are yielded once it
        is captioned, so a consumer may write them out as they come. ``n_best`` and
        ``batch_size`` are checked here, before the first item is read.
        """
        if isinstance(items, _SINGLE_ITEMS):
            raise TypeError(
                f"caption and caption_stream take a list (or any iterable) of items, not one "
                f"{type(items).__name__}: for one picture, caption([item])[0]"
            )
        size = batch_size or self.runtime.batch_size
        if size < 1:
            raise ValueError(f"batch_size must be at least 1, not {size}")
        return self._stream(iter(items), self._for_n_best(n_best), n_best, size)

    def _stream(
        self, iterator: Iterator[Item], captioner: Captioner, n_best: int, size: int
    ) -> Iterator[CaptionResult]:
        preprocess = self.model.preprocess
        while chunk := list(itertools.islice(iterator, size)):
            decoded = [decode_item(item, preprocess, self.policy) for item in chunk]
            tensors = [d.tensor for d in decoded if d.status == OK and d.tensor is not None]
            captions = iter(captioner(torch.stack(tensors)) if tensors else [])
            for d in decoded:
                yield _captioned(d, next(captions), n_best) if d.status == OK else _failed(d)

    def _for_n_best(self, n_best: int) -> Captioner:
        if not 1 <= n_best <= self.beam.beam_size:
            raise ValueError(
                f"n_best={n_best}: ask for 1 to {self.beam.beam_size} captions (the beam width); "
                f"load the model with beam={n_best} for more"
            )
        if n_best not in self._by_n_best:
            self._by_n_best[n_best] = self._captioner.with_beam(dataclasses.replace(self.beam, n_best=n_best))
        return self._by_n_best[n_best]


def decode_item(item: Item, preprocess: Preprocess, policy: ImagePolicy) -> Decoded:
    """Decode one API item by its type, under ``policy`` (never raises for bad data)."""
    if isinstance(item, (str, os.PathLike)):
        return decode_file(os.fspath(item), preprocess, policy)
    if isinstance(item, (bytes, bytearray, memoryview)):
        return decode_bytes(bytes(item), preprocess, policy)
    if isinstance(item, Image.Image):
        return decode_image(item, preprocess, policy)
    if isinstance(item, np.ndarray):
        return decode_array(item, preprocess, policy)
    raise TypeError(
        f"cannot caption a {type(item).__name__}: pass a path, a picture file's bytes, "
        "a PIL.Image.Image or a uint8 numpy array (H, W, 3)"
    )


def _path_or_env(value: str | os.PathLike[str] | None, variable: str) -> str | None:
    """``value`` as a string; when ``None``, the environment variable the command line also reads."""
    if value is None:
        return os.environ.get(variable) or None
    return os.fspath(value)


def _background(value: str | Sequence[int]) -> str:
    return value if isinstance(value, str) else ",".join(str(v) for v in value)


def _image_keys(value: str | Sequence[str]) -> str:
    return value if isinstance(value, str) else ",".join(value)


def load_model(
    path: str | os.PathLike[str] | None = None,
    *,
    device: str = "auto",
    precision: str = "auto",
    backend: str = "auto",
    beam: int = 3,
    max_len: int | None = None,
    min_len: int = 1,
    length_penalty: float = 0.0,
    no_repeat_ngram: int = 0,
    no_ending_rule: bool = False,
    allow_repeated_words: bool = False,
    style: str = "auto",
    consensus_weight: float | None = None,
    batch_size: int | None = None,
    encoder_weights: str | os.PathLike[str] | None = None,
    encoder_cache: str | os.PathLike[str] | None = None,
    max_pixels: int = _DEFAULT_MAX_PIXELS,
    background: str | Sequence[int] = "255,255,255",
    no_draft: bool = False,
) -> ImageCaptioner:
    """Load a model file and its encoder once, for captioning pictures in this process.

    The keywords are ``batchcap run``'s options of the same names, with the same defaults.

    Args:
        path: a model file from ``batchcap train``; ``None``: the model shipped with batchcap.
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        precision: ``auto``, ``fp32``, ``bf16``, ``fp16`` or ``int8`` (OpenVINO only).
        backend: encoder engine, ``auto``, ``torch`` or ``openvino``.
        beam: beam width (1 = greedy); also the most captions ``n_best`` can ask for.
        max_len: most words per caption; ``None``: the model's maximum.
        min_len: fewest words before the caption may end.
        length_penalty: ALPHA in ``score = log p / length ** ALPHA``.
        no_repeat_ngram: forbid repeating any n-gram of this size (0: off).
        no_ending_rule: let captions end on any word (not only where the model's ending rule allows).
        allow_repeated_words: let any word follow itself (not only the model's learnt exceptions).
        style: a model with caption styles: the style to write, or ``auto`` (each picture its nearest
            training pictures' style).
        consensus_weight: rerank the search's captions by mean log-probability + this weight x their
            consensus with the nearest training pictures' captions; ``None``: 1.0 for a model with
            neighbour statistics, else 0 (the search's order).
        batch_size: default pictures per encoder batch (16 on CPU, 256 on CUDA).
        encoder_weights: encoder weights, when the model file neither embeds nor ships them
            (default: ``$BATCHCAP_ENCODER_WEIGHTS``).
        encoder_cache: folder of converted (OpenVINO) encoders (default: ``$BATCHCAP_ENCODER_CACHE``,
            else ``$XDG_CACHE_HOME/batchcap``).
        max_pixels: refuse pictures larger than this (status ``too_large``).
        background: ``"R,G,B"`` or ``(R, G, B)`` composited under transparent pixels.
        no_draft: decode large JPEGs at full size instead of DCT-downscaled (slower).

    Raises:
        batchcap.config.OptionError: a value that cannot be used (it names the option).
        batchcap.model.modelfile.ModelFileError: ``path`` is not a usable model file.
    """
    model_path = resolve_model_path(None if path is None else os.fspath(path))
    model = read_model_file(model_path)
    beam_cfg = beam_config(
        beam,
        max_len,
        min_len,
        length_penalty,
        no_repeat_ngram,
        1,
        model.max_caption_len,
        no_ending_rule=no_ending_rule,
        allow_repeated_words=allow_repeated_words,
        style=style,
        consensus_weight=consensus_weight,
        has_neighbours=model.neighbours is not None,
    )
    runtime = runtime_config(
        device, precision, batch_size, "0", backend, _path_or_env(encoder_cache, "BATCHCAP_ENCODER_CACHE")
    )
    policy = image_policy(max_pixels, _background(background), no_draft, "jpg", device=runtime.device)
    weights = _path_or_env(encoder_weights, "BATCHCAP_ENCODER_WEIGHTS")
    return ImageCaptioner(Captioner(model, runtime, beam_cfg, weights), policy)


def run(
    sources: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    out: str | os.PathLike[str],
    *,
    files_from: str | os.PathLike[str] | None = None,
    shard: str | None = None,
    max_pixels: int = _DEFAULT_MAX_PIXELS,
    background: str | Sequence[int] = "255,255,255",
    no_draft: bool = False,
    decode_on_device: bool = False,
    image_key: str | Sequence[str] = "jpg,jpeg,png,webp",
    id_column: str | None = None,
    id_from: str = "auto",
    path_column: str | None = None,
    format: str | None = None,
    overwrite: bool = False,
    commit_every: int = 512,
    commit_seconds: float = 60.0,
    max_failures: str | int | float = "0.5",
    log_every: float = 30.0,
    min_confidence: float | None = None,
    model: str | os.PathLike[str] | None = None,
    encoder_weights: str | os.PathLike[str] | None = None,
    device: str = "auto",
    precision: str = "auto",
    batch_size: int | None = None,
    workers: str | int = "auto",
    backend: str = "auto",
    encoder_cache: str | os.PathLike[str] | None = None,
    beam: int = 3,
    max_len: int | None = None,
    min_len: int = 1,
    length_penalty: float = 0.0,
    no_repeat_ngram: int = 0,
    n_best: int = 1,
    no_ending_rule: bool = False,
    allow_repeated_words: bool = False,
    style: str = "auto",
    consensus_weight: float | None = None,
    stream: TextIO | None = None,
) -> RunResult:
    """``batchcap run SOURCES --out OUT``: caption every picture in ``sources`` not yet in ``out``.

    Each keyword is the ``batchcap run`` option of the same name (dashes as underscores, same
    defaults, and ``BATCHCAP_ENCODER_WEIGHTS`` / ``BATCHCAP_ENCODER_CACHE`` read the same way;
    ``docs/cli.md`` says what each does). Calling it again resumes exactly as
    rerunning the command does: only pictures not yet in ``out`` are captioned. Progress and
    the summary go to ``stream`` (default: standard error).

    Returns:
        :class:`RunResult`: ``exit_code`` (what the command exits with: 0 done, 5 too many
        failures, 6 interrupted) and the ``summary`` dict it prints.

    Raises:
        batchcap.config.UsageError: no source, or options that do not fit together.
        batchcap.config.OptionError: a value that cannot be used (it names the option).
        batchcap.data.sources.SourceError: a source that names nothing.
        batchcap.outputs.lock.LockHeld: another run is writing ``out`` (the command exits 3).
        batchcap.outputs.store.ResumeRefused: ``out`` was made with other settings (exit 4).
        batchcap.outputs.lock.OutputUnwritable, batchcap.outputs.store.OutputIOError: ``out``
            cannot be written.
    """
    given = [sources] if isinstance(sources, (str, os.PathLike)) else list(sources)
    specs: list[str] = [os.fspath(s) for s in given]
    files_list = None if files_from is None else os.fspath(files_from)
    out = os.fspath(out)
    max_failures = str(max_failures)
    if not specs and not files_list:
        raise UsageError("give at least one SOURCE (folder, image, .tar shard) or --files-from FILE")
    try:
        parse_max_failures(max_failures)
        shard_index, shard_count = resolve_shard(shard, os.environ)
        fmt = infer_format(out, format)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    model_path = resolve_model_path(None if model is None else os.fspath(model))
    meta = read_metadata(model_path)
    if min_confidence is not None and "calibration" not in meta:
        raise UsageError(
            f"--min-confidence: the model {model_path} has no confidence calibration; "
            "fit one with `batchcap calibrate`, or drop --min-confidence"
        )
    beam_cfg = beam_config(
        beam,
        max_len,
        min_len,
        length_penalty,
        no_repeat_ngram,
        n_best,
        int(meta["max_caption_len"]),
        no_ending_rule=no_ending_rule,
        allow_repeated_words=allow_repeated_words,
        style=style,
        consensus_weight=consensus_weight,
        has_neighbours="neighbours" in meta,
    )
    cfg = RunConfig(
        sources=tuple(specs),
        out=out,
        format=fmt,
        files_from=files_list,
        shard_index=shard_index,
        shard_count=shard_count,
        overwrite=overwrite,
        max_failures=max_failures,
        commit_every=commit_every,
        log_every=log_every,
        commit_seconds=commit_seconds,
        min_confidence=min_confidence,
        id_column=id_column,
        id_from=id_from,
        path_column=path_column,
    )
    runtime = runtime_config(
        device, precision, batch_size, str(workers), backend, _path_or_env(encoder_cache, "BATCHCAP_ENCODER_CACHE")
    )
    policy = image_policy(
        max_pixels, _background(background), no_draft, _image_keys(image_key), decode_on_device, runtime.device
    )
    weights = _path_or_env(encoder_weights, "BATCHCAP_ENCODER_WEIGHTS")
    return run_job(cfg, model_path, beam_cfg, runtime, policy, encoder_weights=weights, stream=stream or sys.stderr)
