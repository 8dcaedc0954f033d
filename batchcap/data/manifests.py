"""Manifests: ``--files-from`` tables (Parquet, CSV, TSV, JSON lines) that name pictures by path, one a row.

A manifest is the user's own table of pictures. One column holds each picture's path (``--path-column``;
by default the first of :data:`DEFAULT_PATH_COLUMNS` the table has) and, optionally, another holds the
user's key (``--id-column``): then that value, as text, is the row's id, so the output joins back to the
table on it. Without ``--id-column`` the id is the path as written, as for a text list.

The format comes from the file's extension (:func:`manifest_format`); any other name is a text list,
one path a line. A manifest is streamed, never loaded whole: Parquet batch by batch, CSV through
``pyarrow.csv.open_csv``'s block reader, JSON lines one line at a time; only the path and id columns
are read. Every data row becomes exactly one entry:

* a :class:`~batchcap.data.inputs.FileEntry` for a row with a path; the path is data, opened as a file
  name (``pipe:...`` is a file of that name, never a command);
* a :class:`~batchcap.data.inputs.RowFailure` for a row that names no picture -- a null or empty path
  or id, a CSV row with the wrong number of fields, a JSON line that is not an object -- whose id is the
  row's id when it has one, else ``<manifest name>/<row>`` (data rows counted from 0);
* one :class:`~batchcap.data.inputs.RowFailure` for the rest of a manifest that cannot be read to its
  end.

A column the manifest lacks is a :class:`~batchcap.data.inputs.SourceError` before any work.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.parquet as pq

from batchcap.data.extensions import is_remote
from batchcap.data.inputs import FileEntry, InputItem, RowFailure, SourceError
from batchcap.messages import one_line

#: Manifest formats by file extension (lower case); any other name is a text list of paths.
MANIFEST_FORMATS = {".parquet": "parquet", ".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".ndjson": "jsonl"}
#: Path columns tried in this order when ``--path-column`` is not given.
DEFAULT_PATH_COLUMNS = ("path", "filepath", "file", "url", "image_path")
#: Rows turned into Python objects at a time.
READ_ROWS = 4096
#: CSV bytes parsed at a time: a block must hold at least one whole row.
CSV_BLOCK_BYTES = 1 << 20
#: What reading a damaged manifest raises.
MANIFEST_ERRORS = (OSError, pa.ArrowException, ValueError, EOFError, UnicodeDecodeError)


def manifest_format(path: str) -> str | None:
    """``parquet``, ``csv``, ``tsv`` or ``jsonl`` from ``path``'s extension; None for a text list."""
    return MANIFEST_FORMATS.get(os.path.splitext(path)[1].lower())


