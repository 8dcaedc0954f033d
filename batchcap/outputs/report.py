"""Report stage: a captioning output (Parquet or JSONL) becomes one self-contained HTML page.

People check captions by looking at pictures. :func:`write_report` streams the output
once, in Arrow record batches and only the columns it needs, keeping:

* counts by status and by model, and the run configuration from the file's metadata;
* the rows to show -- the ``limit`` least confident (or lowest-scoring, or first by id), or a
  seeded random ``sample`` -- as a bounded Arrow table, so memory does not grow with the output;
* the first ``failure_cap`` failed rows, listed with their error messages.

Only the rows shown get thumbnails, decoded from the original file (or from the member
of a local WebDataset tar) with Pillow. A picture that cannot be opened becomes a
placeholder: the report of a broken collection must still render. Every piece of text
from the output is untrusted and goes through :func:`html.escape`; the page needs no
network (inline CSS and JS, thumbnails as ``data:`` URIs or links to local files).
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
import re
import tarfile
import time
import urllib.parse
from collections import Counter, defaultdict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import resources
from pathlib import Path
from string import Template
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image, ImageOps

from batchcap.data.extensions import IMAGE_KEYS, TAR_SUFFIXES, enable_heif, is_table_name
from batchcap.data.tables import pictures_by_id
from batchcap.hardware import available_cpus
from batchcap.outputs.schema import CAPTIONED, LOW_CONFIDENCE, METADATA_KEY_BYTES, OK, flatten_settings, sniff_format
from batchcap.outputs.schema import SCHEMA as OUTPUT_SCHEMA

ORDERS = ("confidence", "score", "id")
#: Without batchcap metadata, a file is taken for a batchcap output only if it has these columns.
REQUIRED_COLUMNS = ("id", "status", "caption")
FAILURE_CAP = 1000
THUMB_MAX_PIXELS = 89_478_485  # Pillow's own decompression-bomb threshold
MEMBER_MAX_BYTES = 64 * 1024 * 1024  # a tar member larger than this is not read for a thumbnail
BATCH_ROWS = 65_536

# The columns the report reads: the output schema's, less the resume fingerprint, with the time as
# text (UTC wall time; no time-zone database needed). Anything missing becomes nulls.
SCHEMA = pa.schema(
    [
        pa.field("created_at", pa.string()) if f.name == "created_at" else f
        for f in OUTPUT_SCHEMA
        if f.name not in ("size", "mtime_ns")
    ]
)
_BEAM_KEYS = ("beam_size", "n_best", "max_len", "min_len", "length_penalty", "no_repeat_ngram")


class ReportError(Exception):
    """The output file cannot be read as a batchcap output (a user error, not a bug)."""


@dataclass(frozen=True)
class ReportSummary:
    """What :func:`write_report` wrote, for the CLI's closing line and for tests."""

    output: str
    html: str
    total_rows: int
    status_counts: dict[str, int]
    shown: int
    thumbnails: int
    placeholders: int
    failures_listed: int
    bad_lines: int
    html_bytes: int
    seconds: float
    models: dict[str, int] = field(default_factory=dict)
    bad_line_numbers: tuple[int, ...] = ()
    order: str = "confidence"  # the order the cards are in (``confidence`` falls back to ``score``)


def describe_lines(numbers: list[int] | tuple[int, ...], most: int = 10) -> str:
    """``3, 17, 40`` -- the first ``most`` line numbers, and how many more."""
    shown = ", ".join(str(n) for n in numbers[:most])
    return shown + (f" and {len(numbers) - most:,} more" if len(numbers) > most else "")


# ----------------------------------------------------------------------------- reading


def _to_report_view(table: pa.Table) -> pa.Table:
    """``table`` with exactly :data:`SCHEMA`'s columns: cast where possible, nulls where absent.

    An output of schema version 1 has no ``logprob``: its ``score`` was exactly that (the
    mean log-probability per token), so it fills ``logprob`` too.
    """
    columns = []
    if "logprob" not in table.column_names and "score" in table.column_names:
        table = table.append_column("logprob", table.column("score"))
    for fld in SCHEMA:
        if fld.name not in table.column_names:
            columns.append(pa.nulls(table.num_rows, fld.type))
            continue
        col = table.column(fld.name)
        if fld.name == "created_at" and pa.types.is_timestamp(col.type):
            col = col.cast(pa.timestamp(col.type.unit)).cast(pa.string())  # UTC wall time, no tz database
        if not col.type.equals(fld.type):
            try:
                col = col.cast(fld.type)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
                col = pa.nulls(table.num_rows, fld.type)  # an unexpected shape is "absent"
        columns.append(col)
    return pa.Table.from_arrays(columns, schema=SCHEMA)


