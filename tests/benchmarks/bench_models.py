"""Rate of ``batchcap run`` with different model files, or different options, on the same pictures.

A benchmark, not a test: runs alternate between the models, one fresh ``batchcap run`` each, after a
warm-up round that also converts each model's encoder once; it prints each model's median rate and the
median of the per-round ratios to the first model's (ratios within a round share the machine's load).

    python tests/benchmarks/bench_models.py PHOTOS MODEL [MODEL...] [--count 300] [--rounds 5]
    python tests/benchmarks/bench_models.py PHOTOS MODEL --variant "plain=--consensus-weight 0" --variant default=

With ``--variant LABEL=OPTIONS`` (repeatable) the first model runs once per variant with those extra
``batchcap run`` options instead.

Every run's output is checked to hold ``--count`` rows.
"""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path

from timed_run import compare_runs  # beside this script


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("photos", type=Path, help="a folder of pictures, subfolders too (the first --count by path)")
    parser.add_argument("models", type=Path, nargs="+", help="model files; ratios are to the first")
    parser.add_argument("--count", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--variant", action="append", default=[], help="LABEL=OPTIONS: the first model with OPTIONS")
    args = parser.parse_args()
    variants = {model.name: (["--model", str(model)], {}) for model in args.models}
    if args.variant:
        model = ["--model", str(args.models[0])]
        variants = {label: ([*model, *shlex.split(options)], {}) for label, _, options in map(_split, args.variant)}
    compare_runs(args.photos, args.count, args.rounds, variants)


def _split(variant: str) -> tuple[str, str, str]:
    if "=" not in variant:
        raise SystemExit(f"--variant {variant!r}: expected LABEL=OPTIONS")
    return variant.partition("=")


if __name__ == "__main__":
    main()
