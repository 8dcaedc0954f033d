"""What reading training features through a memory-mapped file costs, against holding them in memory.

Writes a synthetic feature cache of ``--rows`` trunk-activation rows (361 x 728 fp16, what
``--finetune-exit-flow`` caches, 525 KB a picture) in ``--dir``, loads it twice with
:meth:`batchcap.training.feature_cache.FeatureCache.load`: once in memory, once file-backed (the path a
split larger than the memory budget takes). Then times what a training step does with it,
gathering ``--batch`` random rows and widening them to fp32, in alternating rounds, and
prints the medians and the ratio mapped / in memory. Also prints both load times.

While the mapped file fits in the page cache the ratio should be about 1; a cache larger
than memory is what the mapped path exists for, and there each step reads from the disk.

    python tests/benchmarks/bench_feature_memory.py                 # 4,000 rows, 2.1 GB
    python tests/benchmarks/bench_feature_memory.py --rows 8000 --dir /scratch
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from batchcap.config import Preprocess  # noqa: E402
from batchcap.training.feature_cache import FeatureCache, FeatureKey, is_file_backed  # noqa: E402

ROW_SHAPE = (361, 728)  # Xception's block-11 activations, flattened regions x channels


def write_synthetic_cache(root: Path, rows: int, chunk: int = 256) -> FeatureCache:
    """A cache of ``rows`` random fp16 rows in the format :meth:`FeatureCache.extract` writes."""
    key = FeatureKey("synthetic", "bench", Preprocess(), True, "bf16", layer="block11")
    cache = FeatureCache(root, key)
    generator = torch.Generator().manual_seed(0)
    for start in range(0, rows, chunk):
        count = min(chunk, rows - start)
        features = torch.randn((count, *ROW_SHAPE), generator=generator)
        cache.write_chunk([f"img{start + i:06d}" for i in range(count)], features)
    return cache


def time_steps(features: torch.Tensor, batch: int, steps: int, seed: int) -> float:
    """Seconds for ``steps`` random gathers of ``batch`` rows, widened to fp32 (a training step's read)."""
    generator = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    for _ in range(steps):
        rows = torch.randint(features.shape[0], (batch,), generator=generator)
        features[rows].float().sum()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=4000)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--dir", default=None, help="where the synthetic cache goes (default: a temp folder)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        cache = write_synthetic_cache(Path(tmp), args.rows)
        start = time.perf_counter()
        _, held = cache.load(memory_budget=float("inf"))
        load_held = time.perf_counter() - start
        start = time.perf_counter()
        _, mapped = cache.load(memory_budget=0)
        load_mapped = time.perf_counter() - start
        assert not is_file_backed(held) and is_file_backed(mapped) and torch.equal(held[:3], mapped[:3])
        time_steps(held, args.batch, 5, seed=99)  # warm-up, both
        time_steps(mapped, args.batch, 5, seed=99)
        times: dict[str, list[float]] = {"in memory": [], "mapped": []}
        for r in range(args.rounds):
            order = ("in memory", "mapped") if r % 2 == 0 else ("mapped", "in memory")
            for name in order:
                times[name].append(time_steps(held if name == "in memory" else mapped, args.batch, args.steps, seed=r))
        gib = held.nbytes / 2**30
        print(
            f"{args.rows} rows of {ROW_SHAPE} fp16 ({gib:.2f} GiB); load: in memory {load_held:.1f} s, "
            f"mapped {load_mapped:.1f} s"
        )
        for name, values in times.items():
            per_step = statistics.median(values) / args.steps * 1000
            print(f"{name:>9}: {per_step:.2f} ms a step of {args.batch} rows (median of {args.rounds} rounds)")
        ratios = [m / h for m, h in zip(times["mapped"], times["in memory"])]
        print(
            f"mapped / in memory: {statistics.median(ratios):.2f}x  (rounds: {', '.join(f'{x:.2f}' for x in ratios)})"
        )


if __name__ == "__main__":
    main()
