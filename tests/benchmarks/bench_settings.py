"""Rate of ``batchcap run`` under different environment settings, on the same pictures and model.

A benchmark, not a test: runs alternate between the settings, one fresh ``batchcap run`` each, after a
warm-up round; it prints each setting's median rate and the median of the per-round ratios to the first
setting's. A setting is ``NAME=VALUE`` pairs joined by commas (``-`` for the environment as it is).

    python tests/benchmarks/bench_settings.py PHOTOS BATCHCAP_OPENVINO_STREAMS=1 BATCHCAP_OPENVINO_STREAMS=auto \\
        [--count 300] [--rounds 5] [--model MODEL]

Every run's output is checked to hold ``--count`` rows.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from timed_run import compare_runs  # beside this script


def parse_setting(text: str) -> dict[str, str]:
    """``A=1,B=x`` -> {"A": "1", "B": "x"}; ``-`` -> {}."""
    if text == "-":
        return {}
    pairs = [item.split("=", 1) for item in text.split(",")]
    if any(len(pair) != 2 or not pair[0] for pair in pairs):
        raise SystemExit(f"{text!r}: a setting is NAME=VALUE[,NAME=VALUE...], or -")
    return dict(pairs)  # type: ignore[arg-type]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("photos", type=Path, help="a folder of pictures, subfolders too (the first --count by path)")
    parser.add_argument("settings", nargs="+", help="NAME=VALUE[,NAME=VALUE...] or -; ratios are to the first")
    parser.add_argument("--count", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--model", default=None, help="model file (default: the shipped model)")
    args = parser.parse_args()
    extra = ["--model", args.model] if args.model else []
    variants = {setting: (extra, parse_setting(setting)) for setting in args.settings}
    compare_runs(args.photos, args.count, args.rounds, variants)


if __name__ == "__main__":
    main()