@dataclass(frozen=True)
class Manifest:
    """One manifest with its columns resolved (by :func:`open_manifest`); picklable into DataLoader workers."""

    path: str
    format: str
    path_column: str
    id_column: str | None = None

    @property
    def name(self) -> str:
        return os.path.basename(self.path)

    @property
    def columns(self) -> list[str]:
        return [self.path_column] + ([self.id_column] if self.id_column else [])

    def rows(self) -> Iterator[tuple[int, Any, Any] | RowFailure]:
        """``(row, path, id)`` per data row in file order (values as the file holds them, None when absent),
        or a :class:`RowFailure` for a row that cannot be read; a read error ends the stream with one.

        Rows are numbered from 0 in the order they come (a CSV row with the wrong number of fields
        comes after the block it was found in), the same in every process that reads the manifest.
        """
        reader = {"parquet": self._parquet_rows, "jsonl": self._json_rows}.get(self.format, self._csv_rows)
        row = 0
        try:
            for found in reader():
                if isinstance(found, str):
                    yield RowFailure(InputItem(id=f"{self.name}/{row}", source=self.path), one_line(found))
                else:
                    yield row, found[0], found[1]
                row += 1
        except MANIFEST_ERRORS as exc:
            yield RowFailure(
                InputItem(id=f"{self.name}/{row}", source=self.path),
                one_line(f"manifest unreadable from row {row} on: {type(exc).__name__}: {exc}"),
            )

    def count(self) -> int:
        """Entries :meth:`rows` yields, read cheaply: Parquet's footer, CSV's path column only, JSON lines'
        non-blank lines; a manifest that breaks off counts the rows before the damage and one failure."""
        rows = 0
        bad: list[str] = []  # CSV rows with the wrong number of fields: rows too (failures)
        try:
            if self.format == "parquet":
                return int(pq.read_metadata(self.path).num_rows)
            if self.format == "jsonl":
                with open(self.path, "rb") as f:
                    return sum(1 for line in f if line.strip())
            for batch in pcsv.open_csv(self.path, **_csv_options(self.format, [self.path_column], bad_rows=bad)):
                rows += batch.num_rows + len(bad)
                bad.clear()
            return rows + len(bad)
        except MANIFEST_ERRORS:
            return rows + 1

    def _parquet_rows(self) -> Iterator[tuple[Any, Any]]:
        batches = pq.ParquetFile(self.path).iter_batches(batch_size=READ_ROWS, columns=self.columns, use_threads=False)
        for batch in batches:
            yield from _pairs(batch, self.id_column is not None)

    def _csv_rows(self) -> Iterator[tuple[Any, Any] | str]:
        bad: list[str] = []  # rows with the wrong number of fields, as pyarrow hands them over
        reader = pcsv.open_csv(self.path, **_csv_options(self.format, self.columns, bad_rows=bad))
        for batch in reader:
            yield from _pairs(batch, self.id_column is not None)
            while bad:  # reported after the batch they were dropped from
                yield f"not a row of the header's fields: {bad.pop(0)[:200]!r}"

    def _json_rows(self) -> Iterator[tuple[Any, Any] | str]:
        with open(self.path, encoding="utf-8", errors="surrogateescape") as f:
            for line in f:
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except ValueError as exc:
                    yield f"not a JSON object: {exc}"
                    continue
                if not isinstance(record, dict):
                    yield f"not a JSON object: {line.strip()[:200]!r}"
                    continue
                yield record.get(self.path_column), record.get(self.id_column) if self.id_column else None


def _pairs(batch: pa.RecordBatch, has_id: bool) -> Iterator[tuple[Any, Any]]:
    """``(path, id)`` cells of a batch whose first column is the path and second, if ``has_id``, the id."""
    paths = [_decoded(v) for v in batch.column(0).to_pylist()]
    ids = [_decoded(v) for v in batch.column(1).to_pylist()] if has_id else [None] * len(paths)
    yield from zip(paths, ids, strict=True)


def _decoded(value: Any) -> Any:
    """A bytes cell as text (bytes that are not UTF-8 kept as a text list keeps them); others as they are."""
    return value.decode("utf-8", "surrogateescape") if isinstance(value, bytes) else value


def _csv_options(fmt: str, columns: list[str], bad_rows: list[str] | None) -> dict[str, Any]:
    """``open_csv`` keywords that read ``columns`` verbatim (``007`` stays ``007``, ``NA`` is a name), as bytes:
    a path that is not UTF-8 is still a path (decoded as a text list's lines are)."""

    def keep_bad_row(row: Any) -> str:
        if bad_rows is not None:
            bad_rows.append(str(row.text))
        return "skip"  # reported by the caller as a row of its own

    return {
        "read_options": pcsv.ReadOptions(use_threads=False, block_size=CSV_BLOCK_BYTES),
        "parse_options": pcsv.ParseOptions(delimiter="\t" if fmt == "tsv" else ",", invalid_row_handler=keep_bad_row),
        "convert_options": pcsv.ConvertOptions(
            include_columns=columns, column_types=dict.fromkeys(columns, pa.binary()), strings_can_be_null=False
        ),
    }


