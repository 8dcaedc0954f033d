"""Beam search with the encoder memory and keys shared by an image's beams vs copied K times.

Prints the median time per batch of each and their ratio, measured in one process, and
whether the captions are the same. The shipped decoder, random (ReLU) 10x10x2048 features.

    python tests/benchmarks/bench_beam_shared.py [--batch 64] [--beam 3] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from batchcap.config import BeamConfig
from batchcap.model.beam import beam_search
from batchcap.model.modelfile import DEFAULT_MODEL, load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--beam", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = load_model(DEFAULT_MODEL)
    decoder, vocab = model.build_decoder().eval(), model.vocab
    features = torch.randn(args.batch, 100, 2048).relu()
    cfg = BeamConfig(beam_size=args.beam, max_len=model.max_caption_len)
    kw = dict(
        start_id=vocab.start_id,
        end_id=vocab.end_id,
        pad_id=vocab.pad_id,
        banned_ids=vocab.never_generated,
        unendable_ids=model.unendable_ids,
    )
    times: dict[str, list[float]] = {"copied": [], "shared": []}
    tokens: dict[str, torch.Tensor] = {}
    with torch.inference_mode():
        state = decoder.init_state(features)
        for _ in range(args.repeats):  # alternate, so drift in the machine's load hits both alike
            for name, per_image in (("copied", ()), ("shared", decoder.per_image_state)):
                start = time.perf_counter()
                tokens[name] = beam_search(decoder.step, state, cfg, per_image=per_image, **kw).tokens
                times[name].append(time.perf_counter() - start)
    copied, shared = (statistics.median(times[k]) for k in ("copied", "shared"))
    print(
        f"B={args.batch} K={args.beam}: copied {copied:.3f} s, shared {shared:.3f} s, "
        f"ratio {copied / shared:.2f}x, same captions: {torch.equal(tokens['copied'], tokens['shared'])}"
    )


if __name__ == "__main__":
    main()
