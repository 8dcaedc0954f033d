"""One fresh, timed ``batchcap run``, and the pictures to run it on, for the benchmarks that compare whole runs."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq

from batchcap.data.extensions import is_image_name


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


def first_pictures(photos: Path, count: int, recursive: bool = False) -> list[Path]:
    """The first ``count`` pictures of ``photos`` by path (in its subfolders too when ``recursive``)."""
    found = photos.rglob("*") if recursive else photos.iterdir()
    pictures = sorted(p for p in found if p.is_file() and is_image_name(p.name))[:count]
    if len(pictures) < count:
        raise SystemExit(f"{photos}: {len(pictures)} pictures, fewer than --count {count}")
    return pictures
