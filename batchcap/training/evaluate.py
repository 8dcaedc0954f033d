"""``batchcap eval``: caption a dataset split with the `run` code path and score it.

Pictures go through the same input stage (:func:`batchcap.data.loader.iter_batches`: decode
policy, preprocessing, workers) and the same :class:`batchcap.pipeline.captioner.Captioner`
(encoder precision, beam search) as ``batchcap run`` -- so the scores describe what
users get, not a separate evaluation path.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from batchcap.config import BeamConfig, ImagePolicy, RuntimeConfig, to_dict
from batchcap.data.captions.records import CaptionDataset
from batchcap.data.loader import iter_batches
from batchcap.data.sources import ListReader, SourceSet, TarReader, shard_name
from batchcap.model.modelfile import CaptionModel
from batchcap.pipeline.captioner import Captioner, caption_batch
from batchcap.training.metrics import score_captions


def _sources_for(records: list[Any], tmp: Path) -> tuple[SourceSet, dict[str, str]]:
    """A SourceSet over ``records`` and the map from loader ids to dataset image ids."""
    files = [r for r in records if r.path]
    shards = sorted({r.shard for r in records if r.shard and not r.path})
    ids: dict[str, str] = {}
    readers: list[Any] = []
    if files:
        listing = tmp / "images.txt"
        listing.write_text("".join(f"{r.path}\n" for r in files), encoding="utf-8")
        readers.append(ListReader(str(listing)))
        ids.update({r.path: r.image_id for r in files})
    if shards:
        readers.append(TarReader(tuple(shards)))
    for r in records:
        if r.shard and not r.path:
            ids[f"{shard_name(r.shard)}/{r.key}"] = r.image_id
    return SourceSet(tuple(readers)), ids


def evaluate_split(
    dataset: CaptionDataset,
    split: str,
    model: CaptionModel,
    runtime: RuntimeConfig,
    beam: BeamConfig,
    *,
    encoder_weights: str | None = None,
    limit: int | None = None,
    policy: ImagePolicy = ImagePolicy(),
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Caption ``split`` of ``dataset`` and score against all its references."""
    records = dataset.splits[split][:limit] if limit else dataset.splits[split]
    references = {r.image_id: list(r.captions) for r in records}
    captioner = Captioner(model, runtime, beam, encoder_weights)
    predictions: dict[str, str] = {}
    failures: dict[str, str] = {}
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="batchcap-eval-") as tmp:
        sources, id_map = _sources_for(records, Path(tmp))
        for batch in iter_batches(
            sources,
            model.preprocess,
            policy,
            batch_size=runtime.batch_size,
            workers=runtime.workers,
            pin_memory=runtime.device.startswith("cuda"),
        ):
            if batch.ok:
                captions = caption_batch(captioner, batch)  # may move pictures to batch.failed
                for item, caption in zip(batch.ok, captions, strict=True):
                    predictions[id_map.get(item.item.id, item.item.id)] = caption.text
            for item in batch.failed:
                failures[id_map.get(item.item.id, item.item.id)] = f"{item.status}: {item.error}"
            if len(predictions) % 200 < runtime.batch_size:
                log(f"  {len(predictions)}/{len(records)} captioned")
    wall = time.time() - started
    predictions = {k: v for k, v in predictions.items() if k in references}
    scores = score_captions(predictions, {k: references[k] for k in predictions})
    return {
        "model": model.identity,
        "split": split,
        "data": dataset.root,
        "beam": to_dict(beam),
        "precision": runtime.precision,
        "backend": runtime.backend,
        "backend_note": runtime.backend_note,
        "images": len(predictions),
        "failed": failures,
        "missing": len(dataset.missing.get(split, [])),
        "seconds": round(wall, 1),
        "scores": scores,
        "captions": [
            {"image_id": k, "caption": v, "references": references[k]} for k, v in sorted(predictions.items())
        ],
    }


def format_scores(result: dict[str, Any]) -> str:
    """The scores as a small aligned table, plus what they were computed on."""
    scores = result["scores"]
    names = ["BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr"]
    lines = [
        f"{result['model']} on {result['split']} ({result['images']} images, beam "
        f"{result['beam']['beam_size']}, {result.get('backend', 'torch')} {result['precision']}, "
        f"tokenizer {scores.get('tokenizer')})"
    ]
    for name in names:
        value = scores.get(name)
        lines.append(f"  {name:<8} {'n/a' if value is None else f'{value:.4f}'}")
    if scores.get("note"):
        lines.append(f"  note: {scores['note']}")
    if result["failed"]:
        lines.append(f"  {len(result['failed'])} pictures could not be read")
    return "\n".join(lines)
