"""End to end: the real ``batchcap run`` in a subprocess, killed, rerun, locked, refused, grown.

Every test here starts real processes with a tiny random-weight model, so each takes
seconds; the SIGKILL trials take longer and are marked slow.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
from conftest import write_images

from batchcap.outputs.lock import hold_lock
from batchcap.outputs.store import work_dir_for
from batchcap.pipeline.progress import EXIT_LOCKED, EXIT_OK, EXIT_RESUME_REFUSED, EXIT_TOO_MANY_FAILURES, EXIT_USAGE

REPO = Path(__file__).resolve().parents[2]
CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


def command(sources: list[Path], out: Path, model: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "batchcap",
        "run",
        *map(str, sources),
        "--out",
        str(out),
        "--model",
        str(model),
        "--workers",
        "1",
        "--batch-size",
        "16",
        "--commit-every",
        "16",
        "--device",
        "cpu",
        "--precision",
        "fp32",
        "--log-every",
        "1",
        *extra,
    ]


def run(cmd: list[str], timeout: float = 300) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout)
    assert not CONTROL.search(proc.stdout), "control characters in non-terminal output"
    return proc


def read_rows(out: Path) -> list[dict[str, Any]]:
    """The output's rows; the Parquet file reads back, every JSONL line is one JSON object."""
    if out.suffix == ".parquet":
        return pq.read_table(out).to_pylist()
    rows = []
    for line in out.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        assert isinstance(row, dict)
        rows.append(row)
    return rows


def assert_exactly_once(out: Path, ids: set[str]) -> list[dict[str, Any]]:
    rows = read_rows(out)
    got = [r["id"] for r in rows]
    assert len(got) == len(set(got)), "duplicate ids"
    assert set(got) == ids
    assert all(r["status"] == "ok" and r["caption"] is not None for r in rows)
    return rows


def ids_of(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()}


# -- killing at chosen moments -------------------------------------------------------------


def _names(folder: Path) -> list[str]:
    try:
        return os.listdir(folder)
    except FileNotFoundError:
        return []


def _parts(out: Path) -> set[str]:
    return {n for n in _names(work_dir_for(out)) if n.startswith("part-")}


def moment_before_first_commit(seconds: float) -> Callable[[Path], bool]:
    """``seconds`` after start, or as the run's first part appears if that comes sooner.

    A wall-clock delay alone lands after the end when start-up is quick (a warm, quiet
    machine captions 200 tiny pictures in about two seconds); the first part caps it.
    """
    start = time.monotonic()
    first_part = moment_between_commits(1, 0.0)
    return lambda out: first_part(out) or time.monotonic() - start >= seconds  # first_part sees every poll


def moment_between_commits(commits: int, seconds: float) -> Callable[[Path], bool]:
    """``seconds`` after this run's ``commits``-th new part: an arbitrary moment mid-run.

    Counting from the run's own commits, not from its start, keeps the moment inside the
    run however fast the machine is, as long as work is left (else the caller retries).
    """
    seen: set[str] | None = None
    reached: float | None = None

    def when(out: Path) -> bool:
        nonlocal seen, reached
        parts = _parts(out)
        if seen is None:
            seen = parts
        if reached is None and len(parts - seen) >= commits:
            reached = time.monotonic()
        return reached is not None and time.monotonic() - reached >= seconds

    return when


def moment_part_written(out: Path) -> bool:
    """A part is being written (temp file): the middle of a commit."""
    return any(n.startswith(".tmp-") and n.endswith(".parquet") for n in _names(work_dir_for(out)))


def moment_new_part() -> Callable[[Path], bool]:
    """A part file has just been renamed into place: right at a commit marker."""
    return moment_between_commits(1, 0.0)


def moment_finalizing(out: Path) -> bool:
    """The final output is being written beside ``out`` (temp file): the middle of finalize."""
    return any(n.startswith(out.name + ".tmp-") for n in _names(out.parent))


