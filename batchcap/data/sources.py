"""Sources: what ``batchcap run SOURCE...`` reads, turned into a stream of inputs.

One factory, :func:`open_sources`, looks at each spec and picks a reader:

* a **folder** -- walked recursively in sorted order, symlinks followed (each directory
  visited once, so loops end), hidden names and non-image files passed over and counted;
  the id is the path relative to the folder, with ``/`` separators;
* a **file list** (``--files-from FILE``, ``-`` for stdin) -- one path per line; the id is
  the path as listed; a ``.parquet``, ``.csv``, ``.tsv``, ``.jsonl`` or ``.ndjson`` file is a
  manifest, a table with a path column and maybe an id column (:mod:`batchcap.data.manifests`);
* a single **image file** -- its id is the path as given;
* **WebDataset shards** -- a local ``.tar``, a brace pattern (``shards-{0000..0099}.tar``),
  a glob, ``pipe:cat x.tar`` (read with webdataset's ``gopen``) or a URL (through fsspec), each
  streamed through webdataset's ``tar_file_iterator``. The image is the first present of
  ``ImagePolicy.image_keys``; the id is ``<shard basename>/<__key__>``. A damaged shard yields
  the samples read before the damage and one ``shard_error`` entry, and the next shard goes on.
* **Parquet tables** of encoded pictures -- a ``.parquet`` file, a pattern or brace range of
  them, or a folder that holds ``.parquet`` files and no pictures at its top (img2dataset's
  output folder); :mod:`batchcap.data.tables` reads them. The run's own output is never a source.
* **URLs** that fsspec reads (``s3://``, ``gs://``, ``https://``, ...) -- each of the above, told
  apart by name (:func:`_open_url`); a folder URL is a :class:`UrlFolderReader`, listed as a
  stream. :mod:`batchcap.data.remote` does the reading, retries and listing.

Those are the ``relative`` ids, which one source keeps unique. With a folder or tar source
beside another source (``--id-from auto``, the default) ids are ``source-relative``: each folder's, picture's or
shard's path relative to the common parent of all the sources prefixes its ids
(``cam2023/IMG_1.jpg``, ``a/shards-0000.tar/key``); ``absolute`` prefixes absolute paths.
:func:`open_sources` refuses what would still collide as a whole (a folder inside another,
two shards with one label); an input whose id an earlier input already has (a list naming
a path twice, a key repeated in a tar, colliding ``relative`` ids) becomes a
:class:`Duplicate`: one ``duplicate_id`` row under ``<id>#2`` (``#3``, ...), never a
silent overwrite of the first.

Readers only list and read bytes; decoding is :mod:`batchcap.data.image_decode`'s job and the
split into shards and DataLoader workers is :mod:`batchcap.data.loader`'s. Every reader is a
small frozen dataclass of paths, so a :class:`SourceSet` pickles into worker processes.
"""

from __future__ import annotations

import atexit
import dataclasses
import glob
import os
import posixpath
import re
import shutil
import stat
import sys
import tarfile
import tempfile
import zlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from batchcap.config import ImagePolicy
from batchcap.data.extensions import TAR_SUFFIXES, is_image_name, is_remote, is_table_name
from batchcap.data.inputs import (
    Duplicate,
    Entry,
    FileEntry,
    Ignored,
    InputItem,
    MemberEntry,
    RowFailure,
    ShardFailure,
    SourceError,
)
from batchcap.data.manifests import Manifest, manifest_entries, manifest_format, open_manifest
from batchcap.data.remote import (
    check_folder,
    check_protocol,
    describe,
    folder_url,
    is_folder,
    open_stream,
    open_text,
    read_errors,
    walk,
)
from batchcap.data.sharding import in_shard
from batchcap.data.tables import TableReader, open_tables
from batchcap.messages import one_line

_GLOB_CHARS = re.compile(r"[*?\[]")
_BRACE = re.compile(r"\{[^{}]*(\.\.|,)[^{}]*\}")

#: What a damaged tar stream raises while it is read (tarfile, gzip, a failing ``pipe:``).
SHARD_ERRORS: tuple[type[BaseException], ...] = (tarfile.TarError, OSError, EOFError, zlib.error)


