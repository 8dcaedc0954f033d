"""What readers yield: one :class:`InputItem` per picture, wrapped in an entry that says where its bytes are.

The readers (:mod:`batchcap.data.sources`, :mod:`batchcap.data.tables`) only list and read; the
loader (:mod:`batchcap.data.loader`) decodes entries into batches. :class:`SourceError` is what a
source spec the user must fix raises, whichever reader finds it.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

from batchcap.data.extensions import is_remote


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
class RowFailure:
    """A manifest row that names no picture (a null or empty path or id, a row that cannot be parsed).

    It becomes one ``missing`` row with ``error``, so a fixed manifest is read again on the next run.
    """

    item: InputItem
    error: str


@dataclass(frozen=True)
class Duplicate:
    """An input whose id an earlier input already has; ``item.id`` is the id made unique (``<id>#2``).

    It becomes one ``duplicate_id`` row naming both inputs and is never decoded.
    """

    item: InputItem
    error: str
    member: bool = False  # a tar sample (done by id alone), not a file (done by id and fingerprint)


@dataclass(frozen=True)
class Ignored:
    """A hidden or non-image name a folder walk passed over (never decoded; counted and listed)."""

    path: str  # relative to the folder
    source: str = ""  # the path as walked
    kind: str = ""  # "hidden", "unreadable folder"; empty: not a picture (its extension says more)

    @property
    def category(self) -> str:
        """What the run summary counts it under: its kind, else its extension (``.heic``)."""
        if self.kind:
            return self.kind
        return os.path.splitext(self.path)[1].lower() or "no extension"


Entry = FileEntry | MemberEntry | ShardFailure | RowFailure | Duplicate | Ignored


def fingerprinted(item: InputItem) -> InputItem:
    """``item`` with its file's (size, mtime_ns), following symlinks; (None, None) if stat fails.

    Readers list names only; the loader stats the inputs it owns, so N workers walking
    the same tree do not each stat every file. A URL keeps the fingerprint its folder's
    listing gave it (none for a URL named alone or in a list: such inputs are done by id).
    """
    if is_remote(item.source):
        return item
    try:
        st = os.stat(item.source)
    except OSError:
        return dataclasses.replace(item, size=None, mtime_ns=None)
    return dataclasses.replace(item, size=st.st_size, mtime_ns=st.st_mtime_ns)
