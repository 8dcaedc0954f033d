"""What a training step reads: cached encoder features (or cached trunk activations under a fine-tuned exit
flow) with the captions encoded beside them, on the device when they fit.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch

from batchcap.config import EncoderConfig, Preprocess, RuntimeConfig, TrainConfig
from batchcap.data.captions.records import CaptionDataset, CaptionRecord
from batchcap.encode.exit_flow import TRUNK_LAYER, XceptionExitFlow, XceptionTrunk, trunk_to_map
from batchcap.encode.torch_backend import Encoder, build_backbone
from batchcap.encode.weights import WeightsSource
from batchcap.fileio import file_sha256
from batchcap.model.modelfile import EncoderSpec
from batchcap.model.text import Vocabulary, normalize_caption
from batchcap.pipeline.captioner import encode_fixed_size
from batchcap.training.feature_cache import (
    FEATURE_MEMORY_ENV,
    FeatureCache,
    FeatureKey,
    ImageFiles,
    collate_images,
    is_file_backed,
)
from batchcap.training.steps import Split, training_autocast

Log = Callable[[str], None]


def encode_captions(
    records: list[CaptionRecord], keep: dict[str, int], vocab: Vocabulary, max_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token matrix ``(C, max_len + 2)`` and caption->image index for records whose image is in ``keep``."""
    rows, owners = [], []
    for record in records:
        if record.image_id not in keep:
            continue
        for text in record.captions:
            words = normalize_caption(text)[:max_len]
            if not words:
                continue
            ids = [vocab.start_id] + vocab.encode(words) + [vocab.end_id]
            rows.append(ids + [vocab.pad_id] * (max_len + 2 - len(ids)))
            owners.append(keep[record.image_id])
    return torch.tensor(rows, dtype=torch.long), torch.tensor(owners, dtype=torch.long)


def build_split(
    records: list[CaptionRecord], cache: FeatureCache | None, vocab: Vocabulary, max_len: int, limit: int | None = None
) -> Split:
    """Load cached features for ``records`` (those that have them) and tokenise their captions.

    Without a cache (encoder fine-tuning) every record is kept and ``features`` is empty:
    they are computed from the pictures at each step.
    """
    if cache is None:
        usable = list(records)
    else:
        cached = cache.cached_ids()
        usable = [r for r in records if r.image_id in cached]
    if limit is not None:
        usable = usable[:limit]
    if cache is None:
        ids, features = [r.image_id for r in usable], torch.empty(0)
    else:
        ids, features = cache.load([r.image_id for r in usable])
    keep = {image_id: n for n, image_id in enumerate(ids)}
    captions, owners = encode_captions(usable, keep, vocab, max_len)
    return Split(ids, features, usable, captions, owners, {r.image_id: list(r.captions) for r in usable})


# -- the loop --------------------------------------------------------------------------
@dataclass(frozen=True)
class EncoderChoice:
    """The encoder the features come from: config, weights, and what the model file records."""

    config: EncoderConfig
    source: WeightsSource
    preprocess: Preprocess
    spec: EncoderSpec


def describe_encoder(cfg: EncoderConfig, preprocess: Preprocess) -> EncoderChoice:
    """Resolve the encoder's weights identity (sha256 of the file, or timm's tag) for the model file."""
    if cfg.weights:
        digest = file_sha256(cfg.weights)
        source = WeightsSource("file", path=cfg.weights)
        spec = EncoderSpec(
            name=cfg.name, weights_sha256=digest, weights_file=Path(cfg.weights).name, spatial=cfg.spatial
        )
    else:
        source = WeightsSource("pretrained")
        spec = EncoderSpec(name=cfg.name, pretrained_tag=cfg.name, spatial=cfg.spatial)
    return EncoderChoice(cfg, source, preprocess, spec)


def extract_features(
    dataset: CaptionDataset,
    splits: list[str],
    choice: EncoderChoice,
    runtime: RuntimeConfig,
    cache_dir: str,
    views: tuple[str, ...],
    log: Log,
    layer: str = "",
) -> tuple[dict[str, FeatureCache], dict]:
    """Fill the feature caches (one per view) for ``splits``; returns caches and failures per id.

    ``layer`` ``"block11"`` caches the trunk's activations instead of the encoder's output
    (:mod:`batchcap.encode.exit_flow`).
    """
    weights_id = choice.spec.weights_sha256 or f"pretrained:{choice.spec.pretrained_tag}"
    encoder: Encoder | None = None
    caches: dict[str, FeatureCache] = {}
    failures: dict[str, str] = {}
    items = [(r.image_id, r) for s in splits for r in dataset.splits.get(s, [])]
    for view in views:
        key = FeatureKey(
            choice.config.name, weights_id, choice.preprocess, choice.config.spatial, runtime.precision, view, layer
        )
        cache = FeatureCache(cache_dir, key)
        caches[view] = cache
        todo = [(i, r) for i, r in items if i not in cache.cached_ids()]
        if not todo:
            log(f"features ({view}{', ' + layer if layer else ''}): all {len(items)} cached in {cache.dir}")
            continue
        if encoder is None:
            backbone = build_backbone(choice.config, choice.source)
            encoder = Encoder(
                XceptionTrunk(backbone) if layer == TRUNK_LAYER else backbone,
                choice.preprocess,
                runtime,
                spatial=choice.config.spatial,
            )
        what = f"{view}, {layer} activations" if layer else view
        log(f"features ({what}): computing {len(todo)} of {len(items)} into {cache.dir}")
        started = time.time()
        encode: Callable[[torch.Tensor], torch.Tensor] = encoder
        if torch.device(runtime.device).type == "cuda":
            encode = partial(encode_fixed_size, encoder, batch_size=runtime.batch_size)
        failed = cache.extract(todo, encode, runtime, on_progress=every_so_often(log, started))
        failures.update(failed)
        log(f"features ({what}): done in {time.time() - started:.0f} s, {len(failed)} unreadable")
    return caches, failures