def _duplicate(item: InputItem, seen: dict[str, str], error: str, member: bool = False) -> Duplicate:
    """``item`` under the first free ``<id>#N`` (N = 2, 3, ...), recorded in ``seen``."""
    n = 2
    while f"{item.id}#{n}" in seen:
        n += 1
    renamed = dataclasses.replace(item, id=f"{item.id}#{n}")
    seen[renamed.id] = item.source
    return Duplicate(renamed, one_line(error), member)


def unique_entries(
    entries: Iterable[Entry], seen: dict[str, str], only: frozenset[str] | None = None
) -> Iterator[Entry]:
    """``entries`` with every file (or manifest row) whose id is in ``seen`` (id -> source) turned into a
    :class:`Duplicate`.

    ``seen`` is shared by all the readers of a run, so that a collision between two sources
    is caught too; every DataLoader worker walks the same listing in the same order, so
    they all name the same input the duplicate. With ``only`` (the ids a survey found
    repeated, see :meth:`SourceSet.surveyed`), only those ids are remembered.
    """
    for entry in entries:
        if not isinstance(entry, (FileEntry, RowFailure)) or (only is not None and entry.item.id not in only):
            yield entry
            continue
        first = seen.get(entry.item.id)
        if first is None:
            seen[entry.item.id] = entry.item.source
            yield entry
        else:
            yield _duplicate(
                entry.item,
                seen,
                f"{entry.item.source} has the id {entry.item.id!r}, which {first} already has; only {first} "
                "was captioned (ids must be unique: see --id-from)",
            )


# -- readers -------------------------------------------------------------------------------


@dataclass(frozen=True)
class FolderReader:
    """A directory tree, walked depth-first in sorted name order.

    Memory holds the sorted entries of the directories on the current path only. Each
    directory is entered once (keyed by device and inode), so symlink loops end; a
    symlink that cannot be resolved but carries an image extension is still yielded, so
    that it becomes a ``missing`` or ``unreadable`` row rather than vanishing.
    """

    root: str
    prefix: str = ""  # put before every id (``cam2023/``): see ``--id-from``
    kind: str = field(default="folder", init=False)

    def entries(self) -> Iterator[FileEntry | Ignored]:
        root = self.root
        seen: set[tuple[int, int]] = set()
        st = os.stat(root)
        seen.add((st.st_dev, st.st_ino))
        stack: list[tuple[str, Iterator[os.DirEntry[str]]]] = [("", self._sorted(root))]
        while stack:
            rel_dir, it = stack[-1]
            entry = next(it, None)
            if entry is None:
                stack.pop()
                continue
            rel = f"{rel_dir}/{entry.name}" if rel_dir else entry.name
            if entry.name.startswith("."):
                yield Ignored(rel, entry.path, "hidden")
                continue
            try:
                is_dir = entry.is_dir(follow_symlinks=True)
            except OSError:
                is_dir = False
            if is_dir:
                try:
                    dst = entry.stat(follow_symlinks=True)
                    key = (dst.st_dev, dst.st_ino)
                    if key in seen:
                        continue  # a symlink back into the tree: already walked
                    seen.add(key)
                    stack.append((rel, self._sorted(entry.path)))
                except OSError:
                    yield Ignored(rel, entry.path, "unreadable folder")  # counted and listed, not fatal
                continue
            if not is_image_name(entry.name):
                yield Ignored(rel, entry.path)
                continue
            yield FileEntry(InputItem(id=self.prefix + rel, source=entry.path))

    @staticmethod
    def _sorted(path: str) -> Iterator[os.DirEntry[str]]:
        with os.scandir(path) as scan:
            entries = sorted(scan, key=lambda e: e.name)
        return iter(entries)

    def count(self) -> int:
        return sum(1 for e in self.entries() if isinstance(e, FileEntry))


def open_list(path: str) -> IO[str]:
    """A list of paths (``--files-from``) opened for reading, whether ``path`` is a local file or a URL."""
    if is_remote(path):
        return open_text(path)
    return open(path, encoding="utf-8", errors="surrogateescape", newline="")


def absolute_id(path: str) -> str:
    """``path`` made absolute for ``--id-from absolute``; a URL is absolute already."""
    return path if is_remote(path) else os.path.abspath(path)