def _check_columns(path: Path, names: list[str]) -> None:
    """Refuse a file batchcap did not write: no batchcap metadata, and not batchcap's columns."""
    missing = [c for c in REQUIRED_COLUMNS if c not in names]
    if missing:
        shown = ", ".join(names[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else "")
        raise ReportError(
            f"{path} is not a batchcap output: it has no batchcap metadata, and its columns ({shown or 'none'}) "
            f"lack {', '.join(missing)}. `batchcap report` renders what `batchcap run` or `batchcap merge` wrote"
        )


def _parquet_batches(path: Path) -> tuple[Iterator[pa.Table], dict[str, Any]]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise ReportError(f"{path}: not a readable Parquet file ({exc})") from exc
    meta: dict[str, Any] = {}
    raw = (pf.schema_arrow.metadata or {}).get(METADATA_KEY_BYTES)
    if raw:
        try:
            meta = json.loads(raw)
        except ValueError:
            meta = {}
    if not raw:
        _check_columns(path, pf.schema_arrow.names)
    wanted = [name for name in SCHEMA.names if name in pf.schema_arrow.names]

    def batches() -> Iterator[pa.Table]:
        for batch in pf.iter_batches(batch_size=BATCH_ROWS, columns=wanted):
            yield _to_report_view(pa.Table.from_batches([batch]))

    return batches(), meta


class _LineCounter:
    """JSONL lines that are not a JSON row; with ``strict`` the first one stops the report.

    A batchcap JSONL output never holds such a line (it is written whole and renamed into
    place), so one means the file was damaged or edited: by default that is an error
    naming the line; ``strict=False`` renders the readable rows and lists the bad lines.
    """

    def __init__(self, path: Path, strict: bool = True) -> None:
        self.path, self.strict = path, strict
        self.lines: list[int] = []
        self.seen_row = False

    @property
    def bad(self) -> int:
        return len(self.lines)

    def damaged(self, number: int, why: str) -> None:
        if self.strict:
            raise ReportError(
                f"{self.path} line {number} {why}: the file is damaged. Rerun with "
                "--skip-bad-lines to report the readable rows anyway"
            )
        self.lines.append(number)


def _jsonl_batches(path: Path, counter: _LineCounter) -> tuple[Iterator[pa.Table], dict[str, Any]]:
    meta: dict[str, Any] = {}
    has_meta = False
    for candidate in (Path(str(path) + ".meta.json"), path.with_suffix(".meta.json")):
        if candidate.is_file():
            has_meta = True
            try:
                meta = json.loads(candidate.read_text(encoding="utf-8"))
            except (ValueError, OSError):
                meta = {}
            break
    names = SCHEMA.names

    def convert(rows: list[dict[str, Any]]) -> pa.Table:
        arrays = {}
        for name in names:
            if name == "logprob":  # schema version 1 rows: their score is the per-token log-probability
                values = [row.get(name, row.get("score")) for row in rows]
            else:
                values = [row.get(name) for row in rows]
            try:
                arrays[name] = pa.array(values, type=SCHEMA.field(name).type)
            except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, ValueError):
                arrays[name] = pa.array([_lenient(v, name) for v in values], type=SCHEMA.field(name).type)
        return pa.table(arrays, schema=SCHEMA)

    def batches() -> Iterator[pa.Table]:
        rows: list[dict[str, Any]] = []
        with open(path, encoding="utf-8", errors="replace") as fh:
            for number, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except ValueError:
                    counter.damaged(number, "is not valid JSON")
                    continue
                if not isinstance(row, dict):
                    counter.damaged(number, "is not a JSON object")
                    continue
                if not has_meta and not rows and not counter.seen_row:
                    _check_columns(path, list(row))  # the first row tells whose file this is
                counter.seen_row = True
                rows.append(row)
                if len(rows) >= BATCH_ROWS:
                    yield convert(rows)
                    rows = []
        if rows:
            yield convert(rows)

    return batches(), meta


def _lenient(value: Any, name: str) -> Any:
    """One JSON value coerced to its column's type, or None when it has the wrong shape."""
    kind = SCHEMA.field(name).type
    if value is None:
        return None
    try:
        if pa.types.is_string(kind):
            return _clean(value if isinstance(value, str) else json.dumps(value))
        if pa.types.is_floating(kind):
            return float(value)
        if pa.types.is_integer(kind):
            return int(value)
        if name == "n_best" and isinstance(value, list):
            return [
                {
                    "caption": _clean(str(d.get("caption"))),
                    "score": None if d.get("score") is None else float(d["score"]),
                }
                for d in value
                if isinstance(d, dict)
            ]
    except (TypeError, ValueError):
        return None
    return None


