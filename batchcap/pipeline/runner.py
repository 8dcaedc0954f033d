"""``batchcap run``: source -> decode -> encode -> beam search -> sink, resumable.

The whole job reads as the sentence above: :func:`run_job` takes the lock, opens the
output store (which knows what is already captioned), streams decoded batches from
the input stage, captions them, hands rows to the store, and finalises the output.
The model's tensors are loaded lazily, on the first batch that has pictures, so a
rerun of a finished job does no model or image work at all.
"""

from __future__ import annotations

import datetime as dt
import platform
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from batchcap.config import BeamConfig, ImagePolicy, Preprocess, RunConfig, RuntimeConfig, from_dict, to_dict
from batchcap.data.loader import Batch, ItemResult, fill_batch, iter_batches
from batchcap.data.sources import open_sources
from batchcap.model.modelfile import load_model, read_metadata
from batchcap.outputs.background_writer import BackgroundWriter
from batchcap.outputs.lock import check_output_location, check_output_writable, hold_lock
from batchcap.outputs.schema import OK, label
from batchcap.outputs.store import OutputStore, work_dir_for
from batchcap.pipeline.captioner import Captioner, caption_batch
from batchcap.pipeline.ignored import IgnoredFiles
from batchcap.pipeline.interrupt import StopSignals
from batchcap.pipeline.progress import EXIT_INTERRUPTED, EXIT_OK, EXIT_TOO_MANY_FAILURES, Progress, parse_max_failures
from batchcap.version import __version__


@dataclass(frozen=True)
class RunResult:
    """How a run ended: the exit code the CLI returns, and the summary it printed."""

    exit_code: int
    summary: dict[str, Any]


def model_identity(meta: dict[str, Any]) -> str:
    """``name@hash12`` from a model file's metadata (what the ``model`` column records)."""
    return f"{meta.get('name', 'batchcap-model')}@{str(meta.get('tensors_sha256', ''))[:12]}"


def resume_settings(
    meta: dict[str, Any], beam: BeamConfig, id_from: str = "relative", id_column: str | None = None
) -> dict[str, Any]:
    """The settings a resumed run must share with the first: model, preprocessing, caption search, id scheme.

    ``id_from`` is the resolved scheme (never ``auto``) and ``id_column`` the ``--id-column`` given:
    resuming with ids made another way would caption every picture again under a second id.
    Device, precision, batch size and workers are execution details and may change between
    attempts (a job pre-empted on a GPU node may resume on a CPU node). ``--min-confidence`` is
    not one of them: it only labels captioned rows, so the store relabels the output when it
    changes (``OutputStore.open(min_confidence=...)``).
    """
    return {
        "model": model_identity(meta),
        "preprocess": meta.get("preprocess"),
        "beam": to_dict(beam),
        "id_from": id_from,
        "id_column": id_column,
    }


def output_summary(final: Any, processed: int) -> dict[str, Any]:
    """Summary lines about the output file, told apart from what this process captioned.

    ``final`` is the store's :class:`~batchcap.outputs.store.FinalizeSummary`. Rows added since the
    last finalise include those an interrupted attempt committed before this run started:
    they are counted as ``added to output`` and named, so 128 rows resumed plus 272
    captioned now reads as 400 added, 128 of them from the earlier attempt.
    """
    added = final.rows_new + final.rows_replaced
    extra: dict[str, Any] = {
        "rows in output": final.rows_total,
        "added to output": final.rows_new,
        "replaced rows": final.rows_replaced,
    }
    earlier = max(0, added - processed)
    if earlier:
        extra["from earlier attempts"] = f"{earlier} (committed before an interruption, now in the output)"
    return extra


def _ok_row(
    item: ItemResult,
    text: str,
    score: float,
    n_best: tuple[tuple[str, float], ...],
    n: int,
    model: str,
    now: dt.datetime,
    logprob: float | None = None,
    confidence: float | None = None,
    min_confidence: float | None = None,
) -> dict[str, Any]:
    return {
        "id": item.item.id,
        "source": item.item.source,
        "caption": text,
        "score": score,
        "n_best": [{"caption": c, "score": s} for c, s in n_best[:n]] if n > 1 else None,
        "status": label(OK, confidence, min_confidence),
        "error": None,
        "width": item.width,
        "height": item.height,
        "size": item.item.size,
        "mtime_ns": item.item.mtime_ns,
        "model": model,
        "created_at": now,
        "logprob": logprob,
        "confidence": confidence,
    }