@dataclass(frozen=True)
class UrlFolderReader:
    """A folder URL (an object-store prefix, a web server's index page), listed as a stream.

    Ids are the keys relative to the folder URL (``--id-from absolute``: the objects' URLs).
    Hidden names and non-pictures are passed over and counted, as in a local folder; each
    object's size and modification time from the listing are its fingerprint for resuming.
    The order is the store's (:func:`batchcap.data.remote.walk`), the same on every pass.
    """

    root: str
    prefix: str = ""  # put before every id: see ``--id-from``
    absolute: bool = False  # ids are the objects' URLs
    kind: str = field(default="folder", init=False)

    def entries(self) -> Iterator[FileEntry | Ignored]:
        """The folder's objects in listing order; a listing that breaks off (after the store's own
        retries) raises :class:`SourceError`: the run stops, and a rerun resumes."""
        rel = ""
        errors = read_errors()  # looked up now: an except clause is evaluated even for GeneratorExit
        try:
            for rel, url, size, mtime_ns in walk(self.root):
                if any(part.startswith(".") for part in rel.split("/")):
                    yield Ignored(rel, url, "hidden")
                elif not is_image_name(rel):
                    yield Ignored(rel, url)
                else:
                    item_id = url if self.absolute else self.prefix + rel
                    yield FileEntry(InputItem(id=item_id, source=url, size=size, mtime_ns=mtime_ns))
        except errors as exc:
            after = f"after {rel}" if rel else "at the start"
            raise SourceError(f"{self.root}: the listing broke off {after}: {describe(exc)}; rerun to resume") from exc

    def count(self) -> int:
        return sum(1 for e in self.entries() if isinstance(e, FileEntry))


@dataclass(frozen=True)
class ListReader:
    """A text file of paths, one a line (blank lines skipped); every line is a candidate.

    With ``manifest``, the file is a table instead, read by :func:`batchcap.data.manifests.manifest_entries`.
    """

    path: str
    absolute: bool = False  # ids are the absolute paths, not the lines as written
    manifest: Manifest | None = None
    kind: str = field(default="list", init=False)

    def _lines(self) -> Iterator[str]:
        with open_list(self.path) as f:
            for line in f:
                line = line.rstrip("\r\n")
                if line.strip():
                    yield line

    def entries(self) -> Iterator[FileEntry | RowFailure]:
        if self.manifest is not None:
            yield from manifest_entries(self.manifest, self.absolute)
            return
        for line in self._lines():
            yield FileEntry(InputItem(id=absolute_id(line) if self.absolute else line, source=line))

    def count(self) -> int:
        """Lines, or a manifest's rows: one entry each."""
        if self.manifest is not None:
            return self.manifest.count()
        return sum(1 for _ in self._lines())


@dataclass(frozen=True)
class FileReader:
    """A single picture named on the command line; its id is the path as given."""

    path: str
    item_id: str | None = None  # None: the path as given
    kind: str = field(default="file", init=False)

    def entries(self) -> Iterator[FileEntry]:
        yield FileEntry(InputItem(id=self.item_id or self.path, source=self.path))

    def count(self) -> int:
        return 1


def shard_name(url: str) -> str:
    """The basename that prefixes a tar sample's id (``pipe:cat /a/b.tar`` -> ``b.tar``).

    For a ``pipe:`` command it is the last word that names a tar (``.tar``, ``.tgz``,
    ``.tar.gz``), else the command's last word.
    """

    def base(word: str) -> str:
        word = word.strip("'\"").split("?", 1)[0].rstrip("/")
        return posixpath.basename(word.replace(os.sep, "/")) or word

    if url.startswith("pipe:"):
        words = url[5:].split() or [url]
        tars = [w for w in words if _is_tar_name(base(w))]
        return base(tars[-1] if tars else words[-1])
    return base(url)