def _clean(text: str) -> str:
    """``text`` without lone surrogates (JSON may escape them; UTF-8 cannot hold them)."""
    return text.encode("utf-8", errors="replace").decode("utf-8")


# ----------------------------------------------------------------------------- selecting


def _sort_keys(order: str) -> list[tuple[str, str]]:
    """Arrow sort keys for ``order``. Rows without a confidence follow those with one, lowest
    score first (``_then``, see :func:`_scan`), so an output without confidence values is simply
    in score order; ties keep the output's order."""
    if order == "confidence":
        return [("confidence", "ascending"), ("_then", "ascending"), ("_seq", "ascending")]
    if order == "score":
        return [("score", "ascending"), ("_seq", "ascending")]
    return [("id", "ascending"), ("_seq", "ascending")]


def _keep_first(table: pa.Table, keys: list[tuple[str, str]], n: int | None) -> pa.Table:
    """The first ``n`` rows of ``table`` in ``keys`` order (nulls and NaN last; stable)."""
    if table.num_rows == 0:
        return table
    idx = pc.sort_indices(table, sort_keys=keys)  # Arrow's default puts nulls (and NaN) last
    if n is not None:
        idx = idx[:n]
    return table.take(idx)


@dataclass
class _Scan:
    """What one pass over the output keeps: counts, bounded candidates, the first failures."""

    total: int = 0
    statuses: Counter = field(default_factory=Counter)
    models: Counter = field(default_factory=Counter)
    first_created: str | None = None
    last_created: str | None = None
    failures: list[dict[str, Any]] = field(default_factory=list)
    candidates: pa.Table | None = None
    confident: int = 0  # rows with a confidence value


def _scan(
    batches: Iterator[pa.Table],
    *,
    keep: int | None,
    sample: int | None,
    seed: int,
    order: str,
    failure_cap: int,
    only_status: str | None = None,
) -> _Scan:
    scan = _Scan()
    rng = np.random.default_rng(seed)
    # A sample is bottom-k by a seeded random key: uniform, without replacement, and
    # computable one batch at a time. Otherwise keep the first ``keep`` in display order.
    keys = [("_rand", "ascending")] if sample is not None else _sort_keys(order)
    bound = sample if sample is not None else keep
    for table in batches:
        n = table.num_rows
        if n == 0:
            continue
        table = table.append_column("_seq", pa.array(np.arange(scan.total, scan.total + n, dtype=np.int64)))
        if sample is not None:
            table = table.append_column("_rand", pa.array(rng.random(n)))
        if order == "confidence":  # the score, only where there is no confidence to order by
            no_confidence = table.column("confidence").is_null(nan_is_null=True)
            table = table.append_column("_then", pc.if_else(no_confidence, table.column("score"), None))
        scan.total += n
        scan.confident += n - table.column("confidence").null_count
        status = pc.fill_null(table.column("status"), "unknown")
        for item in pc.value_counts(status).to_pylist():
            scan.statuses[item["values"]] += item["counts"]
        for item in pc.value_counts(pc.fill_null(table.column("model"), "")).to_pylist():
            if item["values"]:
                scan.models[item["values"]] += item["counts"]
        created = pc.min_max(table.column("created_at")).as_py()
        if created["min"] is not None:
            scan.first_created = min(filter(None, (scan.first_created, created["min"])))
            scan.last_created = max(filter(None, (scan.last_created, created["max"])))
        if len(scan.failures) < failure_cap:
            failed = table.filter(pc.invert(pc.is_in(status, value_set=pa.array(sorted(CAPTIONED)))))
            room = failure_cap - len(scan.failures)
            scan.failures.extend(failed.slice(0, room).select(["id", "source", "status", "error"]).to_pylist())
        if only_status is not None:
            table = table.filter(pc.equal(status, only_status))
        merged = table if scan.candidates is None else pa.concat_tables([scan.candidates, table])
        scan.candidates = _keep_first(merged, keys, bound) if bound is not None else merged
    return scan


# ----------------------------------------------------------------------------- thumbnails


@dataclass(frozen=True)
class _Thumb:
    """A card's picture: a ``src`` for ``<img>`` (data URI or link), or why there is none."""

    src: str | None = None
    href: str | None = None
    reason: str = ""


def _is_shard(source: str) -> bool:
    lowered = source.lower()
    return lowered.startswith("pipe:") or lowered.endswith(TAR_SUFFIXES) or "://" in lowered


