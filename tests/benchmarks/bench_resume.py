"""Benchmark (not a test): rerun time of a finished job, and peak RSS against collection size.

    python tests/benchmarks/bench_resume.py            # library level: store + skip pass
    python tests/benchmarks/bench_resume.py --cli      # also the real ``batchcap run`` end to end

Library level, in fresh subprocesses so imports and RSS are honest:

* *rerun*: a folder of N tiny files whose finished output (N rows) already exists;
  time ``hold_lock`` + ``OutputStore.open`` + the loader's skip pass over the folder +
  ``finalize`` (which rewrites nothing). Target: under 3 s for N = 10,000.
* *rss*: write N rows through ``OutputStore`` (``add`` in batches, commit every 512,
  ``finalize``) and report peak RSS for N = 1,000 and 10,000. Target: within 10%.

With ``--cli`` it also captions 1,000 and 10,000 generated images with the real
``batchcap run`` and a tiny random-weight model (peak RSS of the run, its workers
included), then times the rerun of the finished 10,000-image job.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

RERUN = r"""
import json, sys, time
t0 = time.perf_counter()
from batchcap.config import ImagePolicy, Preprocess
from batchcap.data.loader import iter_batches
from batchcap.outputs.lock import hold_lock
from batchcap.outputs.store import OutputStore
from batchcap.data.sources import open_sources
t1 = time.perf_counter()
folder, out, settings = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
with hold_lock(out):
    store = OutputStore.open(out, None, settings, {"bench": True}, commit_every=512)
    t2 = time.perf_counter()
    skipped = work = 0
    for batch in iter_batches(open_sources([folder]), Preprocess(input_size=(3, 64, 64)), ImagePolicy(),
                              batch_size=32, workers=0, done=store.done):
        skipped += batch.skipped
        work += len(batch)
    t3 = time.perf_counter()
    summary = store.finalize()
t4 = time.perf_counter()
print(json.dumps({"import_s": t1 - t0, "open_s": t2 - t1, "skip_pass_s": t3 - t2, "finalize_s": t4 - t3,
                  "total_s": t4 - t0, "done": len(store.done), "skipped": skipped, "work": work,
                  "rewritten": summary.rewritten}))
"""

WRITE = r"""
import datetime as dt, json, resource, sys
from batchcap.outputs.store import OutputStore
n, out = int(sys.argv[1]), sys.argv[2]
store = OutputStore.open(out, None, {"model": "bench"}, {"bench": True}, commit_every=512)
now = dt.datetime.now(dt.timezone.utc)
for start in range(0, n, 64):
    store.add([{"id": f"photos/{i:08d}.jpg", "source": f"/data/photos/{i:08d}.jpg",
                "caption": "a dog runs on the grass with a red ball in its mouth", "score": -0.8,
                "n_best": None, "status": "ok", "error": None, "width": 500, "height": 375,
                "size": 123_456 + i, "mtime_ns": 1_700_000_000_000_000_000 + i, "model": "bench@0123456789ab",
                "created_at": now} for i in range(start, min(start + 64, n))])
store.finalize()
print(json.dumps({"maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
"""


def run_measured(cmd: list[str], **kwargs: object) -> tuple[float, int, str]:
    """Run ``cmd``; wall seconds, peak RSS in KiB (max over it and its reaped children), output."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kwargs)
    assert proc.stdout is not None
    output = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{output}")
    return wall, usage.ru_maxrss, output


def make_folder(folder: Path, n: int) -> None:
    """``n`` copies of one tiny PNG (a skip pass only stats them)."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 30, 30)).save(buf, format="PNG")
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        (folder / f"{i:08d}.png").write_bytes(buf.getvalue())


def finished_output(folder: Path, out: Path, settings: dict) -> None:
    """Synthesize the finished output a run over ``folder`` would have written."""
    import datetime as dt

    from batchcap.outputs.store import OutputStore

    store = OutputStore.open(out, None, settings, {"bench": True}, commit_every=4096)
    now = dt.datetime.now(dt.timezone.utc)
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        st = entry.stat()
        store.add(
            [
                {
                    "id": entry.name,
                    "source": entry.path,
                    "caption": "a red square",
                    "score": -0.5,
                    "status": "ok",
                    "width": 8,
                    "height": 8,
                    "size": st.st_size,
                    "mtime_ns": st.st_mtime_ns,
                    "model": "bench@0123456789ab",
                    "created_at": now,
                }
            ]
        )
    store.finalize()


def bench_library(tmp: Path, n: int, small: int, fmt: str) -> dict:
    results: dict = {}
    folder, out = tmp / "photos", tmp / f"captions.{fmt}"
    settings = {"model": "bench@0123456789ab", "beam_size": 3}
    make_folder(folder, n)
    finished_output(folder, out, settings)
    runs = []
    for _ in range(3):
        wall, _, output = run_measured(
            [sys.executable, "-c", RERUN, str(folder), str(out), json.dumps(settings)], cwd=REPO
        )
        figures = json.loads(output.strip().splitlines()[-1])
        assert figures["work"] == 0 and figures["skipped"] == n and not figures["rewritten"], figures
        runs.append(
            {"wall_s": round(wall, 3), **{k: round(v, 3) if isinstance(v, float) else v for k, v in figures.items()}}
        )
    results[f"rerun_{n}_{fmt}"] = min(runs, key=lambda r: r["wall_s"])
    for count in (small, n):
        target = tmp / f"rss{count}.{fmt}"
        _, rss, _ = run_measured([sys.executable, "-c", WRITE, str(count), str(target)], cwd=REPO)
        results[f"store_peak_rss_mib_{count}_{fmt}"] = round(rss / 1024, 1)
    return results


def bench_cli(tmp: Path, n: int, small: int) -> dict:
    sys.path.insert(0, str(REPO / "tests"))
    from conftest import make_tiny_model, write_images  # noqa: E402

    model = tmp / "tiny.safetensors"
    make_tiny_model(model)
    results: dict = {}
    batchcap = [sys.executable, "-m", "batchcap"]
    for count in (small, n):
        folder, out = tmp / f"cli{count}", tmp / f"cli{count}.parquet"
        write_images(folder, count, size=(32, 24))
        cmd = batchcap + [
            "run",
            str(folder),
            "--out",
            str(out),
            "--model",
            str(model),
            "--workers",
            "1",
            "--batch-size",
            "64",
            "--device",
            "cpu",
        ]
        wall, rss, _ = run_measured(cmd, cwd=REPO)
        results[f"cli_run_{count}"] = {"wall_s": round(wall, 1), "peak_rss_mib": round(rss / 1024, 1)}
        if count == n:
            walls = [run_measured(cmd, cwd=REPO)[0] for _ in range(3)]
            results[f"cli_finished_rerun_{count}_s"] = round(min(walls), 3)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=10_000)
    parser.add_argument("--small", type=int, default=1_000)
    parser.add_argument("--cli", action="store_true", help="also time the real batchcap run")
    parser.add_argument("--keep", action="store_true", help="keep the temp folder")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench_resume_"))
    try:
        results: dict = {}
        for fmt in ("parquet", "jsonl"):
            results.update(bench_library(tmp / fmt, args.n, args.small, fmt))
        if args.cli:
            results.update(bench_cli(tmp / "cli", args.n, args.small))
        print(json.dumps(results, indent=2))
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
