"""The output lock, exercised with real processes (flock is per open file, so threads won't do)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from batchcap.outputs.lock import LockHeld, OutputUnwritable, check_output_writable, hold_lock, lock_path_for

HOLDER = """
import sys, time
from batchcap.outputs.lock import hold_lock
with hold_lock(sys.argv[1]):
    print("locked", flush=True)
    time.sleep(60)
"""


def start_holder(out: Path) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(out)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_lock_is_exclusive_and_released_on_exit(tmp_path: Path) -> None:
    out = tmp_path / "captions.parquet"
    with hold_lock(out) as path:
        assert path == lock_path_for(out) and path.exists()
    with hold_lock(out):  # released: can be taken again
        pass
    assert lock_path_for(out).exists()  # kept on purpose (deleting a flock'd file races)


def test_second_holder_fails_fast_with_who_holds_it(tmp_path: Path) -> None:
    out = tmp_path / "captions.parquet"
    proc = start_holder(out)
    try:
        start = time.monotonic()
        with pytest.raises(LockHeld) as info:
            with hold_lock(out):
                pass
        assert time.monotonic() - start < 1.0
        message = str(info.value)
        assert f"pid {proc.pid}" in message and "another batchcap run" in message and str(out) in message
    finally:
        proc.kill()
        proc.wait()


def test_lock_of_killed_holder_never_blocks(tmp_path: Path) -> None:
    out = tmp_path / "captions.parquet"
    proc = start_holder(out)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    with hold_lock(out):  # the kernel released it when the holder died
        assert f"{os.getpid()}" in lock_path_for(out).read_text()


FORKING_HOLDER = """
import os, sys, time
from batchcap.outputs.lock import hold_lock
started_r, started_w = os.pipe()
with hold_lock(sys.argv[1]):
    if os.fork() == 0:  # like a DataLoader worker: outlives a parent killed with -9
        os.write(started_w, b"x")  # the child runs (a busy machine may not have scheduled it yet)
        time.sleep(30)
        os._exit(0)
    os.read(started_r, 1)
    print("locked", flush=True)
    time.sleep(60)
"""


def test_forked_children_do_not_keep_the_lock(tmp_path: Path) -> None:
    out = tmp_path / "captions.parquet"
    proc = subprocess.Popen(
        [sys.executable, "-c", FORKING_HOLDER, str(out)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parents[2],
        start_new_session=True,
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
        with pytest.raises(LockHeld):
            with hold_lock(out):
                pass
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        with hold_lock(out):  # the orphaned child is still alive, yet the lock is free
            pass
    finally:
        os.killpg(proc.pid, signal.SIGKILL)


@pytest.mark.parametrize("out", ["s3://bucket/x.parquet", "gs://b/x.jsonl", "file:///tmp/x.parquet", "pipe:cat"])
def test_a_url_output_is_refused_before_anything_is_made(
    tmp_path: Path, out: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(OutputUnwritable, match="not to a URL"):
        check_output_writable(out)
    assert list(tmp_path.iterdir()) == []
