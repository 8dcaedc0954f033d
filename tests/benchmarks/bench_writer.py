"""What the writer thread buys: ``batchcap run`` with rows written on a thread vs inline, in one process.

The same ``run_job`` twice per repeat, alternating: once as shipped (``BackgroundWriter``:
part writes and fsyncs overlap the encoder), once with a stand-in that calls
``OutputStore.add`` / ``commit`` inline in the run loop, as batchcap did before. Prints the
medians of the whole run and of the time the run loop itself spent handing rows over
(``add``; what the encoder waits for), their ratios, and the cost of one part commit alone.
On a shared machine the whole-run figure is noisy; the hand-over time is not.

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

import batchcap.outputs.background_writer  # noqa: E402
from batchcap.config import BeamConfig, ImagePolicy, RunConfig  # noqa: E402
from batchcap.model.modelfile import (
    read_metadata,  # noqa: E402
    resolve_model_path,  # noqa: E402
)
from batchcap.outputs.store import OutputStore  # noqa: E402
from batchcap.pipeline.runner import resume_settings, run_job  # noqa: E402
from batchcap.pipeline.settings import runtime_config  # noqa: E402
from batchcap.tools.bench import write_bench_images  # noqa: E402


class InlineWriter:
    """The run loop writing rows itself: what ``BackgroundWriter`` replaced."""

    def __init__(self, store: Any, commit_seconds: float, **_: Any) -> None:
        self.store = store

    def add(self, rows: list[dict[str, Any]]) -> None:
        self.store.add(rows)

    def close(self) -> None:
        self.store.commit()


HAND_OVER = [0.0]  # seconds the run loop spent in add() during the current run


def timing(cls: type) -> type:
    """``cls`` with the time spent in ``add`` counted in ``HAND_OVER``."""

    class Timed(cls):  # type: ignore[valid-type,misc]
        def add(self, rows: list[dict[str, Any]]) -> None:
            start = time.perf_counter()
            super().add(rows)
            HAND_OVER[0] += time.perf_counter() - start

    return Timed


def timed_run(paths_file: Path, out: Path, model: Path, commit_every: int, batch_size: int, workers: int) -> float:
    cfg = RunConfig(
        sources=(), out=str(out), files_from=str(paths_file), log_every=1e9, overwrite=True, commit_every=commit_every
    )
    runtime = runtime_config("cpu", "auto", batch_size, str(workers))
    start = time.perf_counter()
    result = run_job(
        cfg,
        model,
        BeamConfig(max_len=int(read_metadata(model)["max_caption_len"])),
        runtime,
        ImagePolicy(),
        stream=io.StringIO(),
    )
    elapsed = time.perf_counter() - start
    assert result.exit_code == 0, result.summary
    shutil.rmtree(out.parent, ignore_errors=True)
    return elapsed


def commit_cost(workdir: Path, model: Path, rows: int, repeats: int = 20) -> float:
    """Median seconds of one ``OutputStore.commit`` of ``rows`` rows (Parquet write, fsync, rename, fsync)."""
    store = OutputStore.open(
        workdir / "c" / "x.parquet", None, resume_settings(read_metadata(model), BeamConfig()), {}, commit_every=10**9
    )
    times = []
    for r in range(repeats):
        store.add(
            [
                {"id": f"{r}-{i}", "status": "ok", "caption": "a dog runs on the grass", "score": -1.0}
                for i in range(rows)
            ]
        )
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
        shipped = batchcap.outputs.background_writer.BackgroundWriter
        times: dict[str, list[float]] = {"thread": [], "inline": []}
        hand_over: dict[str, list[float]] = {"thread": [], "inline": []}
        for repeat in range(args.repeats + 1):  # the first round warms up
            for mode, writer in (("inline", InlineWriter), ("thread", shipped)):
                batchcap.outputs.background_writer.BackgroundWriter = timing(writer)  # type: ignore[misc]
                HAND_OVER[0] = 0.0
                try:
                    t = timed_run(
                        listing,
                        out_root / f"bench-{mode}-{repeat}" / "captions.parquet",
                        model,
                        args.commit_every,
                        args.batch_size,
                        args.workers,
                    )
                finally:
                    batchcap.outputs.background_writer.BackgroundWriter = shipped  # type: ignore[misc]
                if repeat:
                    times[mode].append(t)
                    hand_over[mode].append(HAND_OVER[0])
                print(
                    f"{mode:>6} run {repeat}: {args.count / t:.2f} img/s ({t:.2f} s), "
                    f"hand-over {HAND_OVER[0] * 1000:.1f} ms",
                    file=sys.stderr,
                )
        cost = commit_cost(out_root, model, args.commit_every)
    inline, thread = statistics.median(times["inline"]), statistics.median(times["thread"])
    inline_hand, thread_hand = statistics.median(hand_over["inline"]), statistics.median(hand_over["thread"])
    print(
        f"{args.count} pictures 224x224, batch {args.batch_size}, commit every {args.commit_every} rows, "
        f"{args.repeats} repeats, medians"
    )
    print(
        f"  inline writes : {args.count / inline:.2f} img/s ({inline:.2f} s), "
        f"run loop in add(): {inline_hand * 1000:.1f} ms ({inline_hand / inline:.2%} of the run)"
    )
    print(
        f"  writer thread : {args.count / thread:.2f} img/s ({thread:.2f} s), "
        f"run loop in add(): {thread_hand * 1000:.1f} ms ({thread_hand / thread:.2%} of the run)"
    )
    print(
        f"  thread / inline throughput: {inline / thread:.3f}; hand-over time inline / thread: "
        f"{inline_hand / max(thread_hand, 1e-9):.0f}x"
    )
    print(
        f"  one part commit of {args.commit_every} rows: {cost * 1000:.1f} ms "
        f"({args.count // args.commit_every} commits per run)"
    )


if __name__ == "__main__":
    main()