@dataclass(frozen=True)
class TarReader:
    """WebDataset shards, read one after another as byte streams (never extracted)."""

    urls: tuple[str, ...]
    image_keys: tuple[str, ...] = ("jpg", "jpeg", "png", "webp")
    #: What prefixes each shard's ids, one per url (``--id-from``); empty: the shard's basename.
    labels: tuple[str, ...] = ()
    kind: str = field(default="tar", init=False)

    def shards(self) -> Iterator[tuple[str, str]]:
        """Each shard's url and the label its ids start with."""
        for index, url in enumerate(self.urls):
            yield url, self.labels[index] if self.labels else shard_name(url)

    def read_shard(self, url: str, label: str | None = None) -> Iterator[MemberEntry | ShardFailure | Duplicate]:
        """The samples of one shard, then a :class:`ShardFailure` if it broke off early.

        Members are grouped by webdataset's rule (key = name up to the first dot of the
        basename). A sample being assembled when the damage hit is still yielded when
        it has an image: every member read so far arrived whole. A key met again after
        other samples (members not stored together) is a :class:`Duplicate`.
        """
        from webdataset.gopen import gopen
        from webdataset.tariterators import base_plus_ext, tar_file_iterator

        name = label if label is not None else shard_name(url)
        keys = tuple(k.lower() for k in self.image_keys)
        current: dict[str, bytes] = {}
        current_key: str | None = None
        finished: dict[str, str] = {}  # ids of this shard's samples so far -> their source

        def finish() -> MemberEntry | Duplicate:
            data = next((current[k] for k in keys if k in current), None)
            item = InputItem(id=f"{name}/{current_key}", source=url)
            if item.id in finished:
                return _duplicate(
                    item,
                    finished,
                    f"key {current_key!r} appears twice in {url} (members of one sample stored apart); "
                    "only the first sample was captioned",
                    member=True,
                )
            finished[item.id] = url
            return MemberEntry(item, data, tuple(sorted(current)))

        stream = None
        errors = (*SHARD_ERRORS, *read_errors()) if is_remote(url) else SHARD_ERRORS  # + a URL's (HTTP, a cut)
        try:
            stream = open_stream(url) if is_remote(url) else gopen(url, "rb")
            for member in tar_file_iterator(stream):
                key, suffix = base_plus_ext(member["fname"])
                if key is None:
                    continue
                suffix = suffix.lower()
                if key != current_key:
                    if current_key is not None:
                        yield finish()
                    current, current_key = {}, key
                if suffix in current:
                    raise tarfile.ReadError(f"duplicate member {member['fname']!r} in sample {key!r}")
                current[suffix] = member["data"]
            stream.close()
        except errors as exc:
            if current_key is not None and any(k in current for k in keys):
                yield finish()
            if is_remote(url):
                message = describe(exc)
            else:
                message = str(exc.args[0]).split(" @ ")[0] if exc.args else type(exc).__name__
            yield ShardFailure(
                InputItem(id=name, source=url),
                one_line(f"shard unreadable after {current_key or 'the start'}: {message}"),
            )
            return
        finally:
            if stream is not None:
                try:
                    stream.close()
                except errors:
                    pass
        if current_key is not None:
            yield finish()


Reader = FolderReader | UrlFolderReader | ListReader | FileReader | TarReader | TableReader


