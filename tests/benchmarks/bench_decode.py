"""Decode + preprocess throughput for large JPEGs, with and without Pillow's ``draft()``.

Run: ``python tests/benchmarks/bench_decode.py [--count 4] [--repeats 5] [--size 4000x3000]``.
Writes photo-like JPEGs (a smooth random field with fine grain, quality 90) to a
temporary folder, then times :func:`batchcap.data.image_decode.decode_file` with the default
:class:`~batchcap.config.Preprocess` (299 x 299) in this one process and prints the
median images/s of each mode and their ratio.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from batchcap.config import ImagePolicy, Preprocess
from batchcap.data.image_decode import decode_file


def photo_like(width: int, height: int, seed: int) -> Image.Image:
    """A smooth colour field plus grain: JPEG-compresses like a photo, unlike pure noise."""
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, (height // 100 + 2, width // 100 + 2, 3), dtype=np.uint8))
    field = np.asarray(coarse.resize((width, height), Image.Resampling.BICUBIC), dtype=np.int16)
    grain = rng.integers(-12, 13, (height, width, 1), dtype=np.int16)
    return Image.fromarray(np.clip(field + grain, 0, 255).astype(np.uint8))


def time_mode(paths: list[Path], pre: Preprocess, policy: ImagePolicy, repeats: int) -> float:
    """Median images/s over ``repeats`` passes (after one warm-up pass)."""
    rates = []
    for r in range(repeats + 1):
        start = time.perf_counter()
        for path in paths:
            out = decode_file(str(path), pre, policy)
            assert out.status == "ok", out.error
        if r:
            rates.append(len(paths) / (time.perf_counter() - start))
    return statistics.median(rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--size", default="4000x3000")
    args = parser.parse_args()
    width, height = (int(v) for v in args.size.lower().split("x"))
    torch.set_num_threads(1)
    pre = Preprocess()
    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        for i in range(args.count):
            path = Path(tmp) / f"big{i}.jpg"
            photo_like(width, height, i).save(path, "JPEG", quality=90)
            paths.append(path)
        mb = sum(p.stat().st_size for p in paths) / len(paths) / 1e6
        print(
            f"{args.count} JPEGs of {width}x{height} ({mb:.1f} MB each), preprocess "
            f"{pre.input_size[1]}x{pre.input_size[2]} {pre.resize}/{pre.interpolation}, one process"
        )
        full = time_mode(paths, pre, ImagePolicy(draft=False), args.repeats)
        draft = time_mode(paths, pre, ImagePolicy(draft=True), args.repeats)
    print(f"full decode : {full:7.2f} images/s")
    print(f"draft()     : {draft:7.2f} images/s")
    print(f"speed-up    : {draft / full:7.2f}x")


if __name__ == "__main__":
    main()