def cached_splits(
    dataset: CaptionDataset,
    choice: EncoderChoice,
    runtime: RuntimeConfig,
    cfg: TrainConfig,
    vocab: Vocabulary,
    log: Log,
    layer: str = "",
    *,
    val_limit: int | None,
) -> tuple[Split, list[torch.Tensor], Split, dict]:
    """Train and val splits from the feature caches (of ``layer``, see :func:`extract_features`).

    Returns the train split, its views (plain, and hflip with ``--augment``), the val split
    (its first ``val_limit`` images, or all) and the pictures that could not be read.
    """
    views = ("plain", "hflip") if cfg.augment else ("plain",)
    cache_dir = cfg.cache_dir or str(Path(cfg.out).parent / ".batchcap-features")
    caches, failures = extract_features(dataset, ["train", "val"], choice, runtime, cache_dir, views, log, layer=layer)
    train_records, val_records = dataset.splits.get("train", []), dataset.splits.get("val", [])
    train_split = build_split(train_records, caches["plain"], vocab, cfg.max_caption_len)
    train_views = [train_split.features] + [
        build_split(train_records, caches[v], vocab, cfg.max_caption_len).features for v in views[1:]
    ]
    val_split = build_split(val_records, caches["plain"], vocab, cfg.max_caption_len, limit=val_limit)
    return train_split, train_views, val_split, failures


def describe_residence(views: list[torch.Tensor]) -> str:
    """How much of the training features is in memory and how much is read from a mapped file."""
    mapped = sum(v.nbytes for v in views if is_file_backed(v)) / 2**30
    held = sum(v.nbytes for v in views if not is_file_backed(v)) / 2**30
    parts = [f"{held:.1f} GiB in memory"] if held or not mapped else []
    if mapped:
        parts.append(
            f"{mapped:.1f} GiB memory-mapped from a file beside the cache (more than "
            f"{FEATURE_MEMORY_ENV} or half the available memory)"
        )
    return ", ".join(parts)


def fits_on_device(nbytes: int, device: str, share: float = 0.5) -> bool:
    """Whether ``nbytes`` take at most ``share`` of the CUDA device's free memory (False on CPU).

    Half the free memory leaves the rest to the decoder, its activations and AdamW.
    """
    if torch.device(device).type != "cuda":
        return False
    free, _total = torch.cuda.mem_get_info(torch.device(device))
    return nbytes <= share * free


class CachedFeatures:
    """Step features from the feature cache: one fp16 tensor per view (plain, and hflip with --augment).

    With ``on_device`` the views are copied to the device once (Flickr8k's are about
    2.5 GB each) and a step gathers its rows there; otherwise each step's rows are copied.
    """

    trainable: torch.nn.Module | None = None

    def __init__(self, views: list[torch.Tensor], device: str, on_device: bool = False) -> None:
        self.views = [view.to(device) for view in views] if on_device else views
        self.device = device
        self.on_device = on_device

    def epoch(self, batches: list[list[int]], generator: torch.Generator) -> Iterator[tuple[list[int], torch.Tensor]]:
        """``(images, features (M, R, F) fp32 on the device)`` per step; each step draws one view at random."""
        for images in batches:
            view = self.views[int(torch.randint(len(self.views), (1,), generator=generator))]
            rows = torch.tensor(images, dtype=torch.long)
            if self.on_device:
                yield images, view[rows.to(self.device, non_blocking=True)].float()
            else:  # copy fp16 (half the bytes), widen on the device
                yield images, view[rows].to(self.device, non_blocking=True).float()

    def val_features(self, split: Split) -> torch.Tensor:
        return split.features