@dataclass(frozen=True)
class SourceSet:
    """The readers for one run, in command-line order; picklable into DataLoader workers.

    ``id_scheme`` is the resolved ``--id-from`` (``relative``, ``source-relative`` or
    ``absolute``) the readers' ids were made with.
    """

    readers: tuple[Reader, ...]
    id_scheme: str = "relative"
    #: The ids the listing holds more than once (:meth:`surveyed`); None: not surveyed, remember every id.
    repeated: frozenset[str] | None = None

    @property
    def may_collide(self) -> bool:
        """Whether two files could get one id: a list (it may name a path twice), or several
        sources under ``relative`` ids. Otherwise ids are unique by construction (see
        :func:`open_sources`) and nobody needs to remember every id seen."""
        files = [r for r in self.readers if not isinstance(r, (TarReader, TableReader))]
        return any(isinstance(r, ListReader) for r in files) or (self.id_scheme == "relative" and len(files) > 1)

    def id_tracker(self) -> dict[str, str] | None:
        """A fresh id -> source map for :meth:`entries` to share across readers; None when not needed."""
        return {} if self.may_collide else None

    def entries(
        self, reader: FolderReader | UrlFolderReader | ListReader | FileReader, seen: dict[str, str] | None
    ) -> Iterator[Entry]:
        """``reader``'s entries, a file whose id ``seen`` holds made a :class:`Duplicate`."""
        entries: Iterator[Entry] = reader.entries()
        return entries if seen is None else unique_entries(entries, seen, self.repeated)

    def surveyed(self) -> SourceSet:
        """This set with :attr:`repeated` filled in by one listing pass (when ids may collide at all).

        Every DataLoader worker walks the whole listing; remembering every id there would cost
        each worker memory in proportion to the collection. After this pass in one process,
        workers remember only the few ids that repeat.
        """
        if not self.may_collide or self.repeated is not None:
            return self
        once: set[str] = set()
        repeated: set[str] = set()
        for reader in self.readers:
            if isinstance(reader, (TarReader, TableReader)):  # ids from keys and id columns: never walked here
                continue
            for entry in reader.entries():
                if isinstance(entry, (FileEntry, RowFailure)):
                    (repeated if entry.item.id in once else once).add(entry.item.id)
        return dataclasses.replace(self, repeated=frozenset(repeated))

    def count(self, shard_index: int = 0, shard_count: int = 1) -> int | None:
        """Candidate pictures (in one shard), by a listing pass; None when tars or folder URLs are involved.

        A folder URL is not listed here: a bucket of millions of keys would be listed once before
        the first picture is captioned (the run's progress then shows no total).
        """
        if any(isinstance(r, (TarReader, UrlFolderReader)) for r in self.readers):
            return None
        total = 0
        seen = self.id_tracker()
        for reader in self.readers:
            if isinstance(reader, TableReader):  # rows per row group, from the footers
                total += reader.count(shard_index, shard_count)
                continue
            if isinstance(reader, ListReader) and shard_count == 1:  # every row is one entry; ids matter not
                total += reader.count()
                continue
            for entry in self.entries(reader, seen):  # type: ignore[arg-type]
                if isinstance(entry, (FileEntry, Duplicate, RowFailure)) and in_shard(
                    entry.item.id, shard_index, shard_count
                ):
                    total += 1
        return total

    @property
    def has_tars(self) -> bool:
        return any(isinstance(r, TarReader) for r in self.readers)


# -- the factory ---------------------------------------------------------------------------


def _is_tar_name(path: str) -> bool:
    return path.lower().endswith(TAR_SUFFIXES)


def _is_url(spec: str) -> bool:
    return spec.startswith("pipe:") or "://" in spec


def _stdin_to_file() -> str:
    """Copy stdin's path list to a temporary file, so every worker can read it again."""
    fd, path = tempfile.mkstemp(prefix="batchcap-files-from-", suffix=".txt")
    with os.fdopen(fd, "wb") as out:
        shutil.copyfileobj(sys.stdin.buffer, out)
    owner = os.getpid()  # forked workers must not remove it

    def remove() -> None:
        if os.getpid() == owner and os.path.exists(path):
            os.unlink(path)

    atexit.register(remove)
    return path


def _excluded(path: str, exclude: Sequence[str]) -> bool:
    """Whether ``path`` is one of ``exclude`` or inside one (the run's own output and work folder)."""
    real = os.path.realpath(path)
    return any(real == e or real.startswith(e.rstrip(os.sep) + os.sep) for e in exclude)


def _table_folder(root: str, exclude: Sequence[str]) -> list[str]:
    """The Parquet files under ``root`` when it is a folder of tables (a ``.parquet`` at its top and no
    picture), sorted; else an empty list (a folder of pictures, walked by :class:`FolderReader`)."""

    def is_file(entry: os.DirEntry[str]) -> bool:
        try:
            return entry.is_file()
        except OSError:  # a symlink loop or a dangling link: the folder walk reports it
            return False

    with os.scandir(root) as scan:
        top = [e.name for e in scan if not e.name.startswith(".") and is_file(e)]
    if any(is_image_name(n) for n in top) or not any(is_table_name(n) for n in top):
        return []
    found = []
    for folder, dirs, files in os.walk(root, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and not _excluded(os.path.join(folder, d), exclude))
        found += [os.path.join(folder, n) for n in sorted(files) if is_table_name(n) and not n.startswith(".")]
    return [f for f in found if not _excluded(f, exclude)]


