"""Combine finished part outputs (one per Slurm array task or shard) into one file, verified.

``batchcap run --shard I/N --out part-I.parquet`` leaves N part files; the merge step
checks them *before* writing anything, and refuses with a message that names the problem
when:

* a part is missing or unreadable (with ``expected_parts=N``, a part is named by the
  number at the end of its file name: ``part-0`` ... ``part-{N-1}``);
* the parts do not share one schema or one format, or were written by different output
  schema versions (``schema_version`` in their metadata: the ``score`` column changed
  meaning in version 2, so parts of versions 1 and 2 never mix; each version merges alone);
* an id occurs more than once (within a part or across parts);
* the parts were made with different models or caption settings (the ``model`` column,
  and the ``resume_settings`` of the run configuration stored in Parquet metadata key
  ``batchcap`` or beside a JSONL file as ``<part>.meta.json``, minus the keys that
  legitimately differ per shard);
* the row count or the ids do not match what the caller expected (``expected_count``,
  ``expected_ids`` from an input listing).

Only then are the rows streamed (a row group, or a line, at a time) into a temp file beside
``out`` that is ``os.replace``d into place: a refused or crashed merge leaves no output.
The ids are held in memory during verification (a dict entry per row, about 150 bytes: some
150 MB per million rows); the rows are not.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from batchcap.config import option_name
from batchcap.fileio import fsync_file
from batchcap.outputs.schema import METADATA_KEY_BYTES, OUTPUT_FORMATS, infer_format

# Run-configuration keys that differ between the parts of one job by design (which shard,
# where it was written, when, on which host/device). Any other difference means the parts
# were made with different models or caption settings and must not be mixed.
PER_PART_KEYS = frozenset(
    {
        "shard",
        "shards",
        "shard_index",
        "shard_count",
        "num_shards",
        "out",
        "output",
        "out_path",
        "path",
        "input",
        "inputs",
        "source",
        "sources",
        "started_at",
        "finished_at",
        "created_at",
        "updated_at",
        "time",
        "timestamp",
        "host",
        "hostname",
        "pid",
        "user",
        "slurm",
        "slurm_job_id",
        "job_id",
        "array_task_id",
        "device",
        "workers",
        "num_workers",
        "batch_size",
        "prefetch",
        "progress",
        "log_every",
        "max_failures",
        "overwrite",
        "resume",
        "incremental",
        "summary",
        "stats",
        "counts",
        "elapsed",
        "elapsed_s",
        "merge",
    }
)
_MAX_NAMED = 5  # how many offending ids/values a message lists before "and N more"


class MergeError(Exception):
    """The parts cannot be merged into a complete, consistent output; the message says why."""


@dataclass(frozen=True)
class MergeReport:
    """What a merge wrote: the output, its parts, and row counts (total, per part, per status)."""

    out: str
    fmt: str
    parts: tuple[str, ...]
    rows: int
    part_rows: tuple[int, ...]
    statuses: tuple[tuple[str, int], ...]
    models: tuple[str, ...]
    elapsed_s: float

    def summary(self) -> str:
        """One key=value line for logs (Slurm, cron)."""
        status = " ".join(f"{name}={count}" for name, count in self.statuses)
        return (
            f"merged parts={len(self.parts)} rows={self.rows} {status} out={self.out} elapsed_s={self.elapsed_s:.2f}"
        ).replace("  ", " ")


def read_listing(path: str | os.PathLike[str]) -> list[str]:
    """Ids from a listing file: one per line; blank lines are ignored, surrounding space stripped."""
    try:
        with open(path, encoding="utf-8") as f:
            return [line.strip() for line in f if line.strip()]
    except OSError as exc:
        raise MergeError(f"cannot read the expected listing {path}: {exc.strerror or exc}") from exc


def format_of(path: str | os.PathLike[str], fmt: str | None = None) -> str:
    """``"parquet"`` or ``"jsonl"``: ``fmt`` when given, else from the file suffix."""
    if fmt is not None and fmt not in OUTPUT_FORMATS:
        raise MergeError(f"unknown format {fmt!r}: use 'parquet' or 'jsonl'")
    try:
        return infer_format(path, fmt)
    except ValueError:
        raise MergeError(
            f"cannot tell the format of {path} from its suffix; name it .parquet or .jsonl, or pass the format"
        ) from None


def merge_outputs(
    parts: Sequence[str],
    out: str,
    *,
    fmt: str | None = None,
    expected_ids: Iterable[str] | None = None,
    expected_count: int | None = None,
    expected_parts: int | None = None,
) -> MergeReport:
    """Verify ``parts`` and write their rows, in part order, to ``out`` atomically.

    Raises :class:`MergeError` (and writes nothing) when a part is missing, unreadable or of
    another schema, an id repeats, the parts used different models/settings, or the result
    would not match ``expected_parts`` / ``expected_count`` / ``expected_ids``.
    """
    started = time.monotonic()
    if not parts:
        raise MergeError("no part files given")
    out_fmt = format_of(out, fmt)
    part_paths = [str(p) for p in parts]
    _check_part_names(part_paths, out, expected_parts)

    index = _IdIndex()
    infos = [_open_part(path, out_fmt, index, number) for number, path in enumerate(part_paths)]
    if len({info.name for info in infos}) < len(infos):  # same file names in other folders
        for info in infos:
            info.label = info.path
    _check_same_version(infos)
    _check_same_schema(infos)
    _check_same_settings(infos)
    index.check(infos)
    ids = index.owner
    _check_expected(ids, expected_count, expected_ids)

    meta = _merged_meta(infos)
    if out_fmt == "parquet":
        _write_parquet(infos, out, meta)
    else:
        _write_jsonl(infos, out, meta)

    statuses: Counter[str] = Counter()
    for info in infos:
        statuses.update(info.statuses)
    return MergeReport(
        out=out,
        fmt=out_fmt,
        parts=tuple(part_paths),
        rows=len(ids),
        part_rows=tuple(info.rows for info in infos),
        statuses=tuple(sorted(statuses.items())),
        models=tuple(sorted({m for info in infos for m in info.models})),
        elapsed_s=time.monotonic() - started,
    )


# --- reading parts --------------------------------------------------------------------------


@dataclass
class _Part:
    """One verified part: where it is, its schema and config, and what its rows contain."""

    path: str
    fmt: str
    schema: pa.Schema | None
    config: dict[str, Any] | None
    models: set[str]
    statuses: Counter[str]
    rows: int = 0
    label: str | None = None  # how messages name the part; the file name unless ambiguous

    @property
    def name(self) -> str:
        return self.label or Path(self.path).name


class _IdIndex:
    """Every id seen so far and the part holding it; repeats are noted, not raised, until ``check``."""

    def __init__(self) -> None:
        self.owner: dict[str, int] = {}
        self.repeats: dict[str, list[int]] = {}

    def add(self, ids: Iterable[str], part: int) -> int:
        """Record ``ids`` of part number ``part``; returns how many there were."""
        count = 0
        owner = self.owner
        for id_ in ids:
            count += 1
            if id_ in owner:
                self.repeats.setdefault(id_, [owner[id_]]).append(part)
            else:
                owner[id_] = part
        return count

    def check(self, infos: list[_Part]) -> None:
        """MergeError naming the repeated ids and the parts that hold them."""
        if not self.repeats:
            return
        named = [
            f"{id_!r} in {', '.join(infos[i].name for i in where)}"
            for id_, where in list(self.repeats.items())[:_MAX_NAMED]
        ]
        more = f" and {len(self.repeats) - _MAX_NAMED} more" if len(self.repeats) > _MAX_NAMED else ""
        raise MergeError(f"{len(self.repeats)} id(s) occur more than once: {'; '.join(named)}{more}")


def _open_part(path: str, out_fmt: str, index: _IdIndex, number: int) -> _Part:
    if not os.path.isfile(path):
        raise MergeError(f"part {path} is missing (no such file)")
    part_fmt = format_of(path)
    if part_fmt != out_fmt:
        raise MergeError(
            f"part {path} is {part_fmt} but the output is {out_fmt}; merge parts into a file of their own format"
        )
    try:
        if part_fmt == "parquet":
            return _scan_parquet(path, index, number)
        return _scan_jsonl(path, index, number)
    except OSError as exc:
        raise MergeError(f"part {path} is unreadable: {exc}") from exc


def _scan_parquet(path: str, index: _IdIndex, number: int) -> _Part:
    try:
        pf = pq.ParquetFile(path)
        schema = pf.schema_arrow
        missing = [c for c in ("id", "model", "status") if c not in schema.names]
        if missing:
            raise MergeError(f"part {path} is not a batchcap output: no column(s) {', '.join(missing)}")
        part = _Part(path, "parquet", schema.remove_metadata(), _parquet_config(path, schema), set(), Counter())
        for i in range(pf.num_row_groups):
            table = pf.read_row_group(i, columns=["id", "model", "status"])
            part.rows += index.add(map(str, table.column("id").to_pylist()), number)
            part.models.update(m for m in table.column("model").unique().to_pylist() if m)
            for item in pc.value_counts(table.column("status")).to_pylist():
                part.statuses[str(item["values"])] += item["counts"]
        return part
    except (pa.ArrowException, ValueError) as exc:  # truncated, corrupt, not Parquet
        raise MergeError(f"part {path} is unreadable: {exc}") from exc


def _parquet_config(path: str, schema: pa.Schema) -> dict[str, Any] | None:
    raw = (schema.metadata or {}).get(METADATA_KEY_BYTES)
    if raw is None:
        return None
    try:
        return json.loads(raw)
    except json.JSONDecodeError as exc:
        raise MergeError(f"part {path} has unreadable 'batchcap' metadata: {exc}") from exc


def _iter_jsonl(path: str) -> Iterator[tuple[int, str, dict[str, Any]]]:
    """(line number, line, object) for each non-blank line; MergeError on a bad line."""
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise MergeError(
                    f"part {path} line {number} is not UTF-8 text (byte {exc.start + 1}); the part is damaged"
                ) from exc
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise MergeError(
                    f"part {path} line {number} is not valid JSON ({exc.msg}); the part is damaged or unfinished"
                ) from exc
            if not isinstance(obj, dict) or "id" not in obj:
                raise MergeError(f"part {path} line {number} is not a batchcap row (no 'id')")
            yield number, line, obj


def _scan_jsonl(path: str, index: _IdIndex, number: int) -> _Part:
    config = None
    meta_path = path + ".meta.json"
    if os.path.exists(meta_path):
        try:
            with open(meta_path, encoding="utf-8") as f:
                config = json.load(f)
        except (OSError, json.JSONDecodeError) as exc:
            raise MergeError(f"part {path}: cannot read {meta_path}: {exc}") from exc
    part = _Part(path, "jsonl", None, config, set(), Counter())
    for _, _, obj in _iter_jsonl(path):
        part.rows += index.add((str(obj["id"]),), number)
        if obj.get("model"):
            part.models.add(str(obj["model"]))
        part.statuses[str(obj.get("status"))] += 1
    return part


# --- verification ---------------------------------------------------------------------------


def _index_of(path: str) -> int | None:
    """The part number at the end of a file name (``part-7.parquet`` -> 7), if any."""
    stem = Path(path).name.split(".")[0]
    match = re.search(r"(\d+)$", stem)
    return int(match.group(1)) if match else None


def _check_part_names(parts: list[str], out: str, expected_parts: int | None) -> None:
    absent = [p for p in parts if not os.path.isfile(p)]
    if absent:
        raise MergeError(f"part(s) missing (no such file): {', '.join(absent)}")
    out_real = os.path.realpath(out)
    seen: dict[str, str] = {}
    for path in parts:
        real = os.path.realpath(path)
        if real == out_real:
            raise MergeError(f"the output {out} is also given as a part")
        if real in seen:
            raise MergeError(f"part {path} is given twice (also as {seen[real]})")
        seen[real] = path
    if expected_parts is None:
        return
    if expected_parts < 1:
        raise MergeError(f"expected parts must be at least 1, not {expected_parts}")
    numbered = {_index_of(p): p for p in parts}
    indices = {i: p for i, p in numbered.items() if i is not None}
    if None not in numbered and len(indices) == len(parts):
        missing = sorted(set(range(expected_parts)) - set(indices))
        extra = sorted(i for i in indices if i >= expected_parts)
        if missing:
            example = Path(parts[0]).name
            names = ", ".join(re.sub(r"\d+(?=\.)", str(i), example, count=1) for i in missing)
            raise MergeError(
                f"expected {expected_parts} parts (0..{expected_parts - 1}); "
                f"missing part(s) {', '.join(map(str, missing))}: {names}"
            )
        if extra:
            raise MergeError(
                f"expected {expected_parts} parts (0..{expected_parts - 1}) but got "
                f"{', '.join(indices[i] for i in extra)}"
            )
    elif len(parts) != expected_parts:
        raise MergeError(f"expected {expected_parts} parts, got {len(parts)}: {', '.join(parts)}")


def _check_same_version(infos: list[_Part]) -> None:
    versions: dict[Any, list[str]] = {}
    for info in infos:
        if info.config is not None:
            versions.setdefault(info.config.get("schema_version", 1), []).append(info.name)
    if len(versions) > 1:
        named = "; ".join(f"version {v}: {', '.join(names)}" for v, names in sorted(versions.items(), key=str))
        raise MergeError(
            f"the parts were written by different output schema versions ({named}); "
            "their score columns mean different things, so they are not merged. Merge each "
            "version on its own, or re-caption the older parts with this batchcap"
        )


def _check_same_schema(infos: list[_Part]) -> None:
    first = infos[0]
    for info in infos[1:]:
        if first.schema is not None and info.schema is not None and not info.schema.equals(first.schema):
            raise MergeError(
                f"part {info.path} has a different schema from {first.path}:\n{info.schema}\nvs\n{first.schema}"
            )


def _settings(config: dict[str, Any]) -> dict[str, Any]:
    """What must agree between parts: the metadata's ``resume_settings`` (the settings
    ``batchcap run`` refuses to resume across), ``min_confidence`` and format when present, else the whole
    configuration; minus the keys that differ per part by design (PER_PART_KEYS)."""
    if isinstance(config.get("resume_settings"), dict):
        settings = dict(config["resume_settings"])
        # --min-confidence labels the rows: parts labelled differently would mix (older outputs
        # recorded it among their resume settings).
        threshold = config.get("min_confidence", settings.pop("min_confidence", None))
        config = {
            "resume_settings": settings,
            "min_confidence": threshold,
            "format": config.get("format"),
            "schema_version": config.get("schema_version"),
        }
    return _without_per_part(config)


def _without_per_part(config: dict[str, Any]) -> dict[str, Any]:
    return {
        k: (_without_per_part(v) if isinstance(v, dict) else v) for k, v in config.items() if k not in PER_PART_KEYS
    }


def _diff(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out: list[str] = []
        for key in sorted(set(a) | set(b)):
            out += _diff(a.get(key), b.get(key), f"{prefix}{key}.")
        return out

    return [] if a == b else [f"{option_name(prefix.rstrip('.'))}: {a!r} vs {b!r}"]


def _check_same_settings(infos: list[_Part]) -> None:
    by_model: dict[str, list[str]] = {}
    for info in infos:
        for model in info.models:
            by_model.setdefault(model, []).append(info.name)
    if len(by_model) > 1:
        lines = "; ".join(f"{model!r} in {', '.join(names)}" for model, names in sorted(by_model.items()))
        raise MergeError(f"the parts were captioned with different models: {lines}")
    with_config = [info for info in infos if info.config is not None]
    if not with_config:
        return
    first = with_config[0]
    reference = _settings(first.config or {})
    for info in with_config[1:]:
        diffs = _diff(reference, _settings(info.config or {}))
        if diffs:
            shown = "; ".join(diffs[:_MAX_NAMED])
            raise MergeError(f"parts {first.name} and {info.name} were made with different settings: {shown}")


def _check_expected(ids: dict[str, int], expected_count: int | None, expected_ids: Iterable[str] | None) -> None:
    if expected_count is not None and len(ids) != expected_count:
        raise MergeError(f"the parts hold {len(ids)} rows but {expected_count} were expected")
    if expected_ids is None:
        return
    expected = set()
    for id_ in expected_ids:
        expected.add(str(id_))
    missing = sorted(expected - ids.keys())
    unexpected = sorted(ids.keys() - expected)
    problems = []
    if missing:
        problems.append(f"{len(missing)} listed id(s) have no row: {_some(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} row(s) are not in the listing: {_some(unexpected)}")
    if problems:
        raise MergeError(f"the parts do not match the expected listing of {len(expected)} ids: " + "; ".join(problems))


def _some(values: list[str]) -> str:
    shown = ", ".join(repr(v) for v in values[:_MAX_NAMED])
    return shown + (f" and {len(values) - _MAX_NAMED} more" if len(values) > _MAX_NAMED else "")


# --- writing --------------------------------------------------------------------------------


def _merged_meta(infos: list[_Part]) -> dict[str, Any] | None:
    """The first part's run configuration, without its shard, plus what was merged."""
    config = next((info.config for info in infos if info.config is not None), None)
    if config is None:
        return None
    meta = {k: v for k, v in config.items() if k not in ("shard", "shards", "out", "output")}
    if isinstance(meta.get("run_config"), dict):  # as batchcap.outputs.store writes it
        meta["run_config"] = {
            k: v for k, v in meta["run_config"].items() if k not in ("shard", "shards", "out", "output")
        }
    meta["merge"] = {"parts": [info.name for info in infos], "rows": sum(i.rows for i in infos)}
    return meta


