"""What each decoder of an ensemble costs in the beam search, against the encoder, in one process.

Encodes the given photos once with the run's default backend and precision, then times the
beam search (on one torch thread, as ``batchcap run`` searches on a CPU) with the first 1, 2,
..., N decoders of MODEL, each with fp32 and with bf16 weights, alternating rounds so drift in
the machine's load hits all alike. Prints the median milliseconds per picture, each search's
speed relative to one fp32 decoder, the search's share of encoder + search, and how many
captions equal the fp32 search's.

    python tests/benchmarks/bench_ensemble.py PHOTOS --model ensemble.safetensors [--batch 16] [--rounds 5]
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from pathlib import Path

import torch

from batchcap.config import BeamConfig, ImagePolicy
from batchcap.data.loader import iter_batches
from batchcap.data.sources import open_sources
from batchcap.model.beam import beam_search
from batchcap.model.ensemble import EnsembleDecoder
from batchcap.model.modelfile import load_model, resolve_model_path
from batchcap.pipeline.captioner import Captioner, search_threads
from batchcap.pipeline.settings import runtime_config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("photos")
    parser.add_argument("--model", default=None)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--beam", type=int, default=3)
    parser.add_argument("--count", type=int, default=64, help="photos to use")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    model = load_model(resolve_model_path(args.model))
    runtime = runtime_config("auto", "auto", args.batch, "0", "auto", None)
    beam = BeamConfig(beam_size=args.beam, max_len=model.max_caption_len)
    captioner = Captioner(model, runtime, beam)  # its encoder; the searches are built below
    paths = sorted(str(p) for p in Path(args.photos).rglob("*.jpg"))[: args.count]
    batches = [
        b.images
        for b in iter_batches(open_sources(paths), model.preprocess, ImagePolicy(), batch_size=args.batch, workers=0)
    ]
    searches = {}
    for dtype in (torch.float32, torch.bfloat16):  # the decoder in fp32, and in bf16 as bf16 runs use it
        decoder = model.build_decoder(dtype)
        members = list(decoder.members) if isinstance(decoder, EnsembleDecoder) else [decoder]
        combine = decoder.combine if isinstance(decoder, EnsembleDecoder) else "logprob"
        name = "fp32" if dtype == torch.float32 else "bf16"
        searches.update(
            {
                f"{n} {name}": (members[0] if n == 1 else EnsembleDecoder(members[:n], combine))
                for n in range(1, len(members) + 1)
            }
        )
    cfg = dataclasses.replace(beam, n_best=min(2, args.beam))  # as run searches: 2 hypotheses for the margin
    vocab = model.vocab
    kw = dict(
        start_id=vocab.start_id,
        end_id=vocab.end_id,
        pad_id=vocab.pad_id,
        banned_ids=vocab.never_generated,
        unendable_ids=model.unendable_ids,
    )
    pictures = sum(b.shape[0] for b in batches)
    times: dict[str, list[float]] = {"encoder": [], **{n: [] for n in searches}}
    tokens: dict[str, list[torch.Tensor]] = {}
    with torch.inference_mode():
        features = [captioner.encode(b) for b in batches]  # warm-up and the features to search
        for _ in range(args.rounds):
            start = time.perf_counter()
            for b in batches:
                captioner.encode(b)
            times["encoder"].append(time.perf_counter() - start)
            for n, search in searches.items():
                start = time.perf_counter()
                with search_threads(runtime):
                    tokens[n] = [
                        beam_search(
                            search.step, search.init_state(f), cfg, per_image=search.per_image_state, **kw
                        ).tokens[:, 0]
                        for f in features
                    ]
                times[n].append(time.perf_counter() - start)
    ms = {k: 1000 * statistics.median(v) / pictures for k, v in times.items()}
    print(
        f"{pictures} photos, batch {args.batch}, beam {args.beam}, encoder {runtime.backend} {runtime.precision}: "
        f"encoder {ms['encoder']:.1f} ms/picture"
    )
    for n in searches:
        search = ms[n]
        same = sum(
            int(torch.equal(a[i], b[i]))
            for a, b in zip(tokens[n], tokens[n.replace("bf16", "fp32")])
            for i in range(a.shape[0])
        )
        print(
            f"  {n:>9} decoder(s): search {search:.1f} ms/picture, {ms['1 fp32'] / search:.2f}x the speed of one "
            f"fp32 decoder, {search / (search + ms['encoder']):.0%} of encoder + search, "
            f"captions equal to the fp32 search's: {same}/{pictures}"
        )


if __name__ == "__main__":
    main()