def _open_url(spec: str, keys: tuple[str, ...], id_column: str | None) -> Reader:
    """The reader for a URL fsspec reads, by its name: shards, tables, a picture or a folder.

    Only a folder is looked up here (is it one?); a single picture that is not there
    becomes a ``missing`` row, as a path in a list does.
    """
    check_protocol(spec)
    name = spec.split("?", 1)[0]
    if _BRACE.search(name):
        from webdataset.shardlists import expand_urls

        urls = tuple(expand_urls(spec))
        if all(is_table_name(u.split("?", 1)[0]) for u in urls):
            return open_tables(urls, keys, id_column)
        return TarReader(urls, keys)
    if _is_tar_name(name):
        return TarReader((spec,), keys)
    if is_table_name(name):
        return open_tables([spec], keys, id_column)
    if is_image_name(name):
        return FileReader(spec)
    if is_folder(spec):
        check_folder(folder_url(spec))
        return UrlFolderReader(folder_url(spec))
    raise SourceError(
        f"{spec}: not a folder, a .tar shard, a .parquet table or a picture (a web server's folder URL "
        "ends in /); a list of paths goes to --files-from"
    )


def _open_spec(spec: str, policy: ImagePolicy, id_column: str | None, exclude: Sequence[str]) -> Reader:
    keys = tuple(policy.image_keys)
    if is_remote(spec):
        return _open_url(spec, keys, id_column)
    if _is_url(spec):
        from webdataset.shardlists import expand_urls

        return TarReader(tuple(expand_urls(spec)), keys)
    if os.path.isdir(spec):
        tables = _table_folder(spec, exclude)
        return open_tables(tables, keys, id_column) if tables else FolderReader(spec)
    if os.path.isfile(spec):
        if _is_tar_name(spec):
            return TarReader((spec,), keys)
        if is_table_name(spec):
            return open_tables([spec], keys, id_column)
        if is_image_name(spec):
            return FileReader(spec)
        raise SourceError(
            f"{spec}: not a folder, a .tar shard, a .parquet table or a picture; a list of paths goes to --files-from"
        )
    if _BRACE.search(spec):
        from webdataset.shardlists import expand_urls

        urls = expand_urls(spec)
        missing = [u for u in urls if not os.path.isfile(u)]
        if missing:
            raise SourceError(
                f"{spec}: {len(missing)} of the {len(urls)} shards it names do not exist "
                f"(first: {missing[0]}); fix the range or list the shards that exist"
            )
        if all(is_table_name(u) for u in urls):
            return open_tables([u for u in urls if not _excluded(u, exclude)], keys, id_column)
        return TarReader(tuple(urls), keys)
    if _GLOB_CHARS.search(spec):
        matches = [m for m in sorted(glob.glob(spec, recursive=True)) if not _excluded(m, exclude)]
        if not matches:
            raise SourceError(f"{spec}: the pattern matches nothing; check the path and quote it")
        tables = [m for m in matches if is_table_name(m) and os.path.isfile(m)]
        if tables and len(tables) == len(matches):
            return open_tables(tables, keys, id_column)
        tars = [m for m in matches if _is_tar_name(m) and os.path.isfile(m)]
        if len(tars) != len(matches):
            raise SourceError(
                f"{spec}: a pattern must match .tar shards or .parquet tables only ({len(matches) - len(tars)} "
                f"other matches, e.g. {next(m for m in matches if m not in tars)}); "
                "pass folders by name"
            )
        return TarReader(tuple(tars), keys)
    if os.path.lexists(spec) and stat.S_ISLNK(os.lstat(spec).st_mode):
        raise SourceError(f"{spec}: a broken symbolic link; point it at a folder or shard")
    raise SourceError(f"{spec}: no such file or folder")


#: ``--id-from`` values; ``auto`` is ``relative`` for one source, ``source-relative`` for several.
ID_SCHEMES = ("auto", "relative", "source-relative", "absolute")


