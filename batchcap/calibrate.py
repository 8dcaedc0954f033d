"""``batchcap calibrate``: fit a model's familiarity statistics and confidence calibrator, and report them.

The flow is ``encode (cached) -> caption -> label -> fit -> measure -> model file``:

* pictures are encoded once by the model's own encoder at the run's precision and kept in a
  :class:`batchcap.features.FeatureCache` (``--cache-dir``), so a rerun costs only the search;
* familiarity is fitted on the pooled features of a deterministic subset of the training
  pictures (:func:`train_subset`: every k-th id in sorted order);
* every dev picture is captioned as ``batchcap run`` would, and labelled acceptable when its
  caption's CIDEr-D against its own references (:class:`batchcap.scst.CiderD`, document
  frequencies from the dev references) reaches the threshold;
* the calibrator (:func:`batchcap.confidence.fit_calibrator`) is measured by k-fold
  cross-validated AUROC on dev, then refitted on all of dev; the figures (AUROC, reliability
  table, confidence on unfamiliar pictures) are returned and stored with it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from batchcap.captioner import Captioner
from batchcap.config import BeamConfig, RuntimeConfig
from batchcap.datasets import CaptionRecord
from batchcap.features import FeatureCache, FeatureKey
from batchcap.modelfile import CaptionModel

Log = Callable[[str], None]
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")


def train_subset(records: Sequence[CaptionRecord], count: int) -> list[CaptionRecord]:
    """``count`` training records spread evenly over the ids in sorted order (deterministic)."""
    ordered = sorted(records, key=lambda r: r.image_id)
    if count >= len(ordered):
        return ordered
    step = len(ordered) / count
    return [ordered[int(i * step)] for i in range(count)]


def folder_items(folder: str | Path) -> list[tuple[str, str]]:
    """``(id, path)`` of the pictures directly in ``folder``, sorted by name."""
    paths = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    return [(p.name, str(p)) for p in paths]


@dataclass
class EncodedSet:
    """Pictures of one set, encoded: ids and their spatial (or pooled) fp16 features."""

    ids: list[str]
    features: torch.Tensor  # fp16 (N, R, F) or (N, F)


def encode_cached(captioner: Captioner, items: Sequence[tuple[str, Any]], cache_root: str | Path,
                  runtime: RuntimeConfig, pooled: bool, log: Log = print) -> EncodedSet:
    """Features of ``items`` ``(id, path or record)`` from the cache, computing the missing ones.

    ``pooled`` keeps only the mean over regions (what familiarity needs), a 100th of the space.
    """
    model = captioner.model
    key = FeatureKey(encoder=model.encoder.name,
                     weights=model.encoder.weights_sha256 or f"pretrained:{model.encoder.pretrained_tag}",
                     preprocess=model.preprocess, spatial=model.encoder.spatial and not pooled,
                     precision=runtime.precision)
    cache = FeatureCache(cache_root, key)

    def encode(images: torch.Tensor) -> torch.Tensor:
        features = captioner.encode(images)
        return features.mean(1) if pooled and features.dim() == 3 else features

    def progress(done: int, total: int) -> None:
        if done % 256 < runtime.batch_size or done == total:
            log(f"  encoded {done}/{total}")

    failures = cache.extract(items, encode, runtime, on_progress=progress)
    if failures:
        log(f"  {len(failures)} pictures could not be read (e.g. {next(iter(failures.items()))})")
    wanted = [i for i, _ in items if i not in failures]
    ids, features = cache.load(wanted)
    return EncodedSet(ids, features)
