"""Captions per second: the vectorised beam search vs. the per-image reference search.

A random-weight decoder of realistic size (embed 256, hidden 512, attention 512 over
R=100 regions of 2048-d features, V=8000) captions B=64 images; both searches start from
encoder features (``init_state`` is timed too) and use the same rules. Random weights would
almost never say ``<end>`` (V=8000), so by default every beam runs to max length, a fixed
workload; ``--end-bias`` makes captions end earlier. The per-image search is timed once on
the first ``--ref-images`` images (its cost is linear in images), the vectorised one on the
whole batch; the two alternate ``--repeats`` times and the medians are compared, in wall
time and in CPU time (steadier on a shared machine).

    python tests/benchmarks/bench_beam.py                  # B=64, K=1,3,5, fp32 and bf16
    python tests/benchmarks/bench_beam.py --beam 5 --precision fp32 --device cuda
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for beam_reference

from beam_reference import reference_beam_search  # noqa: E402

from batchcap.config import BeamConfig, DecoderConfig  # noqa: E402
from batchcap.model.beam import beam_search  # noqa: E402
from batchcap.model.decoder import CaptionDecoder  # noqa: E402

START, END, BANNED = 1, 2, (0, 1, 3)
T = TypeVar("T")


def make_decoder(vocab: int, end_bias: float, device: str) -> CaptionDecoder:
    torch.manual_seed(0)
    decoder = CaptionDecoder(
        DecoderConfig(vocab_size=vocab, embed_dim=256, hidden_dim=512, attention_dim=512, dropout=0.0)
    ).eval()
    with torch.no_grad():
        decoder.out.weight.mul_(4.0)  # peaked distributions, so beams differ
        decoder.out.bias[END] += end_bias
    return decoder.to(device)


class Clock:
    """Wall and CPU seconds of each call, and how much of it was spent inside ``step``."""

    def __init__(self) -> None:
        self.wall: list[float] = []
        self.cpu: list[float] = []
        self.in_step = 0.0

    def run(self, fn: Callable[[], T]) -> T:
        sync()
        wall, cpu = time.perf_counter(), time.process_time()
        result = fn()
        sync()
        self.wall.append(time.perf_counter() - wall)
        self.cpu.append(time.process_time() - cpu)
        return result

    def timed_step(self, step: Callable[..., T]) -> Callable[..., T]:
        def wrapped(*args: object) -> T:
            sync()
            start = time.perf_counter()
            out = step(*args)
            sync()
            self.in_step += time.perf_counter() - start
            return out

        return wrapped


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--beam", type=int, nargs="+", default=[5, 3, 1])
    parser.add_argument("--vocab", type=int, default=8000)
    parser.add_argument("--max-len", type=int, default=20)
    parser.add_argument("--regions", type=int, default=100)
    parser.add_argument("--end-bias", type=float, default=0.0)
    parser.add_argument("--precision", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--ref-images", type=int, default=8)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    decoder = make_decoder(args.vocab, args.end_bias, args.device)
    gen = torch.Generator().manual_seed(1)
    feats = torch.randn(args.batch, args.regions, 2048, generator=gen).to(args.device)
    print(
        f"device={args.device} threads={torch.get_num_threads()} B={args.batch} V={args.vocab} "
        f"max_len={args.max_len} R={args.regions} torch={torch.__version__}"
    )
    kw = dict(start_id=START, end_id=END, banned_ids=BANNED)
    n_ref = min(args.ref_images, args.batch)
    for precision in args.precision:
        for k in args.beam:
            cfg = BeamConfig(beam_size=k, max_len=args.max_len)

            def autocast() -> contextlib.AbstractContextManager:
                if precision == "bf16":
                    return torch.autocast(torch.device(args.device).type, dtype=torch.bfloat16)
                return contextlib.nullcontext()

            fast, ref = Clock(), Clock()

            def batched():
                with torch.inference_mode(), autocast():
                    return beam_search(fast.timed_step(decoder.step), decoder.init_state(feats), cfg, **kw)

            def per_image():
                with torch.inference_mode(), autocast():
                    parts = [
                        reference_beam_search(decoder.step, decoder.init_state(feats[b : b + 1]), cfg, **kw)
                        for b in range(n_ref)
                    ]
                return torch.cat([p.tokens for p in parts])

            batched()  # warm-up
            fast.in_step = 0.0
            for _ in range(args.repeats):  # interleaved, so both see the same machine load
                result = fast.run(batched)
                ref_tokens = ref.run(per_image)
            same = (result.tokens[:n_ref].cpu() == ref_tokens.cpu()).all(dim=(1, 2)).float().mean().item()
            wall_fast, wall_ref = statistics.median(fast.wall), statistics.median(ref.wall)
            cpu_fast, cpu_ref = statistics.median(fast.cpu), statistics.median(ref.cpu)
            print(
                f"{precision} K={k}: vectorised {args.batch / wall_fast:7.2f} captions/s  "
                f"per-image {n_ref / wall_ref:6.2f} captions/s  "
                f"speed-up {wall_ref / n_ref * args.batch / wall_fast:5.1f}x wall, "
                f"{cpu_ref / n_ref * args.batch / cpu_fast:5.1f}x cpu  "
                f"(decoder step {fast.in_step / sum(fast.wall):.0%} of vectorised time; "
                f"mean words {result.lengths.float().mean():.1f}; same captions {same:.0%})",
                flush=True,
            )


if __name__ == "__main__":
    main()