def _local_path(source: str, base: Path) -> Path | None:
    """A local file for ``source`` (absolute, relative to the cwd, or to the output's folder)."""
    if source.startswith("file://"):
        source = urllib.parse.unquote(urllib.parse.urlparse(source).path)
    elif source.startswith("file:"):
        source = source[len("file:") :]
    elif source.startswith("pipe:") or "://" in source:
        return None
    path = Path(source)
    for candidate in [path] if path.is_absolute() else [Path.cwd() / path, base / path]:
        if candidate.is_file():
            return candidate
    return None


def _member_key(name: str) -> tuple[str, str] | None:
    """WebDataset's split of a member name into (key, extension): the first dot of the base name."""
    match = re.match(r"^((?:.*/|)[^.]+)[.]([^/]*)$", name)  # webdataset's base_plus_ext
    return (match.group(1), match.group(2).lower()) if match else None


def _shard_keys(row_id: str, source: str) -> tuple[str, ...]:
    """Keys a row's sample may have inside its shard: the id is ``<shard name>/<__key__>``."""
    name = source.rstrip("/").rsplit("/", 1)[-1]
    stem = name
    for suffix in TAR_SUFFIXES:
        if stem.lower().endswith(suffix):
            stem = stem[: -len(suffix)]
            break
    keys = [row_id[len(prefix) + 1 :] for prefix in (name, stem) if row_id.startswith(prefix + "/")]
    return tuple(dict.fromkeys(keys + [row_id]))


def _read_members(tar_path: Path, wanted: dict[str, list[int]], exts: tuple[str, ...]) -> dict[int, bytes | str]:
    """Image bytes (or why not) for rows whose keys are in ``wanted``, reading the tar once."""
    found: dict[int, tuple[int, bytes | str]] = {}
    rank = {ext: i for i, ext in enumerate(exts)}
    try:
        with tarfile.open(tar_path, "r:*") as tf:
            for member in tf:
                split = _member_key(member.name) if member.isfile() else None
                if split is None or split[0] not in wanted or split[1] not in rank:
                    continue
                for row in wanted[split[0]]:
                    if row in found and found[row][0] <= rank[split[1]]:
                        continue
                    if member.size > MEMBER_MAX_BYTES:
                        found[row] = (rank[split[1]], f"member {member.name} is {member.size} bytes")
                        continue
                    handle = tf.extractfile(member)
                    found[row] = (rank[split[1]], handle.read() if handle else "unreadable member")
    except (tarfile.TarError, OSError, EOFError) as exc:
        for rows in wanted.values():
            for row in rows:
                found.setdefault(row, (len(exts), f"shard unreadable: {exc}"))
    return {row: data for row, (_, data) in found.items()}


def _thumbnail(data: bytes | Path, size: int) -> _Thumb:
    """A JPEG data URI no larger than ``size`` px, or the reason the picture would not open."""
    enable_heif()
    try:
        with Image.open(data if isinstance(data, Path) else io.BytesIO(data)) as opened:
            if opened.width * opened.height > THUMB_MAX_PIXELS and opened.format != "JPEG":
                return _Thumb(reason=f"{opened.width}x{opened.height} is too large to preview")
            opened.draft("RGB", (size, size))  # JPEG: decode at 1/2..1/8 scale, nearly free
            img: Image.Image = ImageOps.exif_transpose(opened)
            if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
                rgba = img.convert("RGBA")
                img = Image.new("RGB", rgba.size, (255, 255, 255))
                img.paste(rgba, mask=rgba.getchannel("A"))
            else:
                img = img.convert("RGB")
            img.thumbnail((size, size), Image.Resampling.LANCZOS)
            buf = io.BytesIO()
            img.save(buf, format="JPEG", quality=80, optimize=True)
    except Exception as exc:  # noqa: BLE001 -- Pillow's decoders raise many types on bad bytes
        return _Thumb(reason=f"cannot preview: {type(exc).__name__}: {exc}")
    return _Thumb(src="data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii"))


def _file_link(path: Path, html_dir: Path) -> str:
    """A link to a local file: relative when it lies under the report's folder, else file://."""
    resolved = path.resolve()
    try:
        rel = resolved.relative_to(html_dir.resolve())
    except ValueError:
        return resolved.as_uri()
    return urllib.parse.quote(rel.as_posix())