def _failed_row(item: ItemResult, model: str, now: dt.datetime) -> dict[str, Any]:
    return {
        "id": item.item.id,
        "source": item.item.source,
        "caption": None,
        "score": None,
        "n_best": None,
        "status": item.status,
        "error": item.error,
        "width": item.width,
        "height": item.height,
        "size": item.item.size,
        "mtime_ns": item.item.mtime_ns,
        "model": model,
        "created_at": now,
    }


class _LazyCaptioner:
    """Builds the :class:`~batchcap.pipeline.captioner.Captioner` on first use.

    A picture that gets no caption moves from ``batch.ok`` to ``batch.failed``
    (:func:`batchcap.pipeline.captioner.caption_batch`), so it is written and counted as a failure.
    """

    def __init__(self, model_path: Path, encoder_weights: str | None, runtime: RuntimeConfig, beam: BeamConfig) -> None:
        self.model_path, self.encoder_weights = model_path, encoder_weights
        self.runtime, self.beam = runtime, beam
        self._captioner: Any = None

    def __call__(self, batch: Batch) -> list[Any]:

        if self._captioner is None:
            self._captioner = Captioner(load_model(self.model_path), self.runtime, self.beam, self.encoder_weights)
        return caption_batch(self._captioner, batch)


def _fault_notes(store: OutputStore) -> dict[str, str]:
    """Summary lines for damaged parts the store set aside on open."""
    if not store.set_aside:
        return {}
    return {
        "damaged parts": f"{len(store.set_aside)} set aside in {store.set_aside[0][0].parent}; "
        "their rows were captioned again"
    }


def run_job(
    cfg: RunConfig,
    model_path: Path,
    beam: BeamConfig,
    runtime: RuntimeConfig,
    policy: ImagePolicy,
    encoder_weights: str | None = None,
    stream: TextIO | None = None,
) -> RunResult:
    """Caption every input of ``cfg`` not yet in ``cfg.out``; returns the exit code and summary.

    SIGTERM/SIGINT stop it cleanly (:mod:`batchcap.pipeline.interrupt`): rows already captioned are
    committed, the output is not finalised, and the exit code is ``EXIT_INTERRUPTED``.
    Raises ``OutputUnwritable`` before any model or image work when ``cfg.out`` cannot be
    written, and ``OutputIOError`` when a write fails on the way (a full disk).
    """
    stream = stream if stream is not None else sys.stderr
    out = Path(cfg.out)
    check_output_location(cfg.out)
    # before anything is created; the output and its parts are Parquet files too, so a folder or
    # pattern of tables must not read them
    sources = open_sources(
        cfg.sources,
        cfg.files_from,
        policy,
        cfg.id_column,
        exclude=(out, work_dir_for(out)),
        id_from=cfg.id_from,
        path_column=cfg.path_column,
    )
    sources = sources.surveyed()  # the ids that repeat, so that workers need not remember every id
    check_output_writable(out, work_dir_for(out))
    max_failures = parse_max_failures(cfg.max_failures)
    meta = read_metadata(model_path)
    preprocess = from_dict(Preprocess, meta["preprocess"])
    identity = model_identity(meta)
    run_config = _run_configuration(cfg, model_path, meta, identity, beam, runtime, policy, sources.id_scheme)
    with StopSignals(stream, EXIT_INTERRUPTED) as stop, hold_lock(out):
        store = OutputStore.open(
            out,
            cfg.format,
            resume_settings(meta, beam, sources.id_scheme, cfg.id_column),
            run_config,
            overwrite=cfg.overwrite,
            commit_every=cfg.commit_every,
            min_confidence=cfg.min_confidence,
        )
        for path, reason in store.set_aside:
            print(
                f"batchcap: warning: part {path.name} is damaged ({reason}); moved to {path.parent}, "
                "its rows are captioned again",
                file=stream,
                flush=True,
            )
        rows = _BatchRows(
            _LazyCaptioner(model_path, encoder_weights, runtime, beam),
            cfg,
            beam,
            identity,
            preprocess,
            policy,
            runtime.device,
        )
        with Progress(
            sources.count(cfg.shard_index, cfg.shard_count), log_every=cfg.log_every, stream=stream
        ) as progress:
            batches = iter_batches(
                sources,
                preprocess,
                policy,
                batch_size=runtime.batch_size,
                workers=runtime.workers,
                shard_index=cfg.shard_index,
                shard_count=cfg.shard_count,
                done=store.done,
                pin_memory=runtime.device.startswith("cuda"),
            )
            ignored = IgnoredFiles(out)
            finished = False
            try:
                finished = _caption_batches(
                    batches, rows, BackgroundWriter(store, cfg.commit_seconds), progress, stop, ignored
                )
            finally:
                if not finished:
                    ignored.discard()
            if not finished:
                notes = {
                    **_fault_notes(store),
                    "interrupted": (
                        f"by {stop.requested}: {store.rows_added} rows of this run committed, output not "
                        "finalised; rerun the same command to resume"
                    ),
                }
                return RunResult(EXIT_INTERRUPTED, progress.summary(str(out), extra=notes))
            processed = progress.processed
            final = store.finalize()
            progress.ignored_note = ignored.finish()  # a complete pass: its list replaces the last one
            extra = _finished_notes(store, final, processed, cfg.min_confidence, stop.requested)
            summary = progress.summary(str(out), extra=extra)
    failed = sum(progress.failed.values())
    if max_failures.exceeded(failed, processed):
        print(f"error: {failed} of {processed} inputs failed, more than --max-failures {cfg.max_failures}", file=stream)
        return RunResult(EXIT_TOO_MANY_FAILURES, summary)
    return RunResult(EXIT_OK, summary)


