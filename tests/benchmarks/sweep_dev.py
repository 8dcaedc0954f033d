"""Score models x search settings on Flickr8k dev from the feature cache `batchcap train` wrote.

Model selection, not a benchmark: every row searches the dev photos' cached encoder features
(no image decoding or encoding, so a setting costs seconds) and scores the captions with the
COCO toolkit (PTB tokenizer when Java is present). With the cache of the shipped recipe it
reproduces the model card's dev scores exactly; the model card's "What else was tried" table
came from it.

    python tests/benchmarks/sweep_dev.py flickr8k/ MODEL [MODEL...] --cache-dir .batchcap-features \\
        --settings 3:0,5:0,3:0.6 [--no-ending-rule] [--allow-repeated-words] [--bf16-search] [--fast] \\
        [--style NAME] [--json out.json]

A setting is ``BEAM:LENGTH_PENALTY[:NO_REPEAT_NGRAM]``. ``--cache-dir`` is the folder given to
(or defaulted by) ``batchcap train --cache-dir``; the sub-folder whose key matches the model's
encoder, weights, preprocessing and precision is used. A model with a fine-tuned exit flow
(``--finetune-exit-flow``) is scored on the cached trunk activations through its own exit flow.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from batchcap.config import BeamConfig, EncoderConfig, RuntimeConfig  # noqa: E402
from batchcap.data.captions.flickr8k import load_flickr8k  # noqa: E402
from batchcap.encode.exit_flow import TRUNK_LAYER, XceptionExitFlow  # noqa: E402
from batchcap.encode.torch_backend import build_backbone  # noqa: E402
from batchcap.encode.weights import resolve_encoder_weights  # noqa: E402
from batchcap.model.modelfile import CaptionModel, load_model  # noqa: E402
from batchcap.training.driver import caption_features  # noqa: E402
from batchcap.training.feature_cache import FeatureCache  # noqa: E402
from batchcap.training.feature_sources import CachedTrunk  # noqa: E402
from batchcap.training.metrics import score_captions  # noqa: E402


def dev_features(cache_dir: Path, ids: list[str], layer: str = "") -> torch.Tensor:
    """The cached features (or ``layer`` activations) of ``ids`` from the cache folder that holds all of them."""
    for folder in sorted(p for p in cache_dir.iterdir() if (p / "key.json").is_file()):
        if json.loads((folder / "key.json").read_text()).get("layer", "") != layer:
            continue
        cache = FeatureCache.__new__(FeatureCache)  # an existing folder: read it, never write a key
        cache.dir = folder
        if set(ids) <= cache.cached_ids():
            return cache.load(ids)[1]
    raise SystemExit(
        f"no folder in {cache_dir} holds the {layer or 'encoder'} features of all {len(ids)} dev "
        "photos; run batchcap train with this --cache-dir first"
    )


def exit_flow_features(model: CaptionModel, trunk: torch.Tensor, batch: int = 50) -> torch.Tensor:
    """A fine-tuned exit flow's features from the cached trunk activations, as its training validated."""
    backbone = build_backbone(EncoderConfig(name=model.encoder.name), resolve_encoder_weights(model))
    runtime = RuntimeConfig(device="cpu", precision="bf16", batch_size=batch, workers=0)
    source = CachedTrunk([], XceptionExitFlow(backbone), runtime, trunk)
    return source.val_features(None)  # type: ignore[arg-type]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", help="Flickr8k folder (token file, split files, photos)")
    parser.add_argument("models", nargs="+")
    parser.add_argument("--cache-dir", required=True, type=Path)
    parser.add_argument("--settings", default="3:0")
    parser.add_argument("--no-ending-rule", action="store_true")
    parser.add_argument("--allow-repeated-words", action="store_true")
    parser.add_argument("--fast", action="store_true", help="BLEU and CIDEr-D with batchcap's tokenisation only")
    parser.add_argument(
        "--bf16-search",
        action="store_true",
        help="search with bf16 decoder weights, as `run` does at bf16 (default: fp32)",
    )
    parser.add_argument(
        "--style",
        default=None,
        help="a model with caption styles: write every dev photo in this style (default: the first)",
    )
    parser.add_argument("--json", dest="json_out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)  # as run searches on a CPU
    dev = load_flickr8k(args.data).splits["val"]
    ids = [r.image_id for r in dev]
    references = {r.image_id: list(r.captions) for r in dev}
    stock: torch.Tensor | None = None
    rows = []
    for path in args.models:
        model = load_model(path)
        if model.encoder.finetuned:  # its exit flow runs on the cached trunk activations
            features = exit_flow_features(model, dev_features(args.cache_dir, ids, TRUNK_LAYER))
        else:
            stock = dev_features(args.cache_dir, ids) if stock is None else stock
            features = stock
        # fp32, as the card was scored; --bf16-search: the decoder `run` uses at bf16
        decoder, vocab = model.build_decoder(torch.bfloat16 if args.bf16_search else None), model.vocab
        styles = None
        if model.decoder.styles:
            index = model.decoder.styles.index(args.style) if args.style else 0
            styles = torch.full((len(ids),), index, dtype=torch.long)
        for setting in args.settings.split(","):
            parts = setting.split(":")
            cfg = BeamConfig(
                beam_size=int(parts[0]),
                max_len=model.max_caption_len,
                length_penalty=float(parts[1]),
                no_repeat_ngram=int(parts[2]) if len(parts) > 2 else 0,
                ending_rule=not args.no_ending_rule,
                allow_repeated_words=args.allow_repeated_words,
            )
            started = time.perf_counter()
            captions = caption_features(decoder, features, vocab, cfg, styles=styles, **model.word_rules(cfg))
            seconds = time.perf_counter() - started
            scores = score_captions(dict(zip(ids, captions)), references, full=not args.fast)
            row = {
                "model": path,
                "setting": setting,
                "BLEU-4": round(scores["BLEU-4"], 4),
                "CIDEr-D": round(scores["CIDEr"], 4),
                "search_seconds": round(seconds, 1),
                "mean_words": round(sum(len(c.split()) for c in captions) / len(captions), 2),
            }
            print(json.dumps(row), flush=True)
            rows.append({**row, "captions": dict(zip(ids, captions))})  # the JSON keeps every caption
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
