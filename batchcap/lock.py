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
on Lustre the client must be mounted with ``-o flock``.
"""
from __future__ import annotations

import contextlib
import datetime as dt
import errno
import fcntl
import json
import os
import socket
from pathlib import Path
from typing import Iterator

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
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            holder = _describe_holder(os.pread(fd, 4096, 0).decode("utf-8", "replace"))
            raise LockHeld(f"another batchcap run is writing {out} ({holder}; lock file {path}). "
                           "Wait for it to finish, or choose another --out.") from None
        info = {"pid": os.getpid(), "host": socket.gethostname(),
                "started": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
        data = (json.dumps(info) + "\n").encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, data, 0)
        _HELD_FDS.add(fd)
        try:
            yield path
        finally:
            _HELD_FDS.discard(fd)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
