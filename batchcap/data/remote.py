"""URLs as sources: object stores (``s3://``, ``gs://``) and web servers (``https://``) through fsspec.

Everything that reads a URL goes through here, so the readers in :mod:`batchcap.data.sources`
and :mod:`batchcap.data.tables` and the decoder in :mod:`batchcap.data.image_decode` stay
about paths and bytes:

* :func:`check_protocol` refuses, before any work, a protocol fsspec does not know or whose
  package is not installed, naming the extra to install (``batchcap[s3]``, ``batchcap[gcs]``);
* :func:`fetch` reads one picture, retrying transient failures (connection errors, timeouts,
  HTTP 5xx, 408 and 429) with exponential backoff; a missing object raises
  ``FileNotFoundError`` at once, and anything else (or the last failed try) raises
  :class:`RemoteUnreadable`;
* :func:`walk` lists a folder URL as a stream: an S3 prefix page by page (1,000 keys each,
  in S3's key order), any other filesystem one directory at a time, each sorted by name;
* :func:`open_stream` and :func:`open_text` open a tar shard or a list of paths.

Credentials and endpoints come from each filesystem's own configuration: for S3 the standard
AWS variables and files (``AWS_ACCESS_KEY_ID``, ``AWS_PROFILE``, ``AWS_ENDPOINT_URL``, ...),
for GCS ``GOOGLE_APPLICATION_CREDENTIALS`` or gcloud's login, and for any protocol fsspec's
``FSSPEC_<PROTOCOL>_<OPTION>`` variables (``FSSPEC_S3_ENDPOINT_URL``).

Filesystems are never pickled: readers hold URLs, and each process (every DataLoader worker)
gets its own filesystem from fsspec, whose instance cache and event loop are reset after a fork.
"""

from __future__ import annotations

import asyncio
import datetime
import functools
import random
import time
from collections.abc import Callable, Iterator
from typing import IO, Any

from batchcap.data.extensions import url_scheme
from batchcap.data.inputs import SourceError

#: Tries per picture (the first read and up to three more) and the wait before the first retry,
#: doubled at each retry (0.25 s, 0.5 s, 1 s), with up to a quarter added at random.
READ_TRIES = 4
BACKOFF_S = 0.25
#: The extra that installs each protocol's filesystem (``pip install "batchcap[s3]"``).
EXTRAS = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs"}
#: HTTP statuses worth another try: timeouts and rate limits (every 5xx is one too).
_RETRY_STATUSES = frozenset({408, 425, 429})


class RemoteUnreadable(Exception):
    """A picture at a URL that could not be read: a permanent error, or a transient one that outlasted the retries."""


def check_protocol(url: str) -> None:
    """Refuse ``url`` when no installed fsspec filesystem can read it, saying what to install."""
    from fsspec.registry import get_filesystem_class, known_implementations

    protocol = url_scheme(url) or "file"
    try:
        get_filesystem_class(protocol)
    except ValueError:
        raise SourceError(
            f"{url}: batchcap cannot read {protocol}:// sources (fsspec knows no such protocol); "
            "give a local path, a pipe: command or a URL such as s3://, gs://, https://"
        ) from None
    except ImportError as exc:
        extra = EXTRAS.get(protocol)
        if extra is not None:
            hint = f'pip install "batchcap[{extra}]"'
        else:
            hint = known_implementations.get(protocol, {}).get("err") or f"install the fsspec package for {protocol}://"
        raise SourceError(f"{url}: reading {protocol}:// needs a package that is not installed: {hint}") from exc


def filesystem(url: str) -> tuple[Any, str]:
    """The fsspec filesystem for ``url`` in this process, and the path within it."""
    from fsspec.core import url_to_fs

    return url_to_fs(url)


@functools.cache
def read_errors() -> tuple[type[BaseException], ...]:
    """What reading a URL raises for I/O reasons: OS and timeout errors, aiohttp's (HTTP statuses), botocore's."""
    from fsspec.exceptions import FSTimeoutError

    errors: tuple[type[BaseException], ...] = (OSError, TimeoutError, asyncio.TimeoutError, FSTimeoutError)
    try:
        import aiohttp

        errors = (*errors, aiohttp.ClientError)
    except ImportError:
        pass
    try:  # s3fs's credentials and configuration errors
        from botocore.exceptions import BotoCoreError

        errors = (*errors, BotoCoreError)
    except ImportError:
        pass
    return errors


def is_transient(exc: BaseException) -> bool:
    """Whether another try may succeed: not a missing object, a refusal or a 4xx other than 408/425/429."""
    if isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
        return False
    status = getattr(exc, "status", None)
    if isinstance(status, int):
        return status >= 500 or status in _RETRY_STATUSES
    return True  # connection refused or reset, timeouts, a body cut short


def describe(exc: BaseException) -> str:
    """``Type: message`` of a read error, one line, with the HTTP status where there is one."""
    status = getattr(exc, "status", None)
    text = str(exc) or (f"HTTP {status}" if isinstance(status, int) else "")
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def fetch(
    url: str,
    tries: int = READ_TRIES,
    backoff_s: float = BACKOFF_S,
    sleep: Callable[[float], None] = time.sleep,
) -> bytes:
    """The bytes at ``url``, after up to ``tries`` reads with exponential backoff between them.

    Raises ``FileNotFoundError`` for a missing object (at once: it will not appear by waiting),
    and :class:`RemoteUnreadable` for anything else that fails, saying how many tries were made.
    """
    errors = read_errors()
    for attempt in range(1, tries + 1):
        try:
            fs, path = filesystem(url)
            return bytes(fs.cat_file(path))
        except FileNotFoundError:
            raise
        except errors as exc:
            if not is_transient(exc):
                raise RemoteUnreadable(describe(exc)) from exc
            if attempt == tries:
                raise RemoteUnreadable(f"{describe(exc)} (failed {tries} times)") from exc
        sleep(backoff_s * 2 ** (attempt - 1) * (1 + random.random() / 4))
    raise AssertionError("unreachable: the last try returns or raises")


