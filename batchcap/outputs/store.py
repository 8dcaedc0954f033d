"""The output stage: Parquet / JSONL sinks with exactly-once resume.

Layout on disk, for ``--out captions.parquet``::

    captions.parquet                      the final output (appears atomically)
    captions.parquet.lock                 see ``batchcap.outputs.lock``
    captions.parquet.batchcap-work/
        run.json                          resume settings + full run config of this run
        part-00000001-3f2a9c.parquet      committed batches of rows, in sequence order
        .tmp-*                            a part being written (ignored, removed on open)
        damaged/                          parts that could not be read, set aside with a note of why

Rows are buffered and committed as Parquet *part files* (always Parquet, whatever the
final format): write a temp file in the work folder, fsync, then ``os.rename`` it to its
final name -- the rename is the commit marker, written last. A ``kill -9`` at any
instant loses at most the uncommitted buffer and never leaves a half part behind.

``finalize`` streams the existing final output (minus the ids found in parts) plus all
parts (a later part's row for an id replaces an earlier one) into ``<out>.tmp-*``,
fsyncs it, ``os.replace``s it onto ``<out>`` and only then deletes the parts. Killed
between the replace and the clean-up, the next run merges again and gets the same set
of rows, because merging replaces by id.

``min_confidence`` is a label, not a resume setting: it decides only whether a captioned row's
status is ``ok`` or ``low_confidence`` (:func:`batchcap.outputs.schema.label`). It is recorded in the
metadata beside the resume settings, and ``finalize`` labels the rows it writes with the current
threshold. A rerun with another threshold (or none) over a finished output therefore captions
nothing and rewrites the output once, through the same temp file + ``os.replace``, with only the
statuses changed; a rerun with the same threshold rewrites nothing. The final output's rows are
relabelled when it recorded another threshold, and the parts of interrupted attempts always (each
attempt may have had its own); the rows of this run arrive labelled. Outputs written before the
threshold left the resume settings (``resume_settings.min_confidence``) are read the same way.

A committed part that cannot be read back (a disk fault, a work folder copied badly) is
moved to ``damaged/`` inside the work folder beside a ``.why.txt`` note; its rows are not
``done``, so the run captions them again (``OutputStore.set_aside`` lists them). A failed
write (``ENOSPC``) removes its temp file and raises :class:`OutputIOError`; every part
committed before it stays, and the rerun resumes.

All of this assumes one writer per output: hold ``batchcap.outputs.lock.hold_lock(out)`` around
``OutputStore.open`` ... ``finalize``. The output's folder must rename atomically and
support ``flock`` (see ``batchcap.outputs.lock``).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import json
import os
import re
import secrets
import shutil
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from batchcap.config import option_name
from batchcap.fileio import atomic_write_bytes, fsync_dir, fsync_file
from batchcap.outputs.schema import (
    COLUMNS,
    LOW_CONFIDENCE,
    METADATA_KEY,
    METADATA_KEY_BYTES,
    SCHEMA,
    SCHEMA_VERSION,
    conform_table,
    flatten_settings,
    infer_format,
    label,
    label_table,
    row_to_json,
)
from batchcap.version import __version__

WORK_SUFFIX = ".batchcap-work"
META_SUFFIX = ".meta.json"

_COLUMN_SET = frozenset(COLUMNS)
DONE_COLUMNS = ["id", "size", "mtime_ns", "status"]

# Failures that say nothing about the file's content: the next run tries these again
# (a fixed permission, a re-downloaded shard). Every other failure with an unchanged
# fingerprint would fail the same way again, so it counts as done.
RETRY_STATUSES = frozenset({"missing", "unreadable", "shard_error"})

#: Resume settings that outputs written before they were recorded implied: such an output
#: resumes as before (ids were always made ``relative``; the ending rule was on and any word
#: could follow itself, so such an output continues with ``--allow-repeated-words``; models had no
#: caption styles, so ``--style`` was ``auto``; captions were not reranked, so such an output
#: continues with ``--consensus-weight 0``).
UNRECORDED_SETTINGS: dict[str, Any] = {
    "id_from": "relative",
    "beam.ending_rule": True,
    "beam.allow_repeated_words": True,
    "beam.style": "auto",
    "beam.consensus_weight": 0.0,
}
#: Resume settings not compared with an output written before they were recorded: what it was made
#: with is not known, so it resumes as before.
UNKNOWN_WHEN_UNRECORDED = frozenset({"id_column"})

ROW_GROUP_ROWS = 65_536  # final Parquet row groups: large enough to scan fast, small in RAM
_PART_RE = re.compile(r"^part-(\d{8})-([0-9a-f]+)\.parquet$")

Fingerprint = tuple[int | None, int | None]


class ResumeRefused(Exception):
    """An existing output cannot be continued (other settings, or unreadable); says what to do."""


@dataclass(frozen=True)
class FinalizeSummary:
    """What ``finalize`` wrote: all rows in the output, new ids, ids whose row was replaced."""

    path: str
    rows_total: int
    rows_new: int
    rows_replaced: int
    rewritten: bool
    rows_dropped: int = 0  # stale retry-status rows (see ``RETRY_STATUSES``) not emitted again
    rows_relabelled: int = 0  # rows whose status changed under the current ``min_confidence``
    rows_low_confidence: int = 0  # rows of the output with status ``low_confidence``


def work_dir_for(out: str | os.PathLike[str]) -> Path:
    """The work folder that holds run.json and committed parts for ``out``."""
    return Path(str(out) + WORK_SUFFIX)


def meta_path_for(out: str | os.PathLike[str]) -> Path:
    """Where a JSONL output's run configuration lives."""
    return Path(str(out) + META_SUFFIX)