def _run_configuration(
    cfg: RunConfig,
    model_path: Path,
    meta: dict[str, Any],
    identity: str,
    beam: BeamConfig,
    runtime: RuntimeConfig,
    policy: ImagePolicy,
    id_scheme: str,
) -> dict[str, Any]:
    """What is stored beside the output, so that a result can be explained months later."""
    return {
        "batchcap_version": __version__,
        "started_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(),
        "model": identity,
        "model_path": str(model_path),
        "run": to_dict(cfg),
        "beam": to_dict(beam),
        "runtime": to_dict(runtime),
        "image_policy": to_dict(policy),
        "preprocess": meta.get("preprocess"),
        "ids": id_scheme,
    }


class _BatchRows:
    """One batch in, its output rows out: captions for the pictures that decoded, failure rows for the rest."""

    def __init__(
        self,
        captioner: _LazyCaptioner,
        cfg: RunConfig,
        beam: BeamConfig,
        identity: str,
        preprocess: Preprocess,
        policy: ImagePolicy,
        device: str,
    ) -> None:
        self.captioner, self.cfg, self.beam, self.identity = captioner, cfg, beam, identity
        self.preprocess, self.policy, self.device = preprocess, policy, device

    def __call__(self, batch: Batch) -> list[dict[str, Any]]:
        now = dt.datetime.now(dt.timezone.utc)
        rows: list[dict[str, Any]] = []
        if batch.encoded_rows:  # --decode-on-device: finish decoding where the model runs
            fill_batch(batch, self.preprocess, self.policy, self.device)
        if batch.ok:
            captions = self.captioner(batch)
            rows += [
                _ok_row(
                    item,
                    c.text,
                    c.score,
                    c.n_best,
                    self.beam.n_best,
                    self.identity,
                    now,
                    logprob=c.logprob,
                    confidence=c.confidence,
                    min_confidence=self.cfg.min_confidence,
                )
                for item, c in zip(batch.ok, captions, strict=True)
            ]
        rows += [_failed_row(item, self.identity, now) for item in batch.failed]
        return rows


def _caption_batches(
    batches: Any,
    rows: _BatchRows,
    writer: BackgroundWriter,
    progress: Progress,
    stop: StopSignals,
    ignored: IgnoredFiles,
) -> bool:
    """Caption and write every batch; False when a signal stopped it first (committed rows are kept)."""
    try:
        for batch in batches:
            if stop.requested:  # arrived while this batch was on its way: take it no further
                return False
            writer.add(rows(batch))
            ignored.add(batch.ignored_paths)
            progress.advance(
                ok=len(batch.ok),
                failed=Counter(i.status for i in batch.failed),
                skipped=batch.skipped,
                ignored=batch.ignored,
            )
            if stop.requested:
                return False
        return True
    finally:
        batches.close()  # stops the decoding workers
        writer.close()  # commits every captioned row (also on the way out of a crash)


def _finished_notes(
    store: OutputStore,
    final: Any,
    processed: int,
    min_confidence: float | None,
    signal_name: str | None,
) -> dict[str, str]:
    """The summary lines of a run that finalised its output."""
    extra = output_summary(final, processed)
    if min_confidence is not None:
        extra["low confidence"] = f"{final.rows_low_confidence} (set aside below {min_confidence:g})"
    if final.rows_relabelled:
        threshold = f"--min-confidence {min_confidence:g}" if min_confidence is not None else "no --min-confidence"
        extra["relabelled"] = f"{final.rows_relabelled} (status ok/low_confidence set again for {threshold})"
    if processed == 0:
        extra["note"] = "nothing new to caption: every input is already in the output"
    elif signal_name:
        extra["note"] = f"{signal_name} arrived after the last batch: the output was finished first"
    extra.update(_fault_notes(store))
    return extra
