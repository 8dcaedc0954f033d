"""One writer per output: an advisory ``flock`` on ``<out>.lock``.

The kernel releases a ``flock`` when its holder dies, however it dies (``kill -9``,
pre-emption, a reboot), so a lock left by a killed run never blocks the next one and
there is no stale-lock cleanup to get wrong. The file itself stays after the run: deleting
a file that another process may have just opened and locked would let two runs hold
"the" lock on two different inodes. Its contents (pid, host, start time of the holder)
exist only to make the refusal message useful.

A forked child (a DataLoader worker) would share the lock and keep it after its parent
is killed, until it notices and exits; so the lock's descriptor is closed in every
forked child (closing a shared descriptor does not unlock; only the last close does).

``flock`` works on local file systems and on NFS (Linux maps it to NFS byte-range locks);
on Lustre the client must be mounted with ``-o flock``. Where the file system refuses it
(``ENOLCK``: NFS without a lock daemon; ``EOPNOTSUPP``/``ENOSYS``: Lustre without
``-o flock``, some FUSE file systems) the run stops with :class:`OutputUnwritable` and says
so, instead of running without the one-writer guarantee.

:func:`check_output_writable` runs before any model or image work, so a read-only or
foreign folder is a one-line error naming it, not a traceback after the model loaded.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import fcntl
import json
import os
import re
import socket
from collections.abc import Iterator
from pathlib import Path

LOCK_SUFFIX = ".lock"
_HELD_FDS: set[int] = set()


def _close_in_child() -> None:
    """After ``fork``: drop this process' copy of every held lock (the parent keeps its lock)."""
    for fd in _HELD_FDS:
        try:
            os.close(fd)
        except OSError:
            pass
    _HELD_FDS.clear()


os.register_at_fork(after_in_child=_close_in_child)


class LockHeld(Exception):
    """Another run holds the lock of this output; the message names it."""


class OutputUnwritable(Exception):
    """The output cannot be written where it was asked for (read-only, permissions, no ``flock``)."""


_NO_FLOCK = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}


def check_output_writable(out: str | os.PathLike[str], work_dir: Path | None = None) -> None:
    """Raise :class:`OutputUnwritable` unless new files can be made beside ``out`` (and in ``work_dir``).

    Creates the output's folder when it is missing. Probes by creating and removing an
    empty file, because permission bits say nothing for root and nothing about a
    read-only mount.
    """
    check_output_location(out)
    out = Path(out)
    folder = out.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputUnwritable(
            f"cannot create the output folder {folder}: {exc.strerror or exc}; choose another --out"
        ) from None
    for where in (folder, work_dir):
        if where is None or not where.is_dir():
            continue
        probe = where / f".{out.name}.probe-{os.getpid()}"
        try:
            os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
            os.unlink(probe)
        except OSError as exc:
            raise OutputUnwritable(
                f"cannot write in {where}: {exc.strerror or exc}; choose another --out, or make the folder writable"
            ) from None
    lock = lock_path_for(out)
    if lock.exists():
        try:
            os.close(os.open(lock, os.O_RDWR))
        except OSError as exc:
            raise OutputUnwritable(
                f"cannot open the lock file {lock}: {exc.strerror or exc}; choose another --out, or make it writable"
            ) from None


_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def check_output_location(out: str | os.PathLike[str]) -> None:
    """Raise :class:`OutputUnwritable` when ``out`` is a URL, not a path on a POSIX file system.

    Checked before anything is created: ``Path("s3://b/x.parquet")`` is the local folder
    ``s3:/b``, which a run would otherwise make and fill.
    """
    text = os.fspath(out)
    if _URL.match(text) or text.startswith("pipe:"):
        raise OutputUnwritable(
            f"--out {text}: batchcap writes outputs only to a local or mounted POSIX file system, not to a URL "
            "(sources may be URLs, outputs may not): resuming exactly once needs an atomic rename and flock. "
            "Write to a local or network disk and copy the finished output, e.g. with `aws s3 cp`"
        )


def lock_path_for(out: str | os.PathLike[str]) -> Path:
    """The lock file of ``out``."""
    return Path(str(out) + LOCK_SUFFIX)


def _describe_holder(text: str) -> str:
    try:
        info = json.loads(text)
        return f"pid {info['pid']} on {info['host']}, started {info['started']}"
    except (ValueError, KeyError, TypeError):
        return "holder unknown"


@contextlib.contextmanager
def hold_lock(out: str | os.PathLike[str]) -> Iterator[Path]:
    """Hold the exclusive lock of ``out`` for the ``with`` block, or raise ``LockHeld`` at once."""
    path = lock_path_for(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in _NO_FLOCK:
                raise OutputUnwritable(
                    f"the file system of {path} does not support flock ({exc.strerror}); batchcap needs it to "
                    "keep to one writer per output: write to a local disk, NFS with its lock service, or "
                    "Lustre mounted with -o flock"
                ) from None
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            holder = _describe_holder(os.pread(fd, 4096, 0).decode("utf-8", "replace"))
            raise LockHeld(
                f"another batchcap run is writing {out} ({holder}; lock file {path}). "
                "Wait for it to finish, or choose another --out."
            ) from None
        info = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        }
        data = (json.dumps(info) + "\n").encode()
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, data, 0)
        except OSError:
            pass  # a full disk: the holder's name only makes a refusal clearer; the lock holds
        _HELD_FDS.add(fd)
        try:
            yield path
        finally:
            _HELD_FDS.discard(fd)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
