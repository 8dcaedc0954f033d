"""What the writer thread buys: ``batchcap run`` with rows written on a thread vs inline, in one process.

The same ``run_job`` twice per repeat, alternating: once as shipped (``BackgroundWriter``:
part writes and fsyncs overlap the encoder), once with a stand-in that calls
``OutputStore.add`` / ``commit`` inline in the run loop, as batchcap did before. Also the
cost of one part commit alone. Prints medians and the ratio.

    python tests/benchmarks/bench_writer.py                      # packaged model, 224x224 JPEGs
    python tests/benchmarks/bench_writer.py --commit-every 512   # the default commit size
    python tests/benchmarks/bench_writer.py --out-dir /mnt/nfs/scratch   # a slower disk
"""
from __future__ import annotations

import argparse
import io
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import batchcap.writer  # noqa: E402
from batchcap.bench import write_bench_images  # noqa: E402
from batchcap.captioner import resolve_model_path  # noqa: E402
from batchcap.config import BeamConfig, ImagePolicy, RunConfig  # noqa: E402
from batchcap.modelfile import read_metadata  # noqa: E402
from batchcap.runner import resume_settings, run_job  # noqa: E402
from batchcap.settings import runtime_config  # noqa: E402
from batchcap.sink import OutputStore  # noqa: E402


class InlineWriter:
    """The run loop writing rows itself: what ``BackgroundWriter`` replaced."""

    def __init__(self, store: Any, commit_seconds: float, **_: Any) -> None:
        self.store = store

    def add(self, rows: list[dict[str, Any]]) -> None:
        self.store.add(rows)

    def close(self) -> None:
        self.store.commit()


def timed_run(paths_file: Path, out: Path, model: Path, commit_every: int, batch_size: int, workers: int) -> float:
    cfg = RunConfig(sources=(), out=str(out), files_from=str(paths_file), log_every=1e9, overwrite=True,
                    commit_every=commit_every)
    runtime = runtime_config("cpu", "auto", batch_size, str(workers))
    start = time.perf_counter()
    result = run_job(cfg, model, BeamConfig(max_len=int(read_metadata(model)["max_caption_len"])), runtime,
                     ImagePolicy(), stream=io.StringIO())
    elapsed = time.perf_counter() - start
    assert result.exit_code == 0, result.summary
    shutil.rmtree(out.parent, ignore_errors=True)
    return elapsed


def commit_cost(workdir: Path, model: Path, rows: int, repeats: int = 20) -> float:
    """Median seconds of one ``OutputStore.commit`` of ``rows`` rows (Parquet write, fsync, rename, fsync)."""
    store = OutputStore.open(workdir / "c" / "x.parquet", None, resume_settings(read_metadata(model), BeamConfig()),
                             {}, commit_every=10**9)
    times = []
    for r in range(repeats):
        store.add([{"id": f"{r}-{i}", "status": "ok", "caption": "a dog runs on the grass", "score": -1.0}
                   for i in range(rows)])
        start = time.perf_counter()
        store.commit()
        times.append(time.perf_counter() - start)
    shutil.rmtree(workdir / "c", ignore_errors=True)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None)
    parser.add_argument("--count", type=int, default=192)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--commit-every", type=int, default=16, help="16 = one part per batch (worst case)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out-dir", default=None, help="where outputs are written (default: a temp folder)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = resolve_model_path(args.model)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        out_root = Path(args.out_dir) if args.out_dir else work
        paths = write_bench_images(work / "photos", args.count, (224, 224))
        listing = work / "inputs.txt"
        listing.write_text("".join(f"{p}\n" for p in paths), encoding="utf-8")
        shipped = batchcap.writer.BackgroundWriter
        times: dict[str, list[float]] = {"thread": [], "inline": []}
        for repeat in range(args.repeats + 1):  # the first round warms up
            for mode, writer in (("inline", InlineWriter), ("thread", shipped)):
                batchcap.writer.BackgroundWriter = writer  # type: ignore[misc,assignment]
                try:
                    t = timed_run(listing, out_root / f"bench-{mode}-{repeat}" / "captions.parquet", model,
                                  args.commit_every, args.batch_size, args.workers)
                finally:
                    batchcap.writer.BackgroundWriter = shipped  # type: ignore[misc]
                if repeat:
                    times[mode].append(t)
                print(f"{mode:>6} run {repeat}: {args.count / t:.2f} img/s ({t:.2f} s)", file=sys.stderr)
        cost = commit_cost(out_root, model, args.commit_every)
    inline, thread = statistics.median(times["inline"]), statistics.median(times["thread"])
    print(f"{args.count} pictures 224x224, batch {args.batch_size}, commit every {args.commit_every} rows, "
          f"{args.repeats} repeats, medians")
    print(f"  inline writes : {args.count / inline:.2f} img/s ({inline:.2f} s)")
    print(f"  writer thread : {args.count / thread:.2f} img/s ({thread:.2f} s)")
    print(f"  thread / inline throughput: {inline / thread:.3f}")
    print(f"  one part commit of {args.commit_every} rows: {cost * 1000:.1f} ms "
          f"({args.count // args.commit_every} commits per run)")


if __name__ == "__main__":
    main()
