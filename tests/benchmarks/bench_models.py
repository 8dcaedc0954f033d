"""Rate of ``batchcap run`` with different model files on the same pictures.

A benchmark, not a test: runs alternate between the models, one fresh ``batchcap run`` each, after a
warm-up round that also converts each model's encoder once; it prints each model's median rate and the
median of the per-round ratios to the first model's (ratios within a round share the machine's load).

    python tests/benchmarks/bench_models.py PHOTOS MODEL [MODEL...] [--count 300] [--rounds 5]

Every run's output is checked to hold ``--count`` rows.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from timed_run import compare_runs  # beside this script


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("photos", type=Path, help="a folder of pictures, subfolders too (the first --count by path)")
    parser.add_argument("models", type=Path, nargs="+", help="model files; ratios are to the first")
    parser.add_argument("--count", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    variants = {model.name: (["--model", str(model)], {}) for model in args.models}
    compare_runs(args.photos, args.count, args.rounds, variants)


if __name__ == "__main__":
    main()
