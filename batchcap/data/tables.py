"""Parquet tables of encoded pictures as a source: img2dataset's ``parquet`` output, Hugging Face ``datasets`` files.

A table holds one picture per row, in one of two layouts:

* **a bytes column** named by one of ``ImagePolicy.image_keys`` (img2dataset writes ``jpg``, or
  ``png`` / ``webp`` with another ``--encode_format``, beside ``key``, ``caption``, ``url``, ...);
* **a struct column** with a ``bytes`` field (Hugging Face's ``Image`` feature: ``{bytes, path}``);
  a row whose ``bytes`` is null but whose ``path`` is set is read from that path (relative to
  the table's folder when not absolute).

The id is the ``--id-column``'s value; by default ``key`` when the table has it, else ``id``, else
``<file name>/<row number>`` (rows counted from 0). Only the id and image columns are read, one
row group at a time (in batches of :data:`READ_ROWS` rows), so memory holds part of one row group.

The unit of work is a row group: DataLoader workers and ``--shard I/N`` split a table by row
groups (keyed ``<file name>#<row group>``), so one large file is still decoded by every worker.
A null cell is an ``unsupported`` row (as a tar sample without an image); a file or row group
that cannot be read is one ``shard_error`` row, and the next goes on.
"""

from __future__ import annotations

import os
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from batchcap.data.extensions import is_remote
from batchcap.data.inputs import FileEntry, InputItem, MemberEntry, ShardFailure, SourceError
from batchcap.data.remote import arrow_location, read_errors
from batchcap.data.sharding import in_shard
from batchcap.messages import one_line

#: Id columns tried in this order when ``--id-column`` is not given.
DEFAULT_ID_COLUMNS = ("key", "id")
#: Rows turned into Python objects at a time while a row group is read.
READ_ROWS = 256
#: What reading a damaged Parquet file raises (bad footer, bad page, short file).
TABLE_ERRORS = (OSError, pa.ArrowException, ValueError, EOFError)


def _location(path: str) -> tuple[str, Any]:
    """``(path, filesystem)`` for pyarrow: a local path as it is, a URL through fsspec (:mod:`batchcap.data.remote`)."""
    return arrow_location(path) if is_remote(path) else (path, None)


def _errors(path: str) -> tuple[type[BaseException], ...]:
    """What reading ``path`` raises for damage or I/O: :data:`TABLE_ERRORS`, and at a URL the network's too."""
    return (*TABLE_ERRORS, *read_errors()) if is_remote(path) else TABLE_ERRORS


def _is_bytes(kind: pa.DataType) -> bool:
    return pa.types.is_binary(kind) or pa.types.is_large_binary(kind) or pa.types.is_fixed_size_binary(kind)


def image_column(schema: pa.Schema, image_keys: Sequence[str]) -> tuple[str, bool] | None:
    """``(name, is_struct)`` of the column that holds the pictures, or None.

    A bytes column named by the first of ``image_keys`` present wins; else the first struct
    column with a bytes field called ``bytes`` (Hugging Face's ``Image``).
    """
    names = {name.lower(): name for name in schema.names}
    for key in image_keys:
        name = names.get(key.lower())
        if name is not None and _is_bytes(schema.field(name).type):
            return name, False
    for f in schema:
        if pa.types.is_struct(f.type):
            fields = {f.type.field(i).name: f.type.field(i).type for i in range(f.type.num_fields)}
            if "bytes" in fields and _is_bytes(fields["bytes"]):
                return f.name, True
    return None


@dataclass(frozen=True)
class TableFile:
    """One Parquet file as the workers need it: columns to read and rows per row group (read once, from its footer).

    ``error`` is set when the footer could not be read: the file becomes one ``shard_error`` row.
    """

    path: str
    image: str = ""
    is_struct: bool = False
    id_column: str | None = None
    group_rows: tuple[int, ...] = ()
    error: str | None = None

    @property
    def name(self) -> str:
        return os.path.basename(self.path)

    def units(self) -> Iterator[tuple[str, int]]:
        """``(key, row group)`` for each row group; ``(name, -1)`` for a file that cannot be read."""
        if self.error is not None:
            yield self.name, -1
            return
        for group in range(len(self.group_rows)):
            yield f"{self.name}#{group}", group

    def read(self, group: int) -> Iterator[MemberEntry | FileEntry | ShardFailure]:
        """The rows of one row group, in order; a read error ends it with one :class:`ShardFailure`."""
        if group < 0:
            yield ShardFailure(InputItem(id=self.name, source=self.path), one_line(f"table unreadable: {self.error}"))
            return
        row = sum(self.group_rows[:group])
        columns = [self.image] + ([self.id_column] if self.id_column else [])
        batches: Iterator[pa.RecordBatch] | None = None
        errors = _errors(self.path)
        while True:
            try:  # only the reading: an error in the code below is a bug, not a damaged table
                if batches is None:
                    where, filesystem = _location(self.path)
                    parquet = pq.ParquetFile(where, filesystem=filesystem)
                    batches = parquet.iter_batches(
                        batch_size=READ_ROWS, row_groups=[group], columns=columns, use_threads=False
                    )
                batch = next(batches, None)
                if batch is None:
                    return
                images = batch.column(0).to_pylist()
                ids = batch.column(1).to_pylist() if self.id_column else [None] * len(images)
            except errors as exc:
                yield ShardFailure(
                    InputItem(id=f"{self.name}#{group}", source=self.path),
                    one_line(f"row group {group} unreadable at row {row}: {type(exc).__name__}: {exc}"),
                )
                return
            for cell, key in zip(images, ids, strict=True):
                yield self._entry(cell, key, row)
                row += 1

    def _entry(self, cell: object, key: object, row: int) -> MemberEntry | FileEntry:
        rid = f"{self.name}/{row}" if key is None else str(key)
        item = InputItem(id=rid, source=self.path)
        if self.is_struct and isinstance(cell, dict):
            data, path = cell.get("bytes"), cell.get("path")
            if data is None and path:
                beside = os.path.isabs(path) or is_remote(path)
                where = path if beside else os.path.join(os.path.dirname(self.path), path)
                return FileEntry(InputItem(id=rid, source=where))
            cell = data
        if cell is None:
            return MemberEntry(item, None, why=f"no image: column {self.image!r} is null in row {row}")
        return MemberEntry(item, bytes(cell))  # type: ignore[call-overload]  # a binary cell: bytes