def open_stream(url: str) -> IO[bytes]:
    """``url`` opened for reading from start to end (a tar shard); errors are the filesystem's."""
    fs, path = filesystem(url)
    return fs.open(path, "rb")


def open_text(url: str) -> IO[str]:
    """A text file at ``url`` (a list of paths), read as :class:`batchcap.data.sources.ListReader` reads files."""
    from fsspec.core import open as fs_open

    return fs_open(url, "rt", encoding="utf-8", errors="surrogateescape", newline="").open()


def arrow_location(url: str) -> tuple[str, Any]:
    """``(path, filesystem)`` for pyarrow's ``filesystem=`` arguments (it wraps fsspec's itself)."""
    fs, path = filesystem(url)
    return path, fs


def folder_url(url: str) -> str:
    """``url`` ending in one ``/``: the prefix every key of the folder starts with."""
    return url.rstrip("/") + "/"


def is_folder(url: str) -> bool:
    """Whether ``url`` names a folder: it ends in ``/``, or (not on a web server) the store says so.

    Raises :class:`SourceError` when the store cannot be asked.
    """
    if url.endswith("/"):
        return True
    if url_scheme(url) in ("http", "https"):
        return False  # a web server's folder is an index page whose URL ends in /
    try:
        fs, path = filesystem(url)
        return bool(fs.isdir(path))
    except read_errors() as exc:
        raise SourceError(f"{url}: cannot ask the store whether it is a folder: {describe(exc)}") from exc


def check_folder(url: str) -> None:
    """Refuse a folder URL that cannot be listed (no such bucket, no credentials, the store unreachable)
    or that holds nothing, by reading the first entry of its listing: one request, not the whole listing."""
    try:
        first = next(walk(url), None)
    except read_errors() as exc:
        raise SourceError(f"{url}: cannot list the folder: {describe(exc)}") from exc
    if first is None:
        raise SourceError(f"{url}: no such folder, or it is empty; check the URL")


def walk(url: str) -> Iterator[tuple[str, str, int | None, int | None]]:
    """Every file under the folder ``url``: ``(key relative to the folder, its URL, size, mtime_ns)``.

    A stream, never the whole listing at once: an S3 prefix is read page by page in S3's key
    order (no delimiter, so nested keys come in the same pass); other filesystems are walked
    one directory at a time, each directory's names sorted, so memory holds one directory.
    Either order is the same every time, which the DataLoader workers need (each walks the
    listing and keeps its share). An error while listing propagates.
    """
    fs, path = filesystem(url)
    root = path.rstrip("/")
    if "s3" in _protocols(fs):
        yield from _walk_s3(fs, url, root)
        return
    for folder, dirs, files in fs.walk(root, detail=True, on_error="raise"):
        for name in sorted(dirs):  # walked in sorted order; a dict in detail mode
            dirs[name] = dirs.pop(name)
        for name in sorted(files):
            info = files[name]
            full = info.get("name", f"{folder}/{name}")
            yield _relative(full, root), _unstrip(fs, url, full), *_fingerprint(info)


def _protocols(fs: Any) -> tuple[str, ...]:
    protocol = fs.protocol
    return (protocol,) if isinstance(protocol, str) else tuple(protocol)


def _relative(full: str, root: str) -> str:
    return full[len(root) :].lstrip("/") if full.startswith(root) else full


def _unstrip(fs: Any, url: str, path: str) -> str:
    """The URL of ``path`` found under ``url`` (web servers list full URLs already)."""
    if url_scheme(path) is not None:
        return path
    return f"{url_scheme(url)}://{path}"


def _walk_s3(fs: Any, url: str, root: str) -> Iterator[tuple[str, str, int | None, int | None]]:
    from fsspec.asyn import sync

    bucket, _, key = root.partition("/")
    prefix = folder_url(key) if key else ""
    pages = fs._iterdir(bucket, delimiter="", prefix=prefix)

    async def following() -> dict[str, Any]:
        return await pages.__anext__()

    try:
        while True:
            try:
                info = sync(fs.loop, following)
            except StopAsyncIteration:
                return
            if info.get("type") == "directory" or info["name"].endswith("/"):
                continue  # a folder marker some tools write: not a picture
            yield _relative(info["name"], root), _unstrip(fs, url, info["name"]), *_fingerprint(info)
    finally:
        sync(fs.loop, pages.aclose)


def _fingerprint(info: dict[str, Any]) -> tuple[int | None, int | None]:
    """``(size, mtime_ns)`` from a listing entry, so that a resumed run passes over unchanged objects."""
    size = info.get("size")
    modified = info.get("LastModified") or info.get("mtime") or info.get("updated")
    mtime_ns: int | None = None
    if isinstance(modified, datetime.datetime):
        mtime_ns = int(modified.timestamp() * 1_000_000_000)
    elif isinstance(modified, (int, float)):
        mtime_ns = int(modified * 1_000_000_000)
    return (int(size) if isinstance(size, int) else None), mtime_ns
