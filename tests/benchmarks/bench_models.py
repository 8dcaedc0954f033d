"""Rate of ``batchcap run`` with different model files on the same pictures.

A benchmark, not a test: runs alternate between the models, one fresh ``batchcap run`` each, after a
warm-up round that also converts each model's encoder once; it prints each model's median rate and the
median of the per-round ratios to the first model's (ratios within a round share the machine's load).

    python tests/benchmarks/bench_models.py PHOTOS MODEL [MODEL...] [--count 300] [--rounds 5]

Every run's output is checked to hold ``--count`` rows.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

from timed_run import first_pictures, run_once  # beside this script


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("photos", type=Path, help="a folder of pictures, subfolders too (the first --count by path)")
    parser.add_argument("models", type=Path, nargs="+", help="model files; ratios are to the first")
    parser.add_argument("--count", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    pictures = first_pictures(args.photos, args.count, recursive=True)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "photos"
        folder.mkdir()
        for i, picture in enumerate(pictures):
            (folder / f"{i:06d}{picture.suffix.lower()}").symlink_to(picture.resolve())
        out = Path(tmp) / "captions.parquet"
        rates: dict[Path, list[tuple[float, float]]] = {m: [] for m in args.models}
        for round_number in range(args.rounds + 1):  # round 0 warms up and is not counted
            for model in args.models:
                rate = run_once(str(folder), out, args.count, ["--model", str(model)])
                if round_number:
                    rates[model].append(rate)
            print(f"round {round_number}{' (warm-up)' if not round_number else ''} done", file=sys.stderr)
    first = rates[args.models[0]]
    print(f"{args.count} pictures, {args.rounds} rounds: whole-command img/s (summary's img/s), ratio to the first")
    for model, runs in rates.items():
        whole = statistics.median(r[0] for r in runs)
        summary = statistics.median(r[1] for r in runs)
        ratio = statistics.median(r[0] / f[0] for r, f in zip(runs, first))
        print(f"{model.name:40s} {whole:6.1f} ({summary:5.1f})  x{ratio:.2f}")


if __name__ == "__main__":
    main()