def open_sources(
    specs: Sequence[str],
    files_from: str | None = None,
    policy: ImagePolicy = ImagePolicy(),
    id_column: str | None = None,
    exclude: Sequence[str | os.PathLike[str]] = (),
    id_from: str = "auto",
    path_column: str | None = None,
) -> SourceSet:
    """Build the readers for ``specs`` (and ``--files-from``), checking that each exists.

    ``id_column`` names the id column of Parquet tables (:mod:`batchcap.data.tables`) and of a
    ``files_from`` manifest, ``path_column`` a manifest's path column (:mod:`batchcap.data.manifests`);
    ``exclude`` lists paths a folder of tables or a pattern must not pick up (the run's own
    output and work folder, which are Parquet files too).

    Raises :class:`SourceError` for a spec that names nothing, when there is no source at
    all, and when the sources would collide as a whole under the ``id_from`` scheme (a
    folder given twice or inside another, two shards whose ids share one prefix). Folders
    and lists are not walked here (see :meth:`SourceSet.count`).
    """
    if id_from not in ID_SCHEMES:
        raise ValueError(f"id_from must be one of {', '.join(ID_SCHEMES)}, not {id_from!r}")
    if path_column is not None and files_from is None:
        raise SourceError("--path-column names the path column of a --files-from manifest; pass --files-from too")
    skip = [os.path.realpath(e) for e in exclude]
    readers: list[Reader] = [_open_spec(str(spec), policy, id_column, skip) for spec in specs]
    if files_from is not None:
        readers.append(_list_reader(files_from, id_column, path_column))
    if not readers:
        raise SourceError("no input: name folders, shards or pictures, or pass --files-from")
    _refuse_nested(readers)
    scheme = id_from if id_from != "auto" else _auto_scheme(readers)
    readers = _with_ids(readers, scheme)
    _refuse_shared_labels(readers, scheme)
    return SourceSet(tuple(readers), scheme)


def _list_reader(files_from: str, id_column: str | None, path_column: str | None) -> ListReader:
    """The reader of ``--files-from``: a text list of paths, or a manifest (a table; see :func:`manifest_format`)."""
    if files_from == "-":
        path = _stdin_to_file()
    elif is_remote(files_from):
        check_protocol(files_from)
        path = files_from
    elif not os.path.isfile(files_from):
        raise SourceError(f"--files-from {files_from}: no such file")
    else:
        path = str(Path(files_from))
    if manifest_format(files_from) is not None:
        if is_remote(files_from):
            raise SourceError(
                f"--files-from {files_from}: a manifest is read from a local or network disk; copy it there "
                "first (its paths may still be URLs), or give a text list of paths, which may be a URL"
            )
        return ListReader(path, manifest=open_manifest(path, path_column, id_column))
    if path_column is not None:
        raise SourceError(
            f"--path-column: --files-from {files_from} is a text list, one path a line; a manifest with columns "
            "must be named .parquet, .csv, .tsv, .jsonl or .ndjson"
        )
    return ListReader(path)


def _refuse_nested(readers: Sequence[Reader]) -> None:
    """A folder or picture given twice, or inside a folder also given, would be read twice.

    Linear in the number of sources (``batchcap run photos/*.jpg`` may name thousands): each
    path's ancestors are looked up among the folders given.
    """
    given: dict[str, str] = {}
    folders: dict[str, str] = {}
    for reader in readers:
        if not isinstance(reader, (FolderReader, UrlFolderReader, FileReader)):
            continue
        spec = reader.path if isinstance(reader, FileReader) else reader.root
        real = spec.rstrip("/") if is_remote(spec) else os.path.realpath(spec)  # a URL's parents: up to its /
        if real in given:
            raise SourceError(f"{spec} and {given[real]} are the same: it would be read twice; give it once")
        given[real] = spec
        if not isinstance(reader, FileReader):
            folders[real] = spec
    for real, spec in given.items():
        child, parent = real, os.path.dirname(real)
        while parent != child:  # up to the root, whose parent is itself
            if parent in folders:
                raise SourceError(f"{spec} is inside {folders[parent]}: it would be read twice; give one of them")
            child, parent = parent, os.path.dirname(parent)


def _auto_scheme(readers: Sequence[Reader]) -> str:
    """``relative`` where those ids cannot collide, else ``source-relative``.

    Relative ids are relative to each folder, and a shard's name within its folder: two
    folders or tar sources (or a folder beside pictures and lists, whose ids are paths as
    written) can give one id to two inputs. One folder or tar source alone, or pictures and
    lists only, keep the ids they always had.
    """
    roots = sum(isinstance(r, (FolderReader, UrlFolderReader, TarReader)) for r in readers)
    return "relative" if roots == 0 or len(readers) == 1 else "source-relative"