def _thumbnails(
    rows: list[dict[str, Any]],
    *,
    base: Path,
    html_dir: Path,
    size: int,
    link_images: bool,
    exts: tuple[str, ...],
    workers: int,
) -> list[_Thumb]:
    """One :class:`_Thumb` per shown row; only shown ``ok`` rows are ever opened."""
    thumbs: list[_Thumb] = [_Thumb(reason="")] * len(rows)
    jobs: dict[int, bytes | Path] = {}
    shards: dict[Path, dict[str, list[int]]] = defaultdict(lambda: defaultdict(list))
    tables: dict[Path, dict[str, list[int]]] = defaultdict(lambda: defaultdict(list))
    for i, row in enumerate(rows):
        source = row.get("source") or ""
        if row.get("status") not in CAPTIONED:
            thumbs[i] = _Thumb(reason=str(row.get("status") or "no status"))
            continue
        if not source:
            thumbs[i] = _Thumb(reason="no source recorded")
            continue
        local = _local_path(source, base)
        if _is_shard(source):
            if local is None:
                thumbs[i] = _Thumb(reason="remote shard: no preview")
                continue
            if link_images:
                thumbs[i] = _Thumb(href=_file_link(local, html_dir), reason="inside a tar shard")
                continue
            for key in _shard_keys(str(row.get("id") or ""), source):
                shards[local][key].append(i)
            thumbs[i] = _Thumb(href=_file_link(local, html_dir), reason="not found in its shard")
            continue
        if local is None:
            thumbs[i] = _Thumb(reason="file not found")
            continue
        if is_table_name(source):  # a row of a Parquet table of pictures
            href = _file_link(local, html_dir)
            if link_images:
                thumbs[i] = _Thumb(href=href, reason="inside a Parquet table")
                continue
            tables[local][str(row.get("id") or "")].append(i)
            thumbs[i] = _Thumb(href=href, reason="not found in its table")
            continue
        if link_images:
            link = _file_link(local, html_dir)
            thumbs[i] = _Thumb(src=link, href=link)
            continue
        jobs[i] = local
    for tar_path, wanted in shards.items():
        for i, data in _read_members(tar_path, wanted, exts).items():
            if isinstance(data, bytes):
                jobs[i] = data
            else:
                thumbs[i] = _Thumb(href=thumbs[i].href, reason=data)
    for table_path, by_id in tables.items():
        for rid, picture in pictures_by_id(str(table_path), list(by_id), exts).items():
            for i in by_id[rid]:
                if isinstance(picture, bytes):
                    jobs[i] = picture
                else:
                    thumbs[i] = _Thumb(href=thumbs[i].href, reason=picture)
    order = sorted(jobs)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:  # Pillow decodes without the GIL
        for i, thumb in zip(order, pool.map(lambda j: _thumbnail(jobs[j], size), order)):
            thumbs[i] = _Thumb(src=thumb.src, href=thumbs[i].href, reason=thumb.reason)
    return thumbs


# ----------------------------------------------------------------------------- rendering


def _esc(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def _lookup(flat: dict[str, Any], *names: str) -> Any:
    """The first metadata value whose last dotted component is one of ``names``."""
    for name in names:
        for key, value in flat.items():
            if key.rsplit(".", 1)[-1] == name and value not in (None, "", [], {}):
                return value
    return None


def _parse_time(value: Any) -> datetime | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = value / 1e9 if value > 1e14 else value / 1e3 if value > 1e11 else value
        return datetime.fromtimestamp(seconds, tz=timezone.utc)
    if isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            return None
        return parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)
    return None


