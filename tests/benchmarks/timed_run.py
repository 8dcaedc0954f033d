"""One fresh, timed ``batchcap run`` for the benchmarks that compare whole runs."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq


def run_once(source: str, out: Path, count: int, extra: list[str]) -> tuple[float, float]:
    """One fresh ``batchcap run``: (pictures per second of the whole command, the rate its summary reports)."""
    shutil.rmtree(out.with_name(out.name + ".batchcap-work"), ignore_errors=True)
    out.unlink(missing_ok=True)
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "batchcap", "run", source, "--out", str(out), *extra], capture_output=True, text=True
    )
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{source}: batchcap run exited {done.returncode}\n{done.stderr[-2000:]}")
    rows = pq.read_metadata(out).num_rows
    if rows != count:
        raise SystemExit(f"{source}: {rows} rows, expected {count}")
    summary = float(re.findall(r"\(([\d.]+) images/s\)", done.stderr + done.stdout)[-1])
    return count / wall, summary
