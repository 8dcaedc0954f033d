"""One fresh, timed ``batchcap run``, and the pictures to run it on, for the benchmarks that compare whole runs."""

from __future__ import annotations

import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq

from batchcap.data.extensions import is_image_name


def run_once(
    source: str, out: Path, count: int, extra: list[str], env: dict[str, str] | None = None
) -> tuple[float, float]:
    """One fresh ``batchcap run``: (pictures per second of the whole command, the rate its summary reports).

    ``env`` is added to this process's environment for the run."""
    shutil.rmtree(out.with_name(out.name + ".batchcap-work"), ignore_errors=True)
    out.unlink(missing_ok=True)
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "batchcap", "run", source, "--out", str(out), *extra],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
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


def compare_runs(photos: Path, count: int, rounds: int, variants: dict[str, tuple[list[str], dict[str, str]]]) -> None:
    """Alternate fresh whole runs of each variant (label: extra options, environment) on the first ``count``
    pictures of ``photos``, after an uncounted warm-up round; print each one's median rate and the median of
    its per-round ratios to the first variant's (ratios within a round share the machine's load)."""
    pictures = first_pictures(photos, count, recursive=True)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "photos"
        folder.mkdir()
        for i, picture in enumerate(pictures):
            (folder / f"{i:06d}{picture.suffix.lower()}").symlink_to(picture.resolve())
        out = Path(tmp) / "captions.parquet"
        rates: dict[str, list[tuple[float, float]]] = {label: [] for label in variants}
        for round_number in range(rounds + 1):  # round 0 warms up and is not counted
            for label, (extra, env) in variants.items():
                rate = run_once(str(folder), out, count, extra, env)
                if round_number:
                    rates[label].append(rate)
            print(f"round {round_number}{' (warm-up)' if not round_number else ''} done", file=sys.stderr)
    first = next(iter(rates.values()))
    print(f"{count} pictures, {rounds} rounds: whole-command img/s (summary's img/s), ratio to the first")
    for label, runs in rates.items():
        whole = statistics.median(r[0] for r in runs)
        summary = statistics.median(r[1] for r in runs)
        ratio = statistics.median(r[0] / f[0] for r, f in zip(runs, first, strict=True))
        print(f"{label:40s} {whole:6.1f} ({summary:5.1f})  x{ratio:.2f}")