class OutputStore:
    """One output file being written: buffered rows, committed parts, resume state.

    Build it with ``OutputStore.open``; then ``add`` rows, and ``finalize`` at the end.
    ``done`` maps every id already in the output (final file or committed parts) whose
    status is not in ``RETRY_STATUSES`` to its input fingerprint ``(size, mtime_ns)``.
    """

    def __init__(
        self,
        out: Path,
        fmt: str,
        meta: dict[str, Any],
        commit_every: int,
        done: dict[str, Fingerprint],
        previous_rows: int,
        next_seq: int,
        final_retry_rows: int = 0,
        final_min_confidence: float | None = None,
    ) -> None:
        self.out = out
        self.fmt = fmt
        self.meta = meta
        self.commit_every = commit_every
        self.done = done
        self.previous_rows = previous_rows
        self.rows_added = 0
        self.parts_committed = 0
        self._next_seq = next_seq
        self._first_seq = next_seq  # parts below this came from earlier, killed attempts
        self._final_retry_rows = final_retry_rows
        self._final_min_confidence = final_min_confidence  # the threshold the final output's rows carry
        self._buffer: list[dict[str, Any]] = []
        self._finalized = False
        self.set_aside: list[tuple[Path, str]] = []  # damaged parts moved aside on open, and why

    @property
    def work_dir(self) -> Path:
        return work_dir_for(self.out)

    # -- opening ---------------------------------------------------------------------

    @classmethod
    def open(
        cls,
        out: str | os.PathLike[str],
        fmt: str | None,
        resume_settings: dict[str, Any],
        run_config: dict[str, Any],
        overwrite: bool = False,
        commit_every: int = 512,
        min_confidence: float | None = None,
    ) -> OutputStore:
        """Open ``out`` for writing, continuing a previous run unless ``overwrite``.

        ``min_confidence`` labels the rows (``ok`` / ``low_confidence``) when the output is
        finalised; unlike ``resume_settings`` it may differ from the earlier run's. Raises
        ``ResumeRefused`` when an earlier run (its work folder, or the final output's
        metadata) used different ``resume_settings`` or another format, or cannot be read.
        Call it while holding ``hold_lock(out)``.
        """
        if commit_every < 1:
            raise ValueError("commit_every must be at least 1")
        out = Path(out)
        fmt = infer_format(out, fmt)
        meta = {
            "schema_version": SCHEMA_VERSION,
            "batchcap_version": __version__,
            "format": fmt,
            "resume_settings": _jsonable(resume_settings),
            "min_confidence": min_confidence,
            "run_config": _jsonable(run_config),
        }
        work = work_dir_for(out)
        if overwrite:
            _remove_outputs(out)
        _remove_stale_temps(out)

        final_min_confidence = None
        if out.exists():
            final_meta = _final_meta(out, fmt)
            _check_previous(out, final_meta, meta, what="the existing output")
            final_min_confidence = _min_confidence_of(final_meta or {})
        run_json = work / "run.json"
        parts = _list_parts(work)
        if run_json.exists():
            try:
                previous = json.loads(run_json.read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                raise ResumeRefused(
                    f"cannot read {run_json} ({exc}); rerun with --overwrite to start over, or choose another --out"
                ) from exc
            _check_previous(out, previous, meta, what="the unfinished run in " + str(work))
        elif parts:
            raise ResumeRefused(
                f"{work} holds committed parts but no run.json, so their settings "
                "are unknown; rerun with --overwrite to start over, "
                "or choose another --out"
            )
        with _io_errors(run_json):
            work.mkdir(parents=True, exist_ok=True)
            if not run_json.exists():
                atomic_write_bytes(run_json, (json.dumps(meta, indent=2, sort_keys=True) + "\n").encode())

        done: dict[str, Fingerprint] = {}
        seen: set[str] = set()
        final_retry_rows = 0
        if out.exists():
            for chunk in _read_done_final(out, fmt):
                final_retry_rows += _fold_done(done, seen, chunk)
        set_aside = []
        for _, path in parts:
            try:
                rows = _read_done_parquet(path)
            except ResumeRefused as exc:
                reason = str(exc.__cause__ or exc)
                with _io_errors(work):
                    set_aside.append((_set_aside(work, path, reason), reason))
                continue
            _fold_done(done, seen, rows)
        next_seq = (parts[-1][0] + 1) if parts else 1
        store = cls(
            out,
            fmt,
            meta,
            commit_every,
            done,
            len(seen),
            next_seq,
            final_retry_rows,
            final_min_confidence,
        )
        store.set_aside = set_aside
        return store

    # -- writing ---------------------------------------------------------------------

    def add(self, rows: Iterable[dict[str, Any]]) -> None:
        """Buffer ``rows`` (plain dicts keyed by ``COLUMNS``); commit once ``commit_every`` are held."""
        if self._finalized:
            raise RuntimeError("add() after finalize()")
        now = None
        for row in rows:
            unknown = row.keys() - _COLUMN_SET
            if unknown:
                raise ValueError(f"unknown output columns {sorted(unknown)}; known: {list(COLUMNS)}")
            if not isinstance(row.get("id"), str) or not isinstance(row.get("status"), str):
                raise ValueError(f"every row needs a string id and status, got {row!r}")
            if row.get("created_at") is None:
                now = now or dt.datetime.now(dt.timezone.utc)
                row = {**row, "created_at": now}
            self._buffer.append(row)
        if len(self._buffer) >= self.commit_every:
            self.commit()

    def commit(self) -> Path | None:
        """Make the buffered rows durable as one part file; ``None`` when nothing is buffered."""
        if not self._buffer:
            return None
        table = pa.Table.from_pylist(self._buffer, schema=SCHEMA)
        work = self.work_dir
        name = f"part-{self._next_seq:08d}-{secrets.token_hex(4)}.parquet"
        tmp = work / f".tmp-{secrets.token_hex(6)}.parquet"
        with _io_errors(work, cleanup=[tmp]):
            pq.write_table(table, tmp, compression="zstd")
            fsync_file(tmp)
            os.rename(tmp, work / name)  # the commit marker: a part exists only once complete
        with _io_errors(work):
            fsync_dir(work)
        for row in self._buffer:
            fingerprint = (row.get("size"), row.get("mtime_ns"))
            if row["status"] in RETRY_STATUSES:
                self.done.pop(row["id"], None)
            else:
                self.done[row["id"]] = fingerprint
        self.rows_added += len(self._buffer)
        self.parts_committed += 1
        self._next_seq += 1
        self._buffer = []
        return work / name

    def finalize(self) -> FinalizeSummary:
        """Commit, merge the previous output and all parts into ``out`` atomically, clean up.

        Call it after a full pass over the inputs. Rows with a ``RETRY_STATUSES`` status
        are never ``done``, so that pass emitted a fresh row for every such input still in
        the sources; older ones (from the previous output or a killed attempt) are stale --
        a ``shard_error`` for a shard that now reads to its end -- and are dropped.
        """
        self.commit()
        self._finalized = True
        out, work = self.out, self.work_dir
        parts = _list_parts(work)
        same_labels = self._final_min_confidence == self.meta["min_confidence"]
        if not parts and out.exists() and not self._final_retry_rows and same_labels:
            # Nothing new: keep the output as it is (a finished rerun rewrites nothing).
            statuses = _count_final_statuses(out, self.fmt)
            _remove_work(work)
            return FinalizeSummary(
                str(out),
                sum(statuses.values()),
                0,
                0,
                rewritten=False,
                rows_low_confidence=statuses[LOW_CONFIDENCE],
            )

        # Which part row is the last one for its id (later parts replace earlier rows),
        # and whether it is kept (not a stale retry-status row of an earlier attempt).
        keep_masks: list[list[bool]] = [[] for _ in parts]
        part_ids: set[str] = set()
        kept_ids: set[str] = set()
        for index in range(len(parts) - 1, -1, -1):
            seq, path = parts[index]
            table = pq.read_table(path, columns=["id", "status"])
            ids, statuses = table.column("id").to_pylist(), table.column("status").to_pylist()
            stale = seq < self._first_seq
            mask = [False] * len(ids)
            for row in range(len(ids) - 1, -1, -1):
                if ids[row] not in part_ids:
                    part_ids.add(ids[row])
                    if not (stale and statuses[row] in RETRY_STATUSES):
                        kept_ids.add(ids[row])
                        mask[row] = True
            keep_masks[index] = mask

        tmp = out.with_name(f"{out.name}.tmp-{secrets.token_hex(6)}")
        meta_tmp = out.with_name(f"{out.name}.tmp-{secrets.token_hex(6)}")
        with _io_errors(out, cleanup=[tmp]):
            if self.fmt == "parquet":
                kept_old, replaced, dropped, relabelled, low = self._write_parquet(
                    tmp, parts, keep_masks, part_ids, kept_ids
                )
            else:
                # The meta file goes first: whenever the .jsonl exists, its meta describes it.
                atomic_write_bytes(
                    meta_path_for(out), (json.dumps(self.meta, indent=2, sort_keys=True) + "\n").encode(), tmp=meta_tmp
                )
                kept_old, replaced, dropped, relabelled, low = self._write_jsonl(
                    tmp, parts, keep_masks, part_ids, kept_ids
                )
            fsync_file(tmp)
            os.replace(tmp, out)
        with _io_errors(out.parent):
            fsync_dir(out.parent)
        _remove_work(work)
        return FinalizeSummary(
            str(out),
            kept_old + len(kept_ids),
            len(kept_ids) - replaced,
            replaced,
            rewritten=True,
            rows_dropped=dropped + len(part_ids) - len(kept_ids),
            rows_relabelled=relabelled,
            rows_low_confidence=low,
        )

    def _relabels(self, seq: int | None) -> bool:
        """Whether the rows of the final output (``seq`` None) or of part ``seq`` are labelled again
        as they are written: the final output's when it recorded another ``min_confidence``, and
        always those of interrupted attempts (each may have run with another threshold; labelling
        is idempotent). This run's own parts arrive labelled with this run's threshold."""
        if seq is None:
            return self._final_min_confidence != self.meta["min_confidence"]
        return seq < self._first_seq

    def _write_parquet(
        self,
        tmp: Path,
        parts: list[tuple[int, Path]],
        keep_masks: list[list[bool]],
        part_ids: set[str],
        kept_ids: set[str],
    ) -> tuple[int, int, int, int, int]:
        schema = SCHEMA.with_metadata({METADATA_KEY: json.dumps(self.meta, sort_keys=True)})
        id_set = pa.array(sorted(part_ids), type=pa.string())
        kept_set = pa.array(sorted(kept_ids), type=pa.string())
        retry_set = pa.array(sorted(RETRY_STATUSES), type=pa.string())
        threshold = self.meta["min_confidence"]
        kept_old = replaced = dropped = relabelled = low = 0
        with pq.ParquetWriter(tmp, schema, compression="zstd") as writer:
            buffer = _RowGroupBuffer(writer, schema)
            if self.out.exists():
                source = pq.ParquetFile(self.out)
                for group in range(source.num_row_groups):
                    table = conform_table(source.read_row_group(group))
                    n_rows = table.num_rows
                    superseded = pc.is_in(table.column("id"), value_set=id_set)
                    stale = pc.fill_null(pc.is_in(table.column("status"), value_set=retry_set), False)
                    drop = pc.or_(superseded, stale)
                    n_replaced = pc.sum(pc.is_in(table.column("id"), value_set=kept_set)).as_py() or 0
                    if pc.any(drop).as_py():
                        table = table.filter(pc.invert(drop))
                    replaced += n_replaced
                    dropped += n_rows - table.num_rows - n_replaced
                    kept_old += table.num_rows
                    if self._relabels(None):
                        table, changed = label_table(table, threshold)
                        relabelled += changed
                    low += _count_low(table)
                    buffer.add(table)
            for (seq, path), mask in zip(parts, keep_masks):
                table = conform_table(pq.read_table(path)).filter(pa.array(mask, type=pa.bool_()))
                if self._relabels(seq):  # rows an earlier attempt committed under another threshold
                    table, changed = label_table(table, threshold)
                    relabelled += changed
                low += _count_low(table)
                buffer.add(table)
            buffer.flush()
        return kept_old, replaced, dropped, relabelled, low

    def _write_jsonl(
        self,
        tmp: Path,
        parts: list[tuple[int, Path]],
        keep_masks: list[list[bool]],
        part_ids: set[str],
        kept_ids: set[str],
    ) -> tuple[int, int, int, int, int]:
        threshold = self.meta["min_confidence"]
        relabel_old = self._relabels(None)
        kept_old = replaced = dropped = relabelled = low = 0
        with open(tmp, "w", encoding="utf-8", newline="\n") as dst:
            if self.out.exists():
                with open(self.out, encoding="utf-8") as src:
                    for line in src:
                        if not line.strip():
                            continue
                        old = json.loads(line)
                        if old["id"] in kept_ids:
                            replaced += 1
                            continue
                        if old["id"] in part_ids or old.get("status") in RETRY_STATUSES:
                            dropped += 1
                            continue
                        status = old.get("status")
                        if relabel_old:
                            status = label(status, old.get("confidence"), threshold)
                        if status != old.get("status"):  # only the status changes, in place
                            old["status"] = status
                            line = json.dumps(old, ensure_ascii=False, allow_nan=False)
                            relabelled += 1
                        low += status == LOW_CONFIDENCE
                        dst.write(line if line.endswith("\n") else line + "\n")
                        kept_old += 1
            for (seq, path), mask in zip(parts, keep_masks):
                source = pq.ParquetFile(path)
                relabel = self._relabels(seq)
                offset = 0
                for group in range(source.num_row_groups):
                    rows = source.read_row_group(group).to_pylist()
                    for i, row in enumerate(rows):
                        if mask[offset + i]:
                            status = label(row["status"], row["confidence"], threshold) if relabel else row["status"]
                            if status != row["status"]:
                                row["status"] = status
                                relabelled += 1
                            low += status == LOW_CONFIDENCE
                            dst.write(row_to_json(row) + "\n")
                    offset += len(rows)
        return kept_old, replaced, dropped, relabelled, low


def read_output_meta(out: str | os.PathLike[str], fmt: str | None = None) -> dict[str, Any] | None:
    """The ``batchcap`` metadata of a finished output (Parquet footer or ``.meta.json``)."""
    return _final_meta(Path(out), infer_format(out, fmt))


# -- helpers -------------------------------------------------------------------------


class _RowGroupBuffer:
    """Gathers small tables and writes them as row groups of about ``ROW_GROUP_ROWS`` rows."""

    def __init__(self, writer: pq.ParquetWriter, schema: pa.Schema) -> None:
        self.writer, self.schema = writer, schema
        self.tables: list[pa.Table] = []
        self.rows = 0

    def add(self, table: pa.Table) -> None:
        if table.num_rows:
            self.tables.append(table)
            self.rows += table.num_rows
        if self.rows >= ROW_GROUP_ROWS:
            self.flush()

    def flush(self) -> None:
        if self.tables:
            merged = pa.concat_tables(self.tables).replace_schema_metadata(self.schema.metadata)
            self.writer.write_table(merged, row_group_size=max(self.rows, 1))
        self.tables, self.rows = [], 0


def _jsonable(value: Any) -> Any:
    """``value`` as plain JSON types (tuples become lists), so comparisons are like for like."""
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def _check_previous(out: Path, previous: dict[str, Any] | None, meta: dict[str, Any], what: str) -> None:
    if previous is None:
        raise ResumeRefused(
            f"{out} exists but was not written by batchcap (no run configuration found); "
            "rerun with --overwrite to replace it, or choose another --out"
        )
    version = previous.get("schema_version", 1)
    if version != meta["schema_version"]:
        raise ResumeRefused(
            f"refusing to continue {out}: {what} has output schema version {version}, this batchcap writes "
            f"version {meta['schema_version']} (score means the search's ranking score since version 2; the "
            "old per-token score is the logprob column). Finish it with the batchcap that started it, "
            "or write new captions to another --out, or rerun with --overwrite to start over"
        )
    if previous.get("format", meta["format"]) != meta["format"]:
        raise ResumeRefused(
            f"{what} is {previous.get('format')}, not {meta['format']}; "
            "rerun with --overwrite to start over, or choose another --out"
        )
    implied = {k: v for k, v in UNRECORDED_SETTINGS.items() if k in flatten_settings(meta["resume_settings"])}
    recorded = _without_min_confidence(previous.get("resume_settings") or {})
    old = flatten_settings({**implied, **recorded})
    new = flatten_settings(
        {k: v for k, v in meta["resume_settings"].items() if k in recorded or k not in UNKNOWN_WHEN_UNRECORDED}
    )
    differ = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    if differ:
        changes = "; ".join(f"{option_name(k)}: {json.dumps(old.get(k))} -> {json.dumps(new.get(k))}" for k in differ)
        also = ""
        if "id_from" in differ and old.get("id_from") is not None:
            also = f", or pass --id-from {old['id_from']} to continue it with the ids it has"
        elif "id_column" in differ:
            given = f"--id-column {old['id_column']}" if old.get("id_column") else "no --id-column"
            also = f", or pass {given} to continue it with the ids it has"
        raise ResumeRefused(
            f"refusing to continue {out}: {what} was made with other settings ({changes}). "
            "Mixing them would put captions from different settings in one file; rerun with "
            f"--overwrite to start over, or choose another --out{also}"
        )


def _without_min_confidence(settings: dict[str, Any]) -> dict[str, Any]:
    """Resume settings as batchcap writes them now: the threshold used to be one of them."""
    return {k: v for k, v in settings.items() if k != "min_confidence"}


def _min_confidence_of(meta: dict[str, Any]) -> float | None:
    """The ``min_confidence`` an output's rows were labelled with, also from outputs that
    recorded it among their resume settings."""
    if "min_confidence" in meta:
        return meta["min_confidence"]
    return (meta.get("resume_settings") or {}).get("min_confidence")


def _final_meta(out: Path, fmt: str) -> dict[str, Any] | None:
    try:
        if fmt == "parquet":
            raw = (pq.read_schema(out).metadata or {}).get(METADATA_KEY_BYTES)
            return json.loads(raw) if raw else None
        meta = meta_path_for(out)
        return json.loads(meta.read_text(encoding="utf-8")) if meta.exists() else None
    except (OSError, ValueError, pa.ArrowException) as exc:
        raise ResumeRefused(
            f"cannot read the existing output {out} ({exc}); rerun with --overwrite "
            "to replace it, or choose another --out"
        ) from exc


def _fold_done(
    done: dict[str, Fingerprint], seen: set[str], rows: Iterable[tuple[str, int | None, int | None, str]]
) -> int:
    """Fold rows (in order) into ``done``; returns how many had a retry status."""
    retry = 0
    for rid, size, mtime_ns, status in rows:
        seen.add(rid)
        if status in RETRY_STATUSES:
            done.pop(rid, None)
            retry += 1
        else:
            done[rid] = (size, mtime_ns)
    return retry


def _read_done_parquet(path: Path) -> Iterator[tuple[str, int | None, int | None, str]]:
    try:
        table = pq.read_table(path, columns=DONE_COLUMNS)
    except (OSError, pa.ArrowException) as exc:
        raise ResumeRefused(
            f"cannot read {path} ({exc}); rerun with --overwrite to start over, or choose another --out"
        ) from exc
    return zip(*(table.column(c).to_pylist() for c in DONE_COLUMNS))


def _read_done_final(out: Path, fmt: str) -> Iterator[Iterable[tuple[str, int | None, int | None, str]]]:
    if fmt == "parquet":
        yield _read_done_parquet(out)
        return
    rows = []
    with open(out, encoding="utf-8") as src:
        for number, line in enumerate(src, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                rows.append((obj["id"], obj.get("size"), obj.get("mtime_ns"), obj.get("status")))
            except (ValueError, KeyError, TypeError) as exc:
                raise ResumeRefused(
                    f"{out} line {number} is not a batchcap row ({exc}); rerun with "
                    "--overwrite to replace it, or choose another --out"
                ) from exc
            if len(rows) >= 65_536:
                yield rows
                rows = []
    yield rows


def _count_final_statuses(out: Path, fmt: str) -> Counter[str | None]:
    """How many rows of the finished output have each status."""
    if fmt == "parquet":
        return Counter(pq.read_table(out, columns=["status"]).column("status").to_pylist())
    with open(out, encoding="utf-8") as src:
        return Counter(json.loads(line).get("status") for line in src if line.strip())


def _count_low(table: pa.Table) -> int:
    return pc.sum(pc.equal(table.column("status"), LOW_CONFIDENCE)).as_py() or 0


def _list_parts(work: Path) -> list[tuple[int, Path]]:
    """Committed parts in sequence order (temp files and strangers are not parts)."""
    if not work.is_dir():
        return []
    parts = []
    for entry in os.scandir(work):
        match = _PART_RE.match(entry.name)
        if match:
            parts.append((int(match.group(1)), Path(entry.path)))
    return sorted(parts)


def _remove_stale_temps(out: Path) -> None:
    """Temp files left by a killed run: never committed, so never part of the output."""
    for path in out.parent.glob(f"{_glob_escape(out.name)}.tmp-*"):
        path.unlink(missing_ok=True)
    work = work_dir_for(out)
    if work.is_dir():
        for path in work.glob(".tmp-*"):
            path.unlink(missing_ok=True)


def _glob_escape(name: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", name)


def _remove_outputs(out: Path) -> None:
    out.unlink(missing_ok=True)
    meta_path_for(out).unlink(missing_ok=True)
    shutil.rmtree(work_dir_for(out), ignore_errors=True)


def _remove_work(work: Path) -> None:
    """Parts first, run.json last: a folder without run.json never holds parts.

    Damaged parts set aside stay (with their notes) for the user to look at; the folder
    goes only when nothing else is left in it.
    """
    for _, path in _list_parts(work):
        path.unlink(missing_ok=True)
    if not (work / DAMAGED_DIR).is_dir():
        shutil.rmtree(work, ignore_errors=True)
        return
    for entry in os.scandir(work):
        if entry.name == DAMAGED_DIR:
            continue
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(entry.path, ignore_errors=True)
        else:
            Path(entry.path).unlink(missing_ok=True)


# -- faults --------------------------------------------------------------------------

DAMAGED_DIR = "damaged"


class OutputIOError(Exception):
    """Writing the output failed (a full disk, an I/O error): committed parts are kept, rerun resumes."""

    def __init__(self, path: Path, cause: OSError) -> None:
        self.path = path
        self.cause = cause
        reason = cause.strerror or str(cause)
        if _is_no_space(cause):
            advice = "free space and rerun"
        else:
            advice = "fix the cause and rerun"
        super().__init__(
            f"cannot write {path}: {reason}; {advice} (rows committed so far are kept and the rerun resumes)"
        )

    @property
    def no_space(self) -> bool:
        return _is_no_space(self.cause)


def _is_no_space(exc: OSError) -> bool:
    # pyarrow's OSError carries no errno, only "... [errno 28] No space left on device"
    return exc.errno in (errno.ENOSPC, errno.EDQUOT) or "No space left" in str(exc) or "[errno 28]" in str(exc)


@contextlib.contextmanager
def _io_errors(path: Path, cleanup: Iterable[Path] = ()) -> Iterator[None]:
    """OSError inside the block -> :class:`OutputIOError` naming ``path``, after removing ``cleanup``."""
    try:
        yield
    except OSError as exc:
        for leftover in cleanup:
            with contextlib.suppress(OSError):
                leftover.unlink(missing_ok=True)
        raise OutputIOError(path, exc) from exc


def _set_aside(work: Path, part: Path, reason: str) -> Path:
    """Move an unreadable part into ``work/damaged/`` with a note of why; returns its new path."""
    damaged = work / DAMAGED_DIR
    damaged.mkdir(exist_ok=True)
    target = damaged / part.name
    os.rename(part, target)
    note = (
        f"{part.name} could not be read back when a run resumed at "
        f"{dt.datetime.now(dt.timezone.utc).isoformat(timespec='seconds')}:\n"
        f"{reason}\n"
        "It was moved here and its rows were captioned again; it is not part of the output. "
        "Delete it once you have looked at it.\n"
    )
    atomic_write_bytes(damaged / (part.name + ".why.txt"), note.encode())
    fsync_dir(work)
    return target
