"""The sink's writer thread, over a real OutputStore: rows arrive, commits by count and by time,
and an error in the thread is raised in the caller's."""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from batchcap.outputs.background_writer import BackgroundWriter
from batchcap.outputs.store import OutputIOError, OutputStore


def open_store(tmp_path: Path, commit_every: int) -> OutputStore:
    return OutputStore.open(tmp_path / "captions.parquet", None, {"model": "m"}, {}, commit_every=commit_every)


def rows(start: int, count: int) -> list[dict[str, Any]]:
    return [{"id": f"img{i}", "status": "ok", "caption": "a dog"} for i in range(start, start + count)]


def part_ids(store: OutputStore) -> list[list[str]]:
    return [pq.read_table(p).column("id").to_pylist() for p in sorted(store.work_dir.glob("part-*.parquet"))]


def test_rows_reach_the_store_in_order_and_close_commits_the_rest(tmp_path: Path) -> None:
    store = open_store(tmp_path, commit_every=10)
    writer = BackgroundWriter(store, commit_seconds=3600, max_pending=2)
    for start in range(0, 25, 5):
        writer.add(rows(start, 5))
    writer.close()
    assert part_ids(store) == [
        [f"img{i}" for i in range(0, 10)],
        [f"img{i}" for i in range(10, 20)],
        [f"img{i}" for i in range(20, 25)],
    ]
    assert store.rows_added == 25 and set(store.done) == {f"img{i}" for i in range(25)}
    writer.close()  # a second close is harmless


def test_rows_are_committed_by_time_before_the_count_is_reached(tmp_path: Path) -> None:
    store = open_store(tmp_path, commit_every=10**6)
    writer = BackgroundWriter(store, commit_seconds=0.2)
    writer.add(rows(0, 3))
    deadline = time.monotonic() + 60
    while not part_ids(store) and time.monotonic() < deadline:
        time.sleep(0.05)  # no more rows come: the thread commits once the oldest row is 0.2 s old
    assert part_ids(store) == [["img0", "img1", "img2"]]
    writer.add(rows(3, 2))
    writer.close()
    assert part_ids(store)[1:] == [["img3", "img4"]]


def test_an_io_error_in_the_thread_is_raised_in_the_caller(tmp_path: Path) -> None:
    store = open_store(tmp_path, commit_every=2)
    writer = BackgroundWriter(store, commit_seconds=3600)
    shutil.rmtree(store.work_dir)  # the disk "goes away": the next commit fails
    with pytest.raises(OutputIOError, match=f"cannot write {store.work_dir}") as info:
        for start in range(0, 100, 2):
            writer.add(rows(start, 2))
            time.sleep(0.01)
        writer.close()
    assert isinstance(info.value.cause, FileNotFoundError)
    with pytest.raises(OutputIOError):
        writer.close()  # and keeps saying so


def test_a_bug_in_the_thread_stays_a_bug(tmp_path: Path) -> None:
    writer = BackgroundWriter(open_store(tmp_path, commit_every=2), commit_seconds=3600)
    writer.add([{"id": "x", "status": "ok", "no_such_column": 1}])
    with pytest.raises(ValueError, match="unknown output columns"):
        writer.close()