def _write_parquet(infos: list[_Part], out: str, meta: dict[str, Any] | None) -> None:
    schema = infos[0].schema
    assert schema is not None
    if meta is not None:
        schema = schema.with_metadata({METADATA_KEY_BYTES: json.dumps(meta, sort_keys=True).encode()})
    tmp = _temp_beside(out)
    try:
        with pq.ParquetWriter(tmp, schema, compression="zstd") as writer:  # as batchcap.outputs.store writes
            for info in infos:
                pf = pq.ParquetFile(info.path)
                for i in range(pf.num_row_groups):
                    writer.write_table(pf.read_row_group(i).replace_schema_metadata(schema.metadata))
        fsync_file(tmp)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _write_jsonl(infos: list[_Part], out: str, meta: dict[str, Any] | None) -> None:
    tmp = _temp_beside(out)
    meta_tmp = tmp + ".meta.json"
    try:
        if meta is not None:  # the side file first: the data file is the commit
            with open(meta_tmp, "w", encoding="utf-8") as f:
                json.dump(meta, f, indent=2, sort_keys=True)
                f.write("\n")
        with open(tmp, "w", encoding="utf-8") as f:
            for info in infos:
                for _, line, _ in _iter_jsonl(info.path):
                    f.write(line if line.endswith("\n") else line + "\n")
            f.flush()
            os.fsync(f.fileno())
        if meta is not None:
            os.replace(meta_tmp, out + ".meta.json")
        os.replace(tmp, out)
    finally:
        for path in (tmp, meta_tmp):
            if os.path.exists(path):
                os.unlink(path)


def _temp_beside(out: str) -> str:
    directory = os.path.dirname(os.path.abspath(out))
    os.makedirs(directory, exist_ok=True)
    return os.path.join(directory, f".{os.path.basename(out)}.merge-{os.getpid()}.tmp")