def _duration(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min" if hours else f"{minutes} min {secs:02d} s"


def _run_facts(meta: dict[str, Any], scan: _Scan) -> list[tuple[str, str]]:
    """(label, value) pairs for the summary header, from the run configuration when present."""
    flat = flatten_settings(meta)
    facts: list[tuple[str, str]] = []
    models = list(scan.models)
    meta_model = _lookup(flat, "model")
    if models:
        facts.append(
            (
                "Model" if len(models) == 1 else "Models",
                ", ".join(f"{m} ({scan.models[m]:,})" if len(models) > 1 else m for m in models),
            )
        )
    elif meta_model is not None:
        facts.append(("Model", str(meta_model)))
    beam = [f"{k.replace('_', ' ')} {_lookup(flat, k)}" for k in _BEAM_KEYS if _lookup(flat, k) is not None]
    if beam:
        facts.append(("Beam", ", ".join(beam)))
    for label, names in (
        ("Precision", ("precision",)),
        ("Device", ("device",)),
        ("Version", ("batchcap_version", "version")),
    ):
        value = _lookup(flat, *names)
        if value is not None:
            facts.append((label, f"batchcap {value}" if label == "Version" else str(value)))
    started = _parse_time(_lookup(flat, "started_at", "started", "start_time"))
    finished = _parse_time(_lookup(flat, "finished_at", "finished", "end_time", "ended_at"))
    if started is None and scan.first_created:
        started = _parse_time(scan.first_created)
    if finished is None and scan.last_created:
        finished = _parse_time(scan.last_created)
    if started is not None:
        when = started.strftime("%Y-%m-%d %H:%M:%S UTC")
        if finished is not None:
            when += f" · took {_duration((finished - started).total_seconds())}"
        facts.append(("Run", when))
    return facts


def _score_note(meta: dict[str, Any], scan: _Scan) -> str:
    """What the score (and the confidence) on the cards mean, for this output's settings."""
    flat = flatten_settings(meta)
    penalty = _lookup(flat, "length_penalty")
    version = meta.get("schema_version")
    if version == 1:
        note = (
            "Scores are mean log-probabilities per word (an output of schema version 1): closer to 0 is more probable."
        )
    else:
        ranked = "The score is what the beam search ranked the caption by: "
        if isinstance(penalty, (int, float)) and penalty:
            note = (
                f"{ranked}its summed log-probability divided by its length^{penalty:g} (length penalty "
                f"{penalty:g}); closer to 0 ranks higher."
            )
        else:
            setting = "length penalty 0" if meta else "at the default length penalty 0; this output records no settings"
            note = (
                f"{ranked}the sum of its words' log-probabilities, <end> included ({setting}), not normalised "
                "by length: always negative, and lower for longer captions (e.g. -12.8 for a long one). The "
                "tooltip gives its per-token probability."
            )
    if scan.confident:
        note += (
            " Confidence (e.g. 72% sure) is the estimated probability that the caption is acceptable; "
            "it ranks captions better than the score."
        )
    return note


def _score_class(score: float | None) -> str:
    if score is None or math.isnan(score):
        return "none"
    per_word = math.exp(score)
    return "low" if per_word < 0.25 else "mid" if per_word < 0.5 else "high"


def _score_text(score: float | None) -> str:
    if score is None or math.isnan(score):
        return "no score"
    return f"{score:.3f}"


def _confidence_html(confidence: float | None) -> str:
    if confidence is None or math.isnan(confidence):
        return ""
    level = "low" if confidence < 0.3 else "mid" if confidence < 0.6 else "high"
    return (
        f'<span class="score s-{level}" title="confidence: estimated probability that the caption is '
        f'acceptable">{confidence:.0%} sure</span>'
    )


def _card(row: dict[str, Any], thumb: _Thumb, rank: int) -> str:
    status = str(row.get("status") or "unknown")
    caption = row.get("caption")
    score = row.get("score")
    logprob = row.get("logprob")
    nbest = [alt for alt in (row.get("n_best") or []) if alt]
    search = " ".join(
        filter(None, [caption, row.get("id"), row.get("error")] + [alt.get("caption") for alt in nbest])
    ).lower()
    if thumb.src:
        picture = f'<img src="{_esc(thumb.src)}" alt="{_esc(caption or row.get("id"))}" loading="lazy">'
    else:
        picture = f'<div class="ph"><span>{_esc(thumb.reason or "no preview")}</span></div>'
    if thumb.href:
        picture = f'<a href="{_esc(thumb.href)}" target="_blank" rel="noopener">{picture}</a>'
    parts = [
        f'<article class="card st-{_esc(_css_name(status))}" data-status="{_esc(status)}" data-text="{_esc(search)}">',
        f'<div class="pic">{picture}</div>',
        '<div class="body">',
    ]
    if caption is not None:
        parts.append(f'<p class="cap">{_esc(caption)}</p>')
    else:
        parts.append(f'<p class="err">{_esc(row.get("error") or "no caption")}</p>')
    size = f"{row['width']}×{row['height']}" if row.get("width") and row.get("height") else ""
    parts.append(
        '<div class="meta">'
        f"{_confidence_html(row.get('confidence'))}"
        f'<span class="score s-{_score_class(logprob)}" title="search score (what the beam ranked by); '
        f'per-token probability {_esc(_per_word(logprob))}">{_esc(_score_text(score))}</span>'
        f'<span class="badge b-{_esc(_css_name(status))}">{_esc(status)}</span>'
        f'<span class="dim">{_esc(size)}</span><span class="rank">#{rank}</span></div>'
    )
    parts.append(f'<p class="id" title="{_esc(row.get("source"))}">{_esc(row.get("id"))}</p>')
    if len(nbest) > 1 or (nbest and nbest[0].get("caption") != caption):
        alts = "".join(
            f'<li><span class="alt">{_esc(alt.get("caption"))}</span>'
            f'<span class="altscore">{_esc(_score_text(alt.get("score")))}</span></li>'
            for alt in nbest
        )
        parts.append(f"<details><summary>{len(nbest)} alternatives</summary><ol>{alts}</ol></details>")
    parts.append("</div></article>")
    return "".join(parts)


def _per_word(score: float | None) -> str:
    return "n/a" if score is None or math.isnan(score) else f"{math.exp(score):.2f}"


def _css_name(status: str) -> str:
    return re.sub(r"[^a-z0-9_-]", "_", status.lower())


def _render(
    *,
    title: str,
    output: Path,
    meta: dict[str, Any],
    scan: _Scan,
    rows: list[dict[str, Any]],
    thumbs: list[_Thumb],
    note: str,
    score_note: str,
    bad_lines: list[int],
    failure_cap: int,
) -> str:
    ok = scan.statuses.get(OK, 0)
    low = scan.statuses.get(LOW_CONFIDENCE, 0)
    failed = scan.total - ok - low
    tiles = [
        ("Rows", f"{scan.total:,}", ""),
        ("Captioned", f"{ok:,}", "ok"),
        ("Failed", f"{failed:,}", "bad" if failed else ""),
    ]
    if low:
        tiles.insert(2, ("Low confidence", f"{low:,}", ""))
    tiles_html = "".join(
        f'<div class="tile {cls}"><div class="num">{_esc(v)}</div><div class="lbl">{_esc(k)}</div></div>'
        for k, v, cls in tiles
    )
    chips = "".join(
        f'<span class="badge b-{_esc(_css_name(s))}">{_esc(s)} <b>{n:,}</b></span>'
        for s, n in sorted(scan.statuses.items(), key=lambda kv: (kv[0] != "ok", -kv[1], kv[0]))
    )
    facts = _run_facts(meta, scan)
    if bad_lines:
        facts.append(
            (
                "Damaged lines",
                f"{len(bad_lines):,} JSONL lines could not be parsed "
                f"(line {describe_lines(bad_lines)}); they are not in this report",
            )
        )
    facts_html = "".join(f"<dt>{_esc(k)}</dt><dd>{_esc(v)}</dd>" for k, v in facts)
    meta_html = (
        f'<details class="config"><summary>Run configuration</summary>'
        f"<pre>{_esc(json.dumps(meta, indent=2, sort_keys=True, default=str))}</pre></details>"
        if meta
        else ""
    )
    options = "".join(
        f'<option value="{_esc(s)}">{_esc(s)} ({n:,})</option>'
        for s, n in sorted(scan.statuses.items(), key=lambda kv: (kv[0] != "ok", kv[0]))
    )
    if scan.failures:
        more = failed - len(scan.failures)
        rows_html = "".join(
            f'<tr data-status="{_esc(f.get("status") or "unknown")}" data-text="'
            f'{_esc(" ".join(filter(None, [f.get("id"), f.get("error")])).lower())}">'
            f'<td><span class="badge b-{_esc(_css_name(str(f.get("status") or "unknown")))}">'
            f"{_esc(f.get('status') or 'unknown')}</span></td>"
            f'<td class="mono">{_esc(f.get("id"))}</td><td>{_esc(f.get("error"))}</td>'
            f'<td class="mono src">{_esc(f.get("source"))}</td></tr>'
            for f in scan.failures
        )
        more_html = (
            f'<p class="note">{more:,} more failed rows not listed (the first {failure_cap:,} are).</p>'
            if more > 0
            else ""
        )
        failures_html = (
            f'<section id="failures"><h2>Failures <span class="count">{failed:,}</span></h2>'
            '<div class="tablewrap"><table><thead><tr><th>Status</th><th>Id</th><th>Error</th>'
            f"<th>Source</th></tr></thead><tbody>{rows_html}</tbody></table></div>"
            f"{more_html}</section>"
        )
    else:
        failures_html = ""
    grid = "".join(_card(row, thumb, i + 1) for i, (row, thumb) in enumerate(zip(rows, thumbs)))
    template = Template(resources.files("batchcap.outputs").joinpath("report_template.html").read_text("utf-8"))
    return template.substitute(
        title=_esc(title),
        source=_esc(str(output)),
        tiles=tiles_html,
        chips=chips,
        facts=facts_html,
        config=meta_html,
        options=options,
        failures=failures_html,
        grid=grid,
        note=_esc(note),
        score_note=_esc(score_note),
        shown=str(len(rows)),
        generated=_esc(datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")),
    )


# ----------------------------------------------------------------------------- entry point


def default_html_path(output_path: str | os.PathLike[str]) -> str:
    """The page ``batchcap report OUTPUT`` writes without ``--html``: OUTPUT + ``.html``.

    Appending (``captions.parquet.html``) rather than replacing the suffix keeps the reports
    of ``captions.parquet`` and ``captions.jsonl`` from overwriting each other.
    """
    return os.fspath(output_path) + ".html"


def write_report(
    output_path: str | os.PathLike[str],
    html_path: str | os.PathLike[str],
    *,
    limit: int | None = 1000,
    sample: int | None = None,
    seed: int = 0,
    link_images: bool = False,
    thumb_size: int = 192,
    order: str | None = None,
    failure_cap: int = FAILURE_CAP,
    workers: int | None = None,
    status: str | None = None,
    skip_bad_lines: bool = False,
) -> ReportSummary:
    """Render ``output_path`` (a batchcap Parquet or JSONL output) as one HTML page at ``html_path``.

    Cards are ordered lowest confidence first (``order="confidence"``, the default; rows
    without a confidence follow, lowest score first, failures last), lowest score first
    (``"score"``) or by id; an output without confidence values is thus shown lowest score
    first, and the page says so. ``status`` shows only rows of that status
    (e.g. ``"low_confidence"``, the captions ``--min-confidence`` set aside);
    ``sample`` picks that many rows at random (reproducible with ``seed``) before ordering,
    and ``limit`` keeps the first N (``None`` or 0 for all). Thumbnails are embedded JPEG
    data URIs of at most ``thumb_size`` px, or links to the original files when
    ``link_images``. Raises :class:`ReportError` when the output cannot be read, when it is
    not a batchcap output (no batchcap metadata and not batchcap's columns), or when a JSONL
    output has a line that is not a row, unless ``skip_bad_lines``.
    """
    started = time.perf_counter()
    order = order or "confidence"
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}, not {order!r}")
    if sample is not None and sample < 1:
        raise ValueError("sample must be at least 1")
    if limit is not None and limit < 0:
        raise ValueError("limit must be >= 0 (0 means no limit)")
    limit = limit or None
    output = Path(output_path)
    if not output.is_file():
        raise ReportError(f"{output}: no such output file")
    html_file = Path(html_path)
    counter = _LineCounter(output, strict=not skip_bad_lines)
    if sniff_format(output) == "parquet":
        batches, meta = _parquet_batches(output)
    else:
        batches, meta = _jsonl_batches(output, counter)
    meta = meta if isinstance(meta, dict) else {}
    scan = _scan(
        batches, keep=limit, sample=sample, seed=seed, order=order, failure_cap=failure_cap, only_status=status
    )
    rows: list[dict[str, Any]] = []
    if scan.candidates is not None:
        shown = _keep_first(scan.candidates, _sort_keys(order), limit)
        rows = shown.drop_columns([c for c in ("_seq", "_rand", "_then") if c in shown.column_names]).to_pylist()
    flat = flatten_settings(meta)
    exts = _lookup(flat, "image_keys")
    exts = tuple(str(e).lower() for e in exts) if isinstance(exts, (list, tuple)) and exts else IMAGE_KEYS
    exts = exts + tuple(e for e in IMAGE_KEYS if e not in exts)
    thumbs = _thumbnails(
        rows,
        base=output.parent,
        html_dir=html_file.parent,
        size=thumb_size,
        link_images=link_images,
        exts=exts,
        workers=workers or available_cpus(),
    )
    if order == "confidence" and not scan.confident:
        order = "score"  # nothing to rank by confidence: the score is all there is, and the page says so
        how = "lowest score first (this output has no confidence values, so the score orders it)"
    elif order == "confidence":
        how = "lowest confidence first"
        if sum(scan.statuses.get(s, 0) for s in CAPTIONED) > scan.confident:
            how += " (captions without a confidence follow, lowest score first)"
    else:
        how = "lowest score first" if order == "score" else "by id"
    note = f"Showing {len(rows):,} of {scan.total:,} rows" + (f" (status {status} only)" if status else "")
    note += f", {how}"
    if sample is not None:
        note += f", from a random sample of {min(sample, scan.total):,} (seed {seed})"
    elif limit is not None and scan.total > limit:
        note += f" (limit {limit:,})"
    text = _render(
        title=f"batchcap report · {output.name}",
        output=output,
        meta=meta,
        scan=scan,
        rows=rows,
        thumbs=thumbs,
        note=note + ".",
        score_note=_score_note(meta, scan),
        bad_lines=counter.lines,
        failure_cap=failure_cap,
    )
    data = text.encode("utf-8", errors="replace")  # lone surrogates from JSON must not crash the write
    html_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = html_file.with_name(f".{html_file.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, html_file)
    return ReportSummary(
        output=str(output),
        html=str(html_file),
        total_rows=scan.total,
        status_counts=dict(scan.statuses),
        shown=len(rows),
        thumbnails=sum(1 for t in thumbs if t.src and t.src.startswith("data:")),
        placeholders=sum(1 for t in thumbs if not t.src),
        failures_listed=len(scan.failures),
        bad_lines=counter.bad,
        bad_line_numbers=tuple(counter.lines),
        html_bytes=len(data),
        seconds=time.perf_counter() - started,
        models=dict(scan.models),
        order=order,
    )