def run_and_kill(
    cmd: list[str], out: Path, when: Callable[[Path], bool], pgids: list[int], timeout: float = 300
) -> bool:
    """Start ``cmd``; SIGKILL its main process (only) once ``when(out)`` holds. True if killed."""
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    pgids.append(proc.pid)
    deadline = time.monotonic() + timeout
    killed = False
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            if when(out):
                os.kill(proc.pid, signal.SIGKILL)  # like kill -9 of the job: its worker is orphaned
                killed = True
                break
            time.sleep(0.0005)
        proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        assert killed or proc.returncode == EXIT_OK, f"run failed with {proc.returncode}"
    finally:
        proc.kill()
        proc.wait()
    return killed


def assert_output_never_half_written(out: Path) -> None:
    if out.exists():
        read_rows(out)  # complete and valid, or absent


def reap_groups(pgids: list[int]) -> None:
    for pgid in pgids:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["parquet", "jsonl"])
def test_sigkill_at_any_moment_then_rerun_captions_every_input_once(
    tmp_path: Path, tiny_model_path: Path, fmt: str
) -> None:
    folder = tmp_path / "photos"
    write_images(folder, 200)
    ids = ids_of(folder)
    rng = random.Random(1234 if fmt == "parquet" else 4321)
    moments: list[tuple[str, Callable[[], Callable[[Path], bool]]]] = [
        ("early, around start-up", lambda: moment_before_first_commit(rng.uniform(0.3, 2.5))),
        ("during a part commit", lambda: moment_part_written),
        ("right as a part appears", moment_new_part),
        ("random moment", lambda: moment_between_commits(rng.randint(1, 3), rng.uniform(0.0, 0.4))),
        ("random moment", lambda: moment_between_commits(rng.randint(1, 3), rng.uniform(0.0, 0.4))),
        ("during finalize", lambda: moment_finalizing),
    ]
    tries_per_moment = 3  # a run that gets to the end first is followed by one on a fresh output
    kills: list[str] = []
    pgids: list[int] = []
    chain = 0
    try:
        for name, make in moments:
            for _ in range(tries_per_moment):
                out = tmp_path / f"captions-{chain}.{fmt}"
                if out.exists() and not work_dir_for(out).exists():
                    chain += 1  # the previous run got to the end: go on with a fresh output
                    out = tmp_path / f"captions-{chain}.{fmt}"
                killed = run_and_kill(command([folder], out, tiny_model_path), out, make(), pgids)
                assert_output_never_half_written(out)
                if killed:
                    kills.append(name)
                    break
        for c in range(chain + 1):  # rerun every output to completion
            out = tmp_path / f"captions-{c}.{fmt}"
            proc = run(command([folder], out, tiny_model_path))
            assert proc.returncode == EXIT_OK, proc.stdout
            assert_exactly_once(out, ids)
            assert not work_dir_for(out).exists()
    finally:
        reap_groups(pgids)  # orphaned DataLoader workers
    print(f"{fmt}: {len(kills)} kills landed ({', '.join(kills)}) over {chain + 1} output(s)")
    assert len(kills) >= 5, f"only {len(kills)} kills landed: {kills}"
    assert {"during a part commit", "right as a part appears", "during finalize"} & set(kills), kills


# -- the other promises of resuming ---------------------------------------------------------


def test_second_run_on_a_locked_output_exits_at_once(tmp_path: Path, tiny_model_path: Path) -> None:
    folder = tmp_path / "photos"
    write_images(folder, 3)
    out = tmp_path / "captions.parquet"
    with hold_lock(out):  # as if another run were active
        start = time.monotonic()
        proc = run(command([folder], out, tiny_model_path))
        assert proc.returncode == EXIT_LOCKED, proc.stdout
        assert "another batchcap run" in proc.stdout and f"pid {os.getpid()}" in proc.stdout
        assert time.monotonic() - start < 60
    assert not out.exists()


