"""The output's schema, its formats and its metadata key: defined once, for the store, merge and report.

Version 2: ``score`` is what the beam search ranked by (it was the mean log-prob per token, now
the ``logprob`` column); ``logprob`` and ``confidence`` were appended. A run refuses to resume
into an output of another version.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import os
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

SCHEMA_VERSION = 2
#: The Parquet footer key (and the ``.meta.json`` top level) that holds the run configuration.
METADATA_KEY = "batchcap"
METADATA_KEY_BYTES = METADATA_KEY.encode()
OUTPUT_FORMATS = ("parquet", "jsonl")
SUFFIX_FORMATS = {".parquet": "parquet", ".pq": "parquet", ".jsonl": "jsonl", ".ndjson": "jsonl"}

NBEST_TYPE = pa.list_(pa.struct([("caption", pa.string()), ("score", pa.float64())]))


SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("source", pa.string()),
        ("caption", pa.string()),
        ("score", pa.float64()),
        ("n_best", NBEST_TYPE),
        ("status", pa.string()),
        ("error", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("size", pa.int64()),
        ("mtime_ns", pa.int64()),
        ("model", pa.string()),
        ("created_at", pa.timestamp("ms", tz="UTC")),
        ("logprob", pa.float64()),
        ("confidence", pa.float64()),
    ]
)

COLUMNS: tuple[str, ...] = tuple(SCHEMA.names)

OK = "ok"
LOW_CONFIDENCE = "low_confidence"  # captioned, but set aside for review by --min-confidence
CAPTIONED = frozenset({OK, LOW_CONFIDENCE})  # statuses whose rows hold a caption


def label(status: str | None, confidence: float | None, min_confidence: float | None) -> str | None:
    """The status a row has under ``min_confidence``: only ``ok`` <-> ``low_confidence`` change.

    A captioned row is ``low_confidence`` when its confidence is below the threshold, else ``ok``
    (a row without a confidence stays ``ok``); every other status is returned as it is. The
    threshold is a label, not a caption setting: changing it relabels rows, it captions nothing.
    """
    if status not in CAPTIONED:
        return status
    low = min_confidence is not None and confidence is not None and confidence < min_confidence
    return LOW_CONFIDENCE if low else OK


def label_table(table: pa.Table, min_confidence: float | None) -> tuple[pa.Table, int]:
    """``table`` (with ``status`` and ``confidence``) labelled by :func:`label`; and how many statuses changed."""
    status = table.column("status")
    captioned = pc.fill_null(pc.is_in(status, value_set=pa.array(sorted(CAPTIONED))), False)
    if min_confidence is None:
        low = pa.repeat(False, table.num_rows) if table.num_rows else pa.array([], pa.bool_())
    else:
        low = pc.fill_null(pc.less(table.column("confidence"), min_confidence), False)
    wanted = pc.if_else(low, LOW_CONFIDENCE, OK)
    new = pc.if_else(captioned, wanted, status)
    changed = pc.sum(pc.fill_null(pc.not_equal(new, status), False)).as_py() or 0
    if not changed:
        return table, 0
    index = table.schema.get_field_index("status")
    return table.set_column(index, table.schema.field(index), new.cast(table.schema.field(index).type)), changed


def infer_format(out: str | os.PathLike[str], fmt: str | None = None) -> str:
    """``fmt`` if given, else ``"parquet"`` / ``"jsonl"`` from the suffix of ``out``."""
    if fmt:
        if fmt not in OUTPUT_FORMATS:
            raise ValueError(f"format must be one of {', '.join(OUTPUT_FORMATS)}, not {fmt!r}")
        return fmt
    suffix = Path(out).suffix.lower()
    if suffix in SUFFIX_FORMATS:
        return SUFFIX_FORMATS[suffix]
    raise ValueError(
        f"cannot tell the format of {str(out)!r} from its suffix: name it .parquet or .jsonl, or pass --format"
    )


def row_to_json(row: dict[str, Any]) -> str:
    """One output row as a JSON line: ``created_at`` in ISO 8601 UTC, non-finite floats as null."""
    clean: dict[str, Any] = {}
    for key in COLUMNS:
        value = row.get(key)
        if isinstance(value, dt.datetime):
            value = value.astimezone(dt.timezone.utc).isoformat(timespec="milliseconds")
            value = value.replace("+00:00", "Z")
        elif isinstance(value, float) and not math.isfinite(value):
            value = None
        elif key == "n_best" and value:
            value = [
                {
                    "caption": h["caption"],
                    "score": h["score"] if h["score"] is None or math.isfinite(h["score"]) else None,
                }
                for h in value
            ]
        clean[key] = value
    return json.dumps(clean, ensure_ascii=False, allow_nan=False)


def conform_table(table: pa.Table) -> pa.Table:
    """``table`` with exactly ``SCHEMA``'s columns, in order, without metadata."""
    table = table.replace_schema_metadata(None)
    missing = [n for n in COLUMNS if n not in table.column_names]
    for name in missing:
        table = table.append_column(SCHEMA.field(name), pa.nulls(table.num_rows, SCHEMA.field(name).type))
    return table.select(list(COLUMNS)).cast(SCHEMA)


def flatten_settings(settings: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested settings as ``{"beam.beam_size": 3, ...}``, so a refusal names the leaf that changed."""
    flat: dict[str, Any] = {}
    for key, value in settings.items():
        if isinstance(value, dict) and value:
            flat.update(flatten_settings(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def sniff_format(path: str | os.PathLike[str]) -> str:
    """The format of an existing file: from its suffix (``.json`` counts as JSONL), else Parquet's magic bytes."""
    suffix = Path(path).suffix.lower()
    if suffix in SUFFIX_FORMATS:
        return SUFFIX_FORMATS[suffix]
    if suffix == ".json":
        return "jsonl"
    with open(path, "rb") as fh:
        return "parquet" if fh.read(4) == b"PAR1" else "jsonl"