def _local_path(reader: Reader, url: str | None = None) -> str | None:
    """The local path a reader (or one of a tar reader's shards) stands for; None for a URL or a list."""
    if isinstance(reader, FolderReader):
        return reader.root
    if isinstance(reader, FileReader):
        return None if is_remote(reader.path) else reader.path
    if url is not None and not _is_url(url):
        return url
    return None


def _with_ids(readers: list[Reader], scheme: str) -> list[Reader]:
    """The readers, told how to make their ids under ``scheme`` (``relative`` changes nothing)."""
    if scheme == "relative":
        return readers
    paths = [os.path.abspath(p) for r in readers for p in _local_paths(r)]
    common = os.path.commonpath([os.path.dirname(p) for p in paths]) if paths else ""

    url_parent = _common_url_parent([u for r in readers for u in _remote_roots(r)])

    def label(path: str) -> str:
        if is_remote(path):
            return path if scheme == "absolute" else _url_label(path, url_parent)
        full = os.path.abspath(path)
        return full if scheme == "absolute" else os.path.relpath(full, common).replace(os.sep, "/")

    out: list[Reader] = []
    for reader in readers:
        if isinstance(reader, FolderReader):
            out.append(dataclasses.replace(reader, prefix=label(reader.root).rstrip("/") + "/"))
        elif isinstance(reader, UrlFolderReader):
            absolute = scheme == "absolute"
            out.append(
                dataclasses.replace(reader, prefix="" if absolute else label(reader.root) + "/", absolute=absolute)
            )
        elif isinstance(reader, FileReader):
            out.append(dataclasses.replace(reader, item_id=label(reader.path)))
        elif isinstance(reader, ListReader):
            out.append(dataclasses.replace(reader, absolute=scheme == "absolute"))
        elif isinstance(reader, TableReader):  # ids come from the table's id column or file/row
            out.append(reader)
        else:
            labels = []
            for url in reader.urls:
                local = _local_path(reader, url)
                labels.append(label(local) if local is not None else (url if scheme == "absolute" else shard_name(url)))
            out.append(dataclasses.replace(reader, labels=tuple(labels)))
    return out


def _remote_roots(reader: Reader) -> list[str]:
    """The folder or picture URL a reader stands for (shards keep their own labels: see :func:`shard_name`)."""
    if isinstance(reader, UrlFolderReader):
        return [reader.root]
    if isinstance(reader, FileReader) and is_remote(reader.path):
        return [reader.path]
    return []


def _common_url_parent(urls: Sequence[str]) -> list[str]:
    """The ``/``-separated parts the parents of ``urls`` share (``s3:``, ``""``, bucket, folders...)."""
    parents = [url.rstrip("/").split("/")[:-1] for url in urls]
    if not parents:
        return []
    common = parents[0]
    for parts in parents[1:]:
        n = 0
        while n < min(len(common), len(parts)) and common[n] == parts[n]:
            n += 1
        common = common[:n]
    return common


def _url_label(url: str, parent: list[str]) -> str:
    """``url`` relative to the sources' common parent; with no common host or bucket, the URL after ``scheme://``."""
    parts = url.rstrip("/").split("/")
    if len(parent) < 3 or parts[: len(parent)] != parent:  # scheme:, "", host: the least two URLs must share
        return url.split("://", 1)[1].rstrip("/")
    return "/".join(parts[len(parent) :])


def _local_paths(reader: Reader) -> list[str]:
    if isinstance(reader, TableReader):
        return []
    if isinstance(reader, TarReader):
        return [u for u in reader.urls if not _is_url(u)]
    if isinstance(reader, UrlFolderReader):
        return []
    path = _local_path(reader)
    return [path] if path is not None else []


def _refuse_shared_labels(readers: Sequence[Reader], scheme: str) -> None:
    """Two shards whose ids would share one prefix: every sample key they share would collide."""
    first: dict[str, str] = {}
    for reader in readers:
        if not isinstance(reader, TarReader):
            continue
        for url, name in reader.shards():
            if name in first:
                if first[name] == url:
                    raise SourceError(f"{url} is given twice: its samples would be read twice; give it once")
                hint = "use --id-from source-relative or absolute" if scheme == "relative" else "rename one of them"
                raise SourceError(
                    f"{first[name]} and {url} would both give ids {name}/<key>, so samples with one key would "
                    f"collide; {hint}"
                )
            first.setdefault(name, url)