@pytest.mark.slow
def test_changed_settings_are_refused_and_overwrite_starts_over(tmp_path: Path, tiny_model_path: Path) -> None:
    folder = tmp_path / "photos"
    write_images(folder, 12)
    out = tmp_path / "captions.jsonl"
    assert run(command([folder], out, tiny_model_path, "--beam", "2")).returncode == EXIT_OK
    first = assert_exactly_once(out, ids_of(folder))

    refused = run(command([folder], out, tiny_model_path, "--beam", "3"))
    assert refused.returncode == EXIT_RESUME_REFUSED, refused.stdout
    assert "--beam: 2 -> 3" in refused.stdout and "--overwrite" in refused.stdout
    assert read_rows(out) == first  # untouched

    again = run(command([folder], out, tiny_model_path, "--beam", "3", "--overwrite"))
    assert again.returncode == EXIT_OK, again.stdout
    rows = assert_exactly_once(out, ids_of(folder))
    assert min(r["created_at"] for r in rows) > max(r["created_at"] for r in first)
    assert json.loads(Path(str(out) + ".meta.json").read_text())["resume_settings"]["beam"]["beam_size"] == 3


@pytest.mark.slow
def test_incremental_rerun_captions_only_new_and_changed_files(tmp_path: Path, tiny_model_path: Path) -> None:
    folder = tmp_path / "photos"
    write_images(folder, 10)
    out = tmp_path / "captions.parquet"
    assert run(command([folder], out, tiny_model_path)).returncode == EXIT_OK
    first = {r["id"]: r for r in assert_exactly_once(out, ids_of(folder))}
    inode = out.stat().st_ino

    finished = run(command([folder], out, tiny_model_path))  # nothing new: no image work
    assert finished.returncode == EXIT_OK, finished.stdout
    assert "batchcap: 0 images" in finished.stdout
    assert re.search(r"already done:\s+10\n", finished.stdout)
    assert "nothing new to caption" in finished.stdout
    assert out.stat().st_ino == inode  # not even rewritten

    write_images(folder, 3, seed=7, prefix="new")
    touched = folder / "img00004.jpg"
    stat = touched.stat()
    os.utime(touched, ns=(stat.st_atime_ns, stat.st_mtime_ns + 5_000_000_000))
    grown = run(command([folder], out, tiny_model_path))
    assert grown.returncode == EXIT_OK, grown.stdout
    assert re.search(r"captioned now:\s+4\n", grown.stdout)
    assert re.search(r"already done:\s+9\n", grown.stdout)
    rows = {r["id"]: r for r in assert_exactly_once(out, ids_of(folder))}
    assert len(rows) == 13
    assert rows["img00004.jpg"]["mtime_ns"] == stat.st_mtime_ns + 5_000_000_000
    assert rows["img00004.jpg"]["created_at"] > first["img00004.jpg"]["created_at"]
    assert rows["img00003.jpg"] == first["img00003.jpg"]  # untouched rows are kept as they were


@pytest.mark.slow
def test_exit_codes_for_failures_and_usage(tmp_path: Path, tiny_model_path: Path) -> None:
    folder = tmp_path / "photos"
    write_images(folder, 4)
    for i in range(2):
        (folder / f"broken{i}.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    out = tmp_path / "captions.parquet"
    proc = run(command([folder], out, tiny_model_path, "--max-failures", "1"))
    assert proc.returncode == EXIT_TOO_MANY_FAILURES, proc.stdout
    assert re.search(r"failed now:\s+2 \(", proc.stdout) and "more than --max-failures 1" in proc.stdout
    rows = read_rows(out)  # the output is complete all the same
    assert sorted(r["status"] == "ok" for r in rows) == [False] * 2 + [True] * 4

    tolerant = run(command([folder], tmp_path / "other.parquet", tiny_model_path, "--max-failures", "50%"))
    assert tolerant.returncode == EXIT_OK, tolerant.stdout


def test_usage_errors_exit_2(tmp_path: Path, tiny_model_path: Path) -> None:
    folder = tmp_path / "photos"
    write_images(folder, 1)
    usage = run(command([folder], tmp_path / "captions.parquet", tiny_model_path, "--max-failures", "lots"))
    assert usage.returncode == EXIT_USAGE and "--max-failures" in usage.stdout
    assert not (tmp_path / "captions.parquet").exists()