def _column_names(path: str, fmt: str) -> list[str]:
    """The columns ``path`` has: Parquet's schema, CSV's header, the keys of the first JSON line."""
    if fmt == "parquet":
        return list(pq.read_schema(path).names)
    if fmt == "jsonl":
        with open(path, encoding="utf-8", errors="surrogateescape") as f:
            for line in f:
                if line.strip():
                    record = json.loads(line)
                    if not isinstance(record, dict):
                        raise ValueError(f"the first line is not a JSON object: {line.strip()[:80]!r}")
                    return list(record)
        return []
    options = _csv_options(fmt, [], None)
    del options["convert_options"]
    return list(pcsv.open_csv(path, **options).schema.names)


def open_manifest(path: str, path_column: str | None = None, id_column: str | None = None) -> Manifest:
    """The :class:`Manifest` at ``path`` with its path and id columns checked against the columns it has.

    Raises :class:`SourceError` when the manifest cannot be read or lacks a column asked for (naming
    the columns it has and the option to use), and for a ``path`` that is not a manifest.
    """
    fmt = manifest_format(path)
    if fmt is None:
        raise SourceError(f"--files-from {path}: not a manifest ({', '.join(sorted(MANIFEST_FORMATS))})")
    try:
        names = _column_names(path, fmt)
    except MANIFEST_ERRORS as exc:
        raise SourceError(
            f"--files-from {path}: cannot read it as {fmt}: {one_line(str(exc))}; "
            "check the file, or rename a plain list of paths to .txt"
        ) from None
    has = ", ".join(repr(n) for n in names) or "no columns"
    if path_column is None:
        path_column = next((c for c in DEFAULT_PATH_COLUMNS if c in names), None)
        if path_column is None:
            raise SourceError(
                f"--files-from {path}: no path column (looked for {', '.join(DEFAULT_PATH_COLUMNS)}; "
                f"it has {has}); name it with --path-column"
            )
    elif path_column not in names:
        raise SourceError(f"--files-from {path}: no column {path_column!r} for --path-column (it has {has})")
    if id_column is not None and id_column not in names:
        raise SourceError(f"--files-from {path}: no column {id_column!r} for --id-column (it has {has})")
    return Manifest(path, fmt, path_column, id_column)


def _text(value: Any) -> str | None:
    """A cell as an id or a path: text as it is, a whole number in decimals; None for null, empty or other."""
    if isinstance(value, str):
        return value if value.strip() else None
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return None


def manifest_entries(manifest: Manifest, absolute: bool = False) -> Iterator[FileEntry | RowFailure]:
    """One entry per data row of ``manifest``: the picture its path names, or why it names none.

    The id is the ``id_column``'s value as text; without one, the path as written (absolute with
    ``absolute``, ``--id-from absolute``), as for a line of a text list.
    """
    for found in manifest.rows():
        if isinstance(found, RowFailure):
            yield found
            continue
        row, raw_path, raw_id = found
        path, key = _text(raw_path), _text(raw_id)
        if manifest.id_column is not None and key is None:
            yield RowFailure(
                InputItem(id=f"{manifest.name}/{row}", source=manifest.path),
                one_line(f"no id: column {manifest.id_column!r} is {_shown(raw_id)} in row {row}"),
            )
        elif path is None:
            yield RowFailure(
                InputItem(id=key if key is not None else f"{manifest.name}/{row}", source=manifest.path),
                one_line(f"no picture: column {manifest.path_column!r} is {_shown(raw_path)} in row {row}"),
            )
        else:
            rid = key if key is not None else (os.path.abspath(path) if absolute and not is_remote(path) else path)
            yield FileEntry(InputItem(id=rid, source=path))


def _shown(value: Any) -> str:
    """How a cell that is not a usable path or id reads in an error message."""
    if value is None:
        return "null"
    if isinstance(value, str):
        return "empty" if not value else f"blank ({value!r})"
    return f"not text ({type(value).__name__} {value!r})"
