"""Score ensembles of models that each keep their own fine-tuned exit flow, on every DATA's dev split.

Model selection, not a benchmark. `batchcap ensemble` joins models fine-tuned with
`--finetune-exit-flow`, each keeping its own exit flow; this script scores many such ensembles
before any is built, from cached trunk activations: the entry and middle flow, shared by every
member, come from the cache `batchcap train --cache-dir` wrote, each member runs its own exit flow
on them, and each member's decoder reads its own features inside one beam search, as the built
ensemble does (beam 3, the first member's word rules, bf16 decoder weights as `run` uses at bf16).
Captions are scored with the COCO toolkit (PTB tokenizer when Java is present), as `batchcap eval`
scores them.

    python tests/benchmarks/sweep_exit_flow_ensembles.py flickr8k/ everyday-captioned/dataset_everyday.json \\
        --model a=a.safetensors --model b=b.safetensors --cache-dir .batchcap-features \\
        --ensembles a,b,a+b,a+b+b,a+b:prob [--json out.json]

An ensemble is members joined by ``+`` (a member named twice counts twice: a weight), ending in
``:prob`` for the mixture rule instead of the mean log-probability. A single name scores that model
alone through the same path, which is the check that the path reproduces `batchcap eval`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from sweep_dev import dev_features, exit_flow_features  # noqa: E402

from batchcap.config import BeamConfig  # noqa: E402
from batchcap.data.captions.factory import load_caption_dataset  # noqa: E402
from batchcap.data.captions.mixture import dataset_name  # noqa: E402
from batchcap.encode.exit_flow import TRUNK_LAYER  # noqa: E402
from batchcap.model.ensemble import EnsembleDecoder  # noqa: E402
from batchcap.model.modelfile import CaptionModel, load_model  # noqa: E402
from batchcap.training.driver import caption_features  # noqa: E402
from batchcap.training.metrics import score_captions  # noqa: E402


def parse_ensemble(spec: str) -> tuple[list[str], str]:
    """``"a+b+b:prob"`` -> (["a", "b", "b"], "prob"); the rule defaults to ``logprob``."""
    members, _, rule = spec.partition(":")
    return members.split("+"), rule or "logprob"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", nargs="+", help="caption datasets whose val split is scored (any format train reads)")
    parser.add_argument("--model", action="append", required=True, metavar="NAME=FILE", help="a member and its name")
    parser.add_argument("--cache-dir", required=True, type=Path)
    parser.add_argument("--ensembles", required=True, help="comma-separated: a, a+b, a+b+b, a+b:prob")
    parser.add_argument("--json", dest="json_out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)  # as run searches on a CPU
    files = dict(spec.split("=", 1) for spec in args.model)
    models: dict[str, CaptionModel] = {name: load_model(path) for name, path in files.items()}
    ensembles = [parse_ensemble(spec) for spec in args.ensembles.split(",")]
    for members, _ in ensembles:
        unknown = [m for m in members if m not in models]
        if unknown:
            raise SystemExit(f"unknown member(s) {', '.join(unknown)}: name them with --model NAME=FILE")
    for name, model in models.items():
        if not model.encoder.finetuned:
            raise SystemExit(f"{name} has no fine-tuned exit flow; score it with sweep_dev.py or batchcap eval")
    searches = []  # (members, rule, decoder): built once, searched on every DATA
    for members, rule in ensembles:
        decoders = [models[m].build_decoder(torch.bfloat16) for m in members]
        searches.append(
            (members, rule, decoders[0] if len(decoders) == 1 else EnsembleDecoder(decoders, rule, split_features=True))
        )
    rows = []
    for path in args.data:
        dataset = load_caption_dataset(path)
        dev = dataset.splits["val"]
        ids = [r.image_id for r in dev]
        references = {r.image_id: list(r.captions) for r in dev}
        trunk = dev_features(args.cache_dir, ids, TRUNK_LAYER)
        features: dict[str, torch.Tensor] = {}
        for members, rule, decoder in searches:
            for member in members:
                if member not in features:
                    features[member] = exit_flow_features(models[member], trunk)
            first = models[members[0]]
            cfg = BeamConfig(beam_size=3, max_len=first.max_caption_len, length_penalty=0.0)
            joined = torch.cat([features[m] for m in members], dim=-1)
            captions = caption_features(decoder, joined, first.vocab, cfg, **first.word_rules(cfg))
            scores = score_captions(dict(zip(ids, captions)), references, full=True)
            row = {
                "data": dataset_name(dataset),
                "ensemble": "+".join(members) + ("" if rule == "logprob" else f":{rule}"),
                "BLEU-4": round(scores["BLEU-4"], 4),
                "CIDEr-D": round(scores["CIDEr"], 4),
                "tokenizer": scores.get("tokenizer"),
            }
            print(json.dumps(row), flush=True)
            rows.append({**row, "captions": dict(zip(ids, captions))})
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
