"""The cron wrapper: flock against overlap, incremental runs, a log, non-zero exit on trouble."""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import REPO, write_images

SCRIPT = REPO / "jobs" / "cron" / "batchcap-cron.sh"
BATCHCAP = str(Path(sys.prefix) / "bin" / "batchcap")

pytestmark = pytest.mark.skipif(shutil.which("flock") is None, reason="flock (util-linux) is not installed")


def cron(
    watched: Path, out: Path, *args: str, batchcap: str = BATCHCAP, model: Path | None = None, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, BATCHCAP=batchcap, MODEL=str(model or ""))
    return subprocess.run(
        ["bash", str(SCRIPT), str(watched), str(out), *args], env=env, capture_output=True, text=True, timeout=timeout
    )


def log_of(out: Path) -> str:
    return Path(f"{out}.cron.log").read_text()


def test_overlapping_invocation_exits_quietly(tmp_path: Path) -> None:
    watched, out = tmp_path / "photos", tmp_path / "captions.parquet"
    watched.mkdir()
    with open(f"{out}.cron.lock", "a") as held:  # a run that is still going
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        result = cron(watched, out, batchcap="false")
    assert result.returncode == 0
    assert result.stdout == result.stderr == ""  # cron sends no mail
    assert "already running (lock" in log_of(out)
    assert "start:" not in log_of(out) and not out.exists()


def test_trouble_exits_non_zero_with_the_log_tail(tmp_path: Path) -> None:
    watched, out = tmp_path / "photos", tmp_path / "logs-elsewhere" / "captions.parquet"
    watched.mkdir()
    result = cron(watched, out, batchcap="false")
    assert result.returncode == 1
    assert "batchcap run failed with exit code 1" in result.stderr and "last lines" in result.stderr
    missing = cron(tmp_path / "nowhere", out)
    assert missing.returncode == 2 and "does not exist" in missing.stderr
    absent = cron(watched, out, batchcap="/nonexistent/batchcap")
    assert absent.returncode == 127 and "not found" in absent.stderr


def test_log_dir_and_success_is_silent(tmp_path: Path) -> None:
    watched, out, logs = tmp_path / "photos", tmp_path / "captions.parquet", tmp_path / "logs"
    watched.mkdir()
    env = dict(os.environ, BATCHCAP="true", LOG_DIR=str(logs))
    result = subprocess.run(
        ["bash", str(SCRIPT), str(watched), str(out)], env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0 and result.stdout == result.stderr == ""
    assert "done: rc=0" in (logs / "captions.parquet.cron.log").read_text()


@pytest.mark.slow
def test_overlap_then_incremental_run(tmp_path: Path, tiny_model_path: Path) -> None:
    """Two real overlapping runs (the second exits at once), then new files: only they are captioned."""
    watched, out = tmp_path / "photos", tmp_path / "captions.parquet"
    write_images(watched, 8)
    env = dict(os.environ, BATCHCAP=BATCHCAP, MODEL=str(tiny_model_path))
    first = subprocess.Popen(
        ["bash", str(SCRIPT), str(watched), str(out), "--batch-size", "1", "--workers", "0"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 60
    while "start:" not in (log_of(out) if Path(f"{out}.cron.log").exists() else ""):
        assert time.monotonic() < deadline and first.poll() is None
        time.sleep(0.05)
    second = cron(watched, out, model=tiny_model_path, timeout=60)
    assert second.returncode == 0 and second.stdout == second.stderr == ""
    assert first.wait(timeout=300) == 0, first.stderr.read() if first.stderr else ""
    assert "already running (lock" in log_of(out) and log_of(out).count("start:") == 1
    table = pq.read_table(out)
    assert sorted(table.column("id").to_pylist()) == sorted(p.name for p in watched.iterdir())
    before = {r["id"]: r["created_at"] for r in table.select(["id", "created_at"]).to_pylist()}

    write_images(watched, 3, seed=1, prefix="new")
    result = cron(watched, out, model=tiny_model_path)
    assert result.returncode == 0, result.stderr
    after = {r["id"]: r["created_at"] for r in pq.read_table(out).select(["id", "created_at"]).to_pylist()}
    assert len(after) == pq.read_metadata(out).num_rows == 11
    assert {k: v for k, v in after.items() if k in before} == before  # old rows untouched
    assert all(after[f"new0000{i}.jpg"] > max(before.values()) for i in range(3))
    assert "added to output:        3" in log_of(out).split("start:")[-1]