def open_table(path: str, image_keys: Sequence[str], id_column: str | None) -> TableFile:
    """Read ``path``'s footer: which columns hold the id and the picture, and the row groups' sizes.

    Raises :class:`SourceError` when the table has no picture column, or not the ``id_column``
    asked for; a file whose footer cannot be read becomes a :class:`TableFile` with ``error``.
    """
    try:
        where, filesystem = _location(path)
        meta = pq.read_metadata(where, filesystem=filesystem)
        schema = meta.schema.to_arrow_schema()
    except _errors(path) as exc:
        return TableFile(path, error=f"{type(exc).__name__}: {exc}")
    found = image_column(schema, image_keys)
    if found is None:
        raise SourceError(
            f"{path}: no column of pictures (looked for a bytes column named {', '.join(image_keys)}, "
            f"or a struct with a 'bytes' field; has {', '.join(schema.names) or 'no columns'}); "
            "name the column with --image-key"
        )
    if id_column is not None and id_column not in schema.names:
        raise SourceError(f"{path}: no column {id_column!r} for --id-column (has {', '.join(schema.names)})")
    chosen = id_column or next((c for c in DEFAULT_ID_COLUMNS if c in schema.names), None)
    groups = tuple(meta.row_group(i).num_rows for i in range(meta.num_row_groups))
    return TableFile(path, found[0], found[1], chosen, groups)


@dataclass(frozen=True)
class TableReader:
    """Parquet files of encoded pictures, read row group by row group."""

    tables: tuple[TableFile, ...]
    kind: str = field(default="table", init=False)

    def count(self, shard_index: int = 0, shard_count: int = 1) -> int:
        """Rows in the row groups of one job shard (from the footers, nothing decoded)."""
        total = 0
        for table in self.tables:
            for key, group in table.units():
                if in_shard(key, shard_index, shard_count):
                    total += table.group_rows[group] if group >= 0 else 1
        return total


def open_tables(paths: Sequence[str], image_keys: Sequence[str], id_column: str | None = None) -> TableReader:
    """A :class:`TableReader` over ``paths`` (each one's footer read once, here)."""
    return TableReader(tuple(open_table(p, image_keys, id_column) for p in paths))


def pictures_by_id(path: str, ids: Collection[str], image_keys: Sequence[str]) -> dict[str, bytes | str]:
    """The picture bytes of the rows of ``path`` whose id is in ``ids``, or why there are none, reading it once.

    Ids follow the default rule (``key``, else ``id``, else ``<file name>/<row>``): rows captioned
    with another ``--id-column`` are not found. For ``batchcap report``'s thumbnails.
    """
    wanted = set(ids)
    try:
        table = open_table(path, image_keys, None)
    except SourceError as exc:
        return dict.fromkeys(wanted, str(exc))
    found: dict[str, bytes | str] = {}
    failure: str | None = None  # a damaged row group may have held the rows not found
    for _, group in table.units():
        for entry in table.read(group):
            if isinstance(entry, ShardFailure):
                failure = entry.error
                continue
            if entry.item.id not in wanted:
                continue
            if isinstance(entry, MemberEntry):
                found[entry.item.id] = entry.data if entry.data is not None else (entry.why or "no image")
                continue
            try:  # a Hugging Face row whose picture is a file beside the table
                with open(entry.item.source, "rb") as f:
                    found[entry.item.id] = f.read()
            except OSError as exc:
                found[entry.item.id] = f"{type(exc).__name__}: {exc}"
        if len(found) == len(wanted):
            return found
    if failure is not None:
        found.update(dict.fromkeys(wanted - set(found), failure))
    return found
