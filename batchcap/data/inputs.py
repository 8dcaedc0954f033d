"""What readers yield: one :class:`InputItem` per picture, wrapped in an entry that says where its bytes are.

The readers (:mod:`batchcap.data.sources`, :mod:`batchcap.data.tables`) only list and read; the
loader (:mod:`batchcap.data.loader`) decodes entries into batches. :class:`SourceError` is what a
source spec the user must fix raises, whichever reader finds it.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass


class SourceError(Exception):
    """A source spec the user must fix; the message says what is wrong and what to do."""


@dataclass(frozen=True)
class InputItem:
    """One input picture: its stable id, where its bytes live, and a file fingerprint."""

    id: str
    source: str
    size: int | None = None
    mtime_ns: int | None = None


# -- what readers yield --------------------------------------------------------------------


@dataclass(frozen=True)
class FileEntry:
    """A candidate picture on disk; decoded by reading ``item.source`` (fingerprint not yet taken)."""

    item: InputItem


@dataclass(frozen=True)
class MemberEntry:
    """Bytes held inside a container: a tar sample, a table cell; ``data`` None: it holds no picture.

    ``members`` lists a tar sample's members; ``why`` says what is missing when the reader can say
    it better than that list (a table's null cell).
    """

    item: InputItem
    data: bytes | None
    members: tuple[str, ...] = ()
    why: str | None = None


@dataclass(frozen=True)
class ShardFailure:
    """A shard that could not be read to its end; becomes one ``shard_error`` row."""

    item: InputItem
    error: str


@dataclass(frozen=True)
class Ignored:
    """A hidden or non-image name a folder walk passed over (counted, never decoded)."""

    path: str


Entry = FileEntry | MemberEntry | ShardFailure | Ignored


def fingerprinted(item: InputItem) -> InputItem:
    """``item`` with its file's (size, mtime_ns), following symlinks; (None, None) if stat fails.

    Readers list names only; the loader stats the inputs it owns, so N workers walking
    the same tree do not each stat every file.
    """
    try:
        st = os.stat(item.source)
    except OSError:
        return dataclasses.replace(item, size=None, mtime_ns=None)
    return dataclasses.replace(item, size=st.st_size, mtime_ns=st.st_mtime_ns)