class CachedTrunk:
    """Step features from cached trunk activations through the exit flow being trained.

    Each step runs only Xception's exit flow (forward and backward) on the step's cached
    block-11 activations, about a ninth of the network's work (:mod:`batchcap.encode.exit_flow`).
    The exit flow stays in eval mode (frozen batch-norm statistics); its weights train at
    ``encoder_lr``. Validation features are the exit flow's output as trained so far.
    """

    def __init__(
        self, views: list[torch.Tensor], head: XceptionExitFlow, runtime: RuntimeConfig, val_trunk: torch.Tensor
    ) -> None:
        self.views, self.runtime, self.val_trunk = views, runtime, val_trunk
        self.trainable = head.to(runtime.device).eval()
        if runtime.channels_last:
            self.trainable.to(memory_format=torch.channels_last)

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        """Trunk rows ``(M, 361, 728)`` fp16 to exit-flow features ``(M, 100, 2048)`` fp32, under autocast."""
        x = trunk_to_map(rows.to(self.runtime.device, non_blocking=True).float())
        if self.runtime.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with training_autocast(self.runtime):
            fmap = self.trainable(x)
        return fmap.float().flatten(2).transpose(1, 2)

    def epoch(self, batches: list[list[int]], generator: torch.Generator) -> Iterator[tuple[list[int], torch.Tensor]]:
        for images in batches:
            view = self.views[int(torch.randint(len(self.views), (1,), generator=generator))]
            yield images, self.forward(view[torch.tensor(images, dtype=torch.long)])

    def val_features(self, split: Split, batch_size: int = 50) -> torch.Tensor:
        with torch.inference_mode():
            return torch.cat(
                [
                    self.forward(self.val_trunk[s : s + batch_size]).half()
                    for s in range(0, self.val_trunk.shape[0], batch_size)
                ]
            )


class FinetunedEncoder:
    """Step features computed by the encoder being trained, from pictures decoded in workers.

    The encoder's batch-norm statistics stay frozen (eval mode: batches of a few dozen
    pictures would only add noise to ImageNet's); its weights train at ``encoder_lr``.
    Pictures that cannot be read are left out of the step, with their captions.
    """

    def __init__(
        self,
        backbone: torch.nn.Module,
        preprocess: Preprocess,
        records: list[CaptionRecord],
        runtime: RuntimeConfig,
        augment: bool,
    ) -> None:
        self.trainable: Any = backbone.to(runtime.device).eval()  # a timm network: forward_features is timm's
        self.preprocess, self.records, self.runtime, self.augment = preprocess, records, runtime, augment
        self.mean = torch.tensor(preprocess.mean, device=runtime.device).view(1, 3, 1, 1) * 255.0
        self.std = torch.tensor(preprocess.std, device=runtime.device).view(1, 3, 1, 1) * 255.0
        self.index = {r.image_id: n for n, r in enumerate(records)}

    def _forward(self, images: torch.Tensor) -> torch.Tensor:
        """Features under :func:`training_autocast`, the same in training steps and in validation."""
        x = (images.to(self.runtime.device, non_blocking=True).float() - self.mean) / self.std  # (B, 3, H, W)
        with training_autocast(self.runtime):
            fmap = self.trainable.forward_features(x)  # (B, F, h, w)
        return fmap.float().flatten(2).transpose(1, 2)  # (B, h*w, F)

    def _loader(self, records: list[CaptionRecord], batches: list[list[int]], flip: bool) -> Any:
        dataset = ImageFiles([(r.image_id, r) for r in records], self.preprocess, hflip=False, random_flip=flip)
        return torch.utils.data.DataLoader(
            dataset,
            batch_sampler=batches,
            num_workers=self.runtime.workers,
            collate_fn=collate_images,
            pin_memory=torch.device(self.runtime.device).type == "cuda",
        )

    def epoch(self, batches: list[list[int]], generator: torch.Generator) -> Iterator[tuple[list[int], torch.Tensor]]:
        for ids, images, _failed in self._loader(self.records, batches, self.augment):
            if images is not None:
                yield [self.index[i] for i in ids], self._forward(images)

    def val_features(self, split: Split) -> torch.Tensor:
        """Features of the validation pictures under the encoder as trained so far, on the device."""
        index = {i: n for n, i in enumerate(split.image_ids)}
        batches = [
            list(range(s, min(s + self.runtime.batch_size, len(split.records))))
            for s in range(0, len(split.records), self.runtime.batch_size)
        ]
        out = torch.zeros(0, device=self.runtime.device)
        rows: list[torch.Tensor] = []
        order: list[int] = []
        with torch.inference_mode():
            for ids, images, _failed in self._loader(split.records, batches, flip=False):
                if images is not None:
                    rows.append(self._forward(images))
                    order.extend(index[i] for i in ids)
        if rows:
            out = torch.zeros(len(split.image_ids), *rows[0].shape[1:], device=self.runtime.device)
            out[torch.tensor(order, device=self.runtime.device)] = torch.cat(rows)
        return out


def every_so_often(log: Log, started: float, seconds: float = 30.0) -> Callable[[int, int], None]:
    last = [started]

    def report(done: int, total: int) -> None:
        now = time.time()
        if now - last[0] >= seconds or done == total:
            last[0] = now
            log(f"  {done}/{total} images, {done / max(1e-9, now - started):.1f} img/s")

    return report
