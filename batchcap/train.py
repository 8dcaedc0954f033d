"""Training the caption decoder: cached encoder features, teacher forcing, selection by CIDEr.

The flow is ``dataset -> vocabulary -> feature cache -> epochs -> best model file``:

* captions are normalised with :func:`batchcap.text.normalize_caption` (the same function
  evaluation and captioning use) and the vocabulary is built from the train split;
* encoder features come from :class:`batchcap.features.FeatureCache`, computed once per
  (encoder, weights, preprocessing) and reused across epochs and runs;
* a step holds ``batch_size`` images with five of their reference captions each (all
  of Flickr8k's), so each image's features are projected once per step;
* the decoder (and a fine-tuned encoder) runs under bf16 autocast when the precision is
  bf16 (fp32 master weights), in training and validation alike; on Ampere and later GPUs
  the remaining fp32 matmuls use TF32;
* on a GPU the feature cache is copied to the device once when it fits, and a step reads
  nothing back to the host (the loss is summed on the device and read when logged);
* AdamW, gradient clipping, linear warm-up then cosine decay, dropout, Show-Attend-Tell's
  doubly stochastic attention penalty, fixed seeds;
* after every epoch the model captions the validation images with beam search and the
  epoch with the best CIDEr-D is kept (BLEU-4 is logged too); a checkpoint is written
  atomically each epoch (safetensors, no pickle) so ``--resume`` continues after a kill;
* ``--init-model`` starts from a trained model file (its decoder, vocabulary and encoder),
  and ``--self-critical`` then fine-tunes it on the CIDEr-D of its own sampled captions
  (:mod:`batchcap.scst`) instead of on the reference words.
"""
from __future__ import annotations

import json
import math
import random
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file

from batchcap import __version__
from batchcap.beam import beam_search
from batchcap.captioner import encode_fixed_size
from batchcap.config import BeamConfig, DecoderConfig, EncoderConfig, Preprocess, RuntimeConfig, TrainConfig, to_dict
from batchcap.datasets import CaptionDataset, CaptionRecord
from batchcap.decoder import CaptionDecoder
from batchcap.encoder import Encoder, WeightsSource, build_backbone, cuda_is_ampere_or_newer
from batchcap.exit_flow import (EXIT_FLOW, TRUNK_LAYER, ExitFlowError, XceptionExitFlow, XceptionTrunk,
                                apply_exit_flow, check_supported, exit_flow_state, trunk_to_map)
from batchcap.features import (FEATURE_MEMORY_ENV, FeatureCache, FeatureKey, ImageFiles, collate_images,
                               feature_memory_budget, is_file_backed)
from batchcap.metrics import score_captions
from batchcap.modelfile import (CaptionModel, EncoderSpec, atomic_save_safetensors, file_sha256, load_model,
                                save_model)
from batchcap.scst import CaptionReward, sample_captions, self_critical_loss
from batchcap.text import Vocabulary, normalize_caption

Log = Callable[[str], None]


class TrainingError(Exception):
    """A training request that cannot work as given (no data in a split, a start model that does not fit)."""


@dataclass
class Split:
    """One split in memory: features per image, and every caption as padded token ids."""

    image_ids: list[str]
    features: torch.Tensor  # fp16 (M, R, F); empty when fine-tuning the encoder
    records: list[CaptionRecord]
    captions: torch.Tensor  # long (C, T) = <start> w.. <end> <pad>..
    caption_image: torch.Tensor  # long (C,) index into image_ids
    references: dict[str, list[str]]  # raw reference captions, for scoring


def encode_captions(records: list[CaptionRecord], keep: dict[str, int], vocab: Vocabulary, max_len: int
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


def build_split(records: list[CaptionRecord], cache: FeatureCache | None, vocab: Vocabulary, max_len: int,
                limit: int | None = None) -> Split:
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


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warm-up to 1, then cosine decay to 0.1 at ``total`` steps."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def caption_features(decoder: CaptionDecoder, features: torch.Tensor, vocab: Vocabulary, beam: BeamConfig,
                     batch_size: int = 100, unendable_ids: Sequence[int] = ()) -> list[str]:
    """Beam-search captions for features (on any device), in order: validation and dev sweeps.

    The features move to the decoder's device chunk by chunk, so a CPU feature cache
    validates a CUDA decoder without holding the whole split on the GPU. ``unendable_ids``
    is the model's ending rule (training validates without one).
    """
    decoder.eval()
    device = next(decoder.parameters()).device
    out: list[str] = []
    with torch.inference_mode():
        for start in range(0, features.shape[0], batch_size):
            chunk = features[start:start + batch_size].to(device, non_blocking=True)
            state = decoder.init_state(chunk.float())
            result = beam_search(decoder.step, state, beam, start_id=vocab.start_id, end_id=vocab.end_id,
                                 pad_id=vocab.pad_id, banned_ids=vocab.never_generated,
                                 unendable_ids=unendable_ids, per_image=decoder.per_image_state)
            out.extend(vocab.decode(row[0]) for row in result.tokens.cpu().tolist())
    return out


def validate(decoder: CaptionDecoder, split: Split, features: torch.Tensor, vocab: Vocabulary,
             beam: BeamConfig) -> dict[str, Any]:
    """BLEU and CIDEr-D of beam-search captions on ``split`` (batchcap tokenisation: fast, no Java)."""
    captions = caption_features(decoder, features, vocab, beam)
    predictions = dict(zip(split.image_ids, captions))
    scores = score_captions(predictions, split.references, full=False)
    scores["examples"] = [[i, predictions[i]] for i in split.image_ids[:3]]
    return scores


# -- checkpoints (safetensors + JSON; never pickle) ----------------------------------------
def save_checkpoint(path: Path, decoder: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    state: dict[str, Any]) -> None:
    """Trained weights (decoder, and encoder when fine-tuned), AdamW moments and the loop state, atomically."""
    tensors = {f"model.{k}": v for k, v in decoder.state_dict().items()}
    names = {id(p): n for n, p in decoder.named_parameters()}
    steps = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            s = optimizer.state.get(p)
            if not s:
                continue
            name = names[id(p)]
            tensors[f"adam.exp_avg.{name}"] = s["exp_avg"]
            tensors[f"adam.exp_avg_sq.{name}"] = s["exp_avg_sq"]
            steps[name] = float(s["step"])
    meta = {"state": json.dumps(state), "adam_steps": json.dumps(steps)}
    atomic_save_safetensors(tensors, path, meta)


def read_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors (on the CPU) and metadata :func:`save_checkpoint` wrote."""
    tensors = load_file(str(path))
    with safe_open(str(path), "pt") as fh:
        return tensors, fh.metadata()


def restore_checkpoint(tensors: dict[str, torch.Tensor], meta: dict[str, str], decoder: torch.nn.Module,
                       optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Put a checkpoint's weights and AdamW moments back; returns the loop state.

    The moments go through ``optimizer.load_state_dict``, which moves each to its
    parameter's device and dtype (a CUDA run resumes with CUDA moments) and keeps
    ``step`` where AdamW wants it.
    """
    decoder.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    steps = json.loads(meta["adam_steps"])
    names = {id(p): n for n, p in decoder.named_parameters()}
    moments: dict[int, dict[str, torch.Tensor]] = {}
    index = 0  # optimizer.state_dict() numbers the parameters group by group, in order
    for group in optimizer.param_groups:
        for p in group["params"]:
            name = names[id(p)]
            if name in steps:
                moments[index] = {"step": torch.tensor(steps[name], dtype=torch.float32),
                                  "exp_avg": tensors[f"adam.exp_avg.{name}"],
                                  "exp_avg_sq": tensors[f"adam.exp_avg_sq.{name}"]}
            index += 1
    optimizer.load_state_dict({"state": moments, "param_groups": optimizer.state_dict()["param_groups"]})
    return json.loads(meta["state"])


def load_checkpoint(path: Path, decoder: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Restore what :func:`save_checkpoint` wrote; returns the loop state."""
    return restore_checkpoint(*read_checkpoint(path), decoder, optimizer)


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
        spec = EncoderSpec(name=cfg.name, weights_sha256=digest, weights_file=Path(cfg.weights).name,
                           spatial=cfg.spatial)
    else:
        source = WeightsSource("pretrained")
        spec = EncoderSpec(name=cfg.name, pretrained_tag=cfg.name, spatial=cfg.spatial)
    return EncoderChoice(cfg, source, preprocess, spec)


def extract_features(dataset: CaptionDataset, splits: list[str], choice: EncoderChoice, runtime: RuntimeConfig,
                     cache_dir: str, views: tuple[str, ...], log: Log, layer: str = ""
                     ) -> tuple[dict[str, FeatureCache], dict]:
    """Fill the feature caches (one per view) for ``splits``; returns caches and failures per id.

    ``layer`` ``"block11"`` caches the trunk's activations instead of the encoder's output
    (:mod:`batchcap.exit_flow`).
    """
    weights_id = choice.spec.weights_sha256 or f"pretrained:{choice.spec.pretrained_tag}"
    encoder: Encoder | None = None
    caches: dict[str, FeatureCache] = {}
    failures: dict[str, str] = {}
    items = [(r.image_id, r) for s in splits for r in dataset.splits.get(s, [])]
    for view in views:
        key = FeatureKey(choice.config.name, weights_id, choice.preprocess, choice.config.spatial,
                         runtime.precision, view, layer)
        cache = FeatureCache(cache_dir, key)
        caches[view] = cache
        todo = [(i, r) for i, r in items if i not in cache.cached_ids()]
        if not todo:
            log(f"features ({view}{', ' + layer if layer else ''}): all {len(items)} cached in {cache.dir}")
            continue
        if encoder is None:
            backbone = build_backbone(choice.config, choice.source)
            encoder = Encoder(XceptionTrunk(backbone) if layer == TRUNK_LAYER else backbone, choice.preprocess,
                              runtime, spatial=choice.config.spatial)
        what = f"{view}, {layer} activations" if layer else view
        log(f"features ({what}): computing {len(todo)} of {len(items)} into {cache.dir}")
        started = time.time()
        encode: Callable[[torch.Tensor], torch.Tensor] = encoder
        if torch.device(runtime.device).type == "cuda":
            encode = partial(encode_fixed_size, encoder, batch_size=runtime.batch_size)
        failed = cache.extract(todo, encode, runtime, on_progress=_every(log, started))
        failures.update(failed)
        log(f"features ({what}): done in {time.time() - started:.0f} s, {len(failed)} unreadable")
    return caches, failures


def cached_splits(dataset: CaptionDataset, choice: EncoderChoice, runtime: RuntimeConfig, cfg: TrainConfig,
                  vocab: Vocabulary, log: Log, layer: str = "") -> tuple[Split, list[torch.Tensor], Split, dict]:
    """Train and val splits from the feature caches (of ``layer``, see :func:`extract_features`).

    Returns the train split, its views (plain, and hflip with ``--augment``), the val split
    (``--val-images`` of it) and the pictures that could not be read.
    """
    views = ("plain", "hflip") if cfg.augment else ("plain",)
    cache_dir = cfg.cache_dir or str(Path(cfg.out).parent / ".batchcap-features")
    caches, failures = extract_features(dataset, ["train", "val"], choice, runtime, cache_dir, views, log,
                                        layer=layer)
    train_records, val_records = dataset.splits.get("train", []), dataset.splits.get("val", [])
    train_split = build_split(train_records, caches["plain"], vocab, cfg.max_caption_len)
    train_views = [train_split.features] + [
        build_split(train_records, caches[v], vocab, cfg.max_caption_len).features for v in views[1:]]
    val_split = build_split(val_records, caches["plain"], vocab, cfg.max_caption_len, limit=cfg.val_images)
    return train_split, train_views, val_split, failures


def training_autocast(runtime: RuntimeConfig) -> torch.autocast:
    """bf16 autocast when the precision is bf16, else off: what training and its validation share.

    fp16 is not used for training (it would need loss scaling): ``--precision fp16``
    trains in fp32.
    """
    return torch.autocast(torch.device(runtime.device).type, dtype=torch.bfloat16,
                          enabled=runtime.precision == "bf16")


def describe_residence(views: list[torch.Tensor]) -> str:
    """How much of the training features is in memory and how much is read from a mapped file."""
    mapped = sum(v.nbytes for v in views if is_file_backed(v)) / 2**30
    held = sum(v.nbytes for v in views if not is_file_backed(v)) / 2**30
    parts = [f"{held:.1f} GiB in memory"] if held or not mapped else []
    if mapped:
        parts.append(f"{mapped:.1f} GiB memory-mapped from a file beside the cache (more than "
                     f"{FEATURE_MEMORY_ENV} or half the available memory)")
    return ", ".join(parts)


def fits_on_device(nbytes: int, device: str, share: float = 0.5) -> bool:
    """Whether ``nbytes`` take at most ``share`` of the CUDA device's free memory (False on CPU).

    Half the free memory leaves the rest to the decoder, its activations and AdamW.
    """
    if torch.device(device).type != "cuda":
        return False
    free, _total = torch.cuda.mem_get_info(torch.device(device))
    return nbytes <= share * free


def use_tf32(device: str) -> bool:
    """Let fp32 matmuls use TF32 tensor cores on Ampere and later GPUs (for this process).

    Training's fp32 work (the master weights' optimizer maths, fp32 runs) speeds up by
    several times at a 10-bit mantissa, plenty for SGD. Returns whether it was enabled.
    """
    if torch.device(device).type != "cuda" or not cuda_is_ampere_or_newer(torch.device(device)):
        return False
    torch.set_float32_matmul_precision("high")  # TF32; cuDNN convolutions use TF32 by default
    return True


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

    def epoch(self, batches: list[list[int]], generator: torch.Generator
              ) -> Iterator[tuple[list[int], torch.Tensor]]:
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
    block-11 activations, about a ninth of the network's work (:mod:`batchcap.exit_flow`).
    The exit flow stays in eval mode (frozen batch-norm statistics); its weights train at
    ``encoder_lr``. Validation features are the exit flow's output as trained so far.
    """

    def __init__(self, views: list[torch.Tensor], head: XceptionExitFlow, runtime: RuntimeConfig,
                 val_trunk: torch.Tensor) -> None:
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

    def epoch(self, batches: list[list[int]], generator: torch.Generator
              ) -> Iterator[tuple[list[int], torch.Tensor]]:
        for images in batches:
            view = self.views[int(torch.randint(len(self.views), (1,), generator=generator))]
            yield images, self.forward(view[torch.tensor(images, dtype=torch.long)])

    def val_features(self, split: Split, batch_size: int = 50) -> torch.Tensor:
        with torch.inference_mode():
            return torch.cat([self.forward(self.val_trunk[s:s + batch_size]).half()
                              for s in range(0, self.val_trunk.shape[0], batch_size)])


class FinetunedEncoder:
    """Step features computed by the encoder being trained, from pictures decoded in workers.

    The encoder's batch-norm statistics stay frozen (eval mode: batches of a few dozen
    pictures would only add noise to ImageNet's); its weights train at ``encoder_lr``.
    Pictures that cannot be read are left out of the step, with their captions.
    """

    def __init__(self, backbone: torch.nn.Module, preprocess: Preprocess, records: list[CaptionRecord],
                 runtime: RuntimeConfig, augment: bool) -> None:
        self.trainable = backbone.to(runtime.device).eval()
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
        dataset = ImageFiles([(r.image_id, r) for r in records], self.preprocess, hflip=False,
                              random_flip=flip)
        return torch.utils.data.DataLoader(dataset, batch_sampler=batches, num_workers=self.runtime.workers,
                                           collate_fn=collate_images,
                                           pin_memory=torch.device(self.runtime.device).type == "cuda")

    def epoch(self, batches: list[list[int]], generator: torch.Generator
              ) -> Iterator[tuple[list[int], torch.Tensor]]:
        for ids, images, _failed in self._loader(self.records, batches, self.augment):
            if images is not None:
                yield [self.index[i] for i in ids], self._forward(images)

    def val_features(self, split: Split) -> torch.Tensor:
        """Features of the validation pictures under the encoder as trained so far, on the device."""
        index = {i: n for n, i in enumerate(split.image_ids)}
        batches = [list(range(s, min(s + self.runtime.batch_size, len(split.records))))
                   for s in range(0, len(split.records), self.runtime.batch_size)]
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


def _every(log: Log, started: float, seconds: float = 30.0) -> Callable[[int, int], None]:
    last = [started]

    def report(done: int, total: int) -> None:
        now = time.time()
        if now - last[0] >= seconds or done == total:
            last[0] = now
            log(f"  {done}/{total} images, {done / max(1e-9, now - started):.1f} img/s")
    return report


def train(cfg: TrainConfig, dataset: CaptionDataset, choice: EncoderChoice, decoder_cfg: dict[str, Any],
          runtime: RuntimeConfig, log: Log = print) -> CaptionModel:
    """Train a decoder on ``dataset``'s train split, select on its val split, save ``cfg.out``."""
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    out = Path(cfg.out)
    train_records = dataset.splits.get("train", [])
    val_records = dataset.splits.get("val", [])
    if not train_records:
        raise TrainingError("the dataset has no training images")
    try:
        feature_memory_budget()  # a bad BATCHCAP_FEATURE_MEMORY_GIB is refused before minutes of extraction
    except ValueError as exc:
        raise TrainingError(str(exc)) from exc
    if cfg.finetune_encoder and cfg.finetune_exit_flow:
        raise TrainingError("--finetune-encoder already trains the exit flow: give one of --finetune-encoder "
                            "and --finetune-exit-flow")
    if cfg.pretrain_captions and cfg.init_model:
        raise TrainingError("--pretrain-captions pretrains a fresh decoder; --init-model already gives one: "
                            "leave one of them out")
    start_model = load_start_model(cfg, choice)
    if start_model is not None:
        vocab = start_model.vocab
        log(f"starting from {cfg.init_model}: its decoder and vocabulary ({len(vocab)} words)")
    else:
        vocab = Vocabulary.build((normalize_caption(c) for r in train_records for c in r.captions),
                                 min_count=cfg.min_word_count)
        log(f"vocabulary: {len(vocab)} words (min count {cfg.min_word_count})")
    failures: dict[str, str] = {}
    if cfg.finetune_encoder:
        train_split = build_split(train_records, None, vocab, cfg.max_caption_len)
        val_split = build_split(val_records, None, vocab, cfg.max_caption_len, limit=cfg.val_images)
        backbone = build_backbone(choice.config, choice.source)
        source: CachedFeatures | FinetunedEncoder | CachedTrunk = FinetunedEncoder(
            backbone, choice.preprocess, train_split.records, runtime, cfg.augment)
        feature_dim = int(backbone.num_features)
    elif cfg.finetune_exit_flow:
        try:
            check_supported(choice.config.name, choice.config.spatial)
        except ExitFlowError as exc:
            raise TrainingError(str(exc)) from exc
        train_split, train_views, val_split, failures = cached_splits(dataset, choice, runtime, cfg, vocab, log,
                                                                      layer=TRUNK_LAYER)
        backbone = build_backbone(choice.config, choice.source)
        if start_model is not None and start_model.encoder.finetuned == EXIT_FLOW:
            apply_exit_flow(backbone, start_model.encoder_state or {}, str(cfg.init_model))
            log(f"exit flow: continuing from {cfg.init_model}'s fine-tuned one")
        source = CachedTrunk(train_views, XceptionExitFlow(backbone), runtime, val_split.features)
        log(f"trunk activations: {describe_residence(train_views)}; each step "
            f"trains the exit flow at lr {cfg.encoder_lr:g}")
        feature_dim = int(backbone.num_features)
    else:
        train_split, train_views, val_split, failures = cached_splits(dataset, choice, runtime, cfg, vocab, log)
        on_device = fits_on_device(sum(v.nbytes for v in train_views), runtime.device)
        source = CachedFeatures(train_views, runtime.device, on_device)
        if on_device:
            log(f"features: kept on {runtime.device} ({sum(v.nbytes for v in train_views) / 2**30:.1f} GiB)")
        else:
            log(f"features: {describe_residence(train_views)}")
        feature_dim = int(train_split.features.shape[-1])
    if not val_split.image_ids:
        raise TrainingError("the dataset has no usable validation images: model selection needs a val split")
    from batchcap.calibrate import ending_and_familiarity  # ending rule + familiarity, for trusting captions

    # Trunk activations are not the model's features: an exit-flow model gets familiarity from calibrate.
    trust = ending_and_familiarity(train_split.records, train_split.image_ids,
                                   torch.empty(0) if cfg.finetune_exit_flow else train_split.features,
                                   runtime.precision)
    log(f"train: {len(train_split.image_ids)} images, {train_split.captions.shape[0]} captions; "
        f"val: {len(val_split.image_ids)} images")

    dcfg = DecoderConfig(vocab_size=len(vocab), feature_dim=feature_dim, **decoder_cfg)
    if start_model is not None:
        dcfg = start_model.decoder
        if dcfg.feature_dim != feature_dim:
            raise TrainingError(f"{cfg.init_model} expects {dcfg.feature_dim}-dim features; the encoder gives "
                                f"{feature_dim}")
    # Seeded again here: building an encoder to fill a missing feature cache draws from the global
    # generator, and the same --seed must give the same model whether the cache was there or not.
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    decoder = (CaptionDecoder(dcfg) if start_model is None else start_model.build_decoder()).to(runtime.device)
    groups = [{"params": list(decoder.parameters()), "lr": cfg.lr, "base_lr": cfg.lr}]
    trained = torch.nn.ModuleDict({"decoder": decoder})
    if source.trainable is not None:
        groups.append({"params": list(source.trainable.parameters()), "lr": cfg.encoder_lr,
                       "base_lr": cfg.encoder_lr})
        trained["encoder"] = source.trainable
    optimizer = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)
    steps_per_epoch = math.ceil(len(train_split.image_ids) / cfg.batch_size)
    total_steps = steps_per_epoch * cfg.epochs
    checkpoint = out.with_name(out.name + ".ckpt")
    log_path = out.with_name(out.name + ".log.jsonl")
    loop = {"epoch": 0, "step": 0, "best": None, "best_epoch": None, "bad_epochs": 0, "history": []}
    if cfg.resume and checkpoint.exists():
        loop = load_checkpoint(checkpoint, trained, optimizer)
        log(f"resumed from {checkpoint} after epoch {loop['epoch']}")
    elif cfg.pretrain_captions:  # before the first epoch only: a checkpoint holds the pretrained decoder
        from batchcap.pretrain import PretrainError, pretrain_for_training  # it builds on this module

        try:
            loop["pretrain"] = pretrain_for_training(cfg, decoder, dataset, vocab, runtime, log)
        except PretrainError as exc:
            raise TrainingError(f"--pretrain-captions: {exc}") from exc
    val_beam = BeamConfig(beam_size=cfg.val_beam_size, max_len=cfg.max_caption_len)
    best_model: CaptionModel | None = None
    rewarder = None
    if cfg.self_critical:
        rewarder = CaptionReward([[normalize_caption(c) for c in train_split.references[i]]
                                  for i in train_split.image_ids], vocab)
    stepper = TrainStep(decoder, trained, optimizer, cfg, runtime, vocab, train_split, total_steps, rewarder)
    if use_tf32(runtime.device):
        log("fp32 matmuls use TF32 (Ampere or later GPU)")

    for epoch in range(loop["epoch"] + 1, cfg.epochs + 1):
        # Self-critical samples come from the policy that captions at run time (no dropout):
        # measured on Flickr8k dev, it learns faster than sampling through dropout.
        decoder.train(rewarder is None)
        generator = torch.Generator().manual_seed(cfg.seed + epoch)
        order = torch.randperm(len(train_split.image_ids), generator=generator).tolist()
        started = time.time()
        totals = StepTotals.zeros(runtime.device)
        batches = [[i for i in order[start:start + cfg.batch_size] if stepper.per_image[i]]
                   for start in range(0, len(order), cfg.batch_size)]
        for images, feats in source.epoch([b for b in batches if b], generator):
            totals.add(stepper(loop["step"], images, feats, generator), len(images))
            loop["step"] += 1
            if loop["step"] % 50 == 0:  # the only time a step's numbers come back to the host
                progress = (f"reward {totals.mean_reward(cfg.samples_per_image):.3f}" if rewarder
                            else f"loss {totals.mean_loss():.3f}")
                log(f"epoch {epoch} step {loop['step']}/{total_steps} {progress} "
                    f"({totals.images / (time.time() - started):.0f} img/s)")
        train_loss = totals.mean_loss()  # waits for the epoch's last steps, so the time below is theirs
        train_time = time.time() - started
        scores = validate(decoder, val_split, source.val_features(val_split), vocab, val_beam)
        record = {"epoch": epoch, "step": loop["step"], "train_loss": train_loss,
                  "train_seconds": round(train_time, 1), "val": scores, "time": time.time()}
        if rewarder is not None:
            record["train_reward"] = totals.mean_reward(cfg.samples_per_image)
        loop["history"].append({k: v for k, v in record.items() if k != "time"})
        with open(log_path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")
        log(f"epoch {epoch}: loss {record['train_loss']:.3f}, val BLEU-4 {scores['BLEU-4']:.3f}, "
            f"CIDEr {scores['CIDEr']:.3f}, e.g. {scores['examples'][0][1]!r}")
        improved = loop["best"] is None or scores["CIDEr"] > loop["best"]
        if improved:
            loop["best"], loop["best_epoch"], loop["bad_epochs"] = scores["CIDEr"], epoch, 0
            best_model = _model_file(cfg, choice, dcfg, vocab, decoder, dataset, failures, loop, scores,
                                     encoder=source.trainable, start_model=start_model)
            best_model.unendable_words, best_model.ending_rule, best_model.familiarity, best_model.neighbours = trust
            save_model(best_model, out, half=bool(cfg.extra.get("half", False)))
            log(f"saved {out} (best so far)")
        else:
            loop["bad_epochs"] += 1
        loop["epoch"] = epoch
        save_checkpoint(checkpoint, trained, optimizer, loop)
        if loop["bad_epochs"] >= cfg.patience:
            log(f"stopping: no CIDEr improvement for {cfg.patience} epochs")
            break
    if best_model is None:
        best_model = load_model(out)
    return best_model


@dataclass
class StepTotals:
    """Sums over an epoch's steps, kept on the device so that a step never waits for the GPU."""

    loss: torch.Tensor  # fp32 scalar: sum of loss x tokens
    tokens: torch.Tensor  # fp32 scalar
    reward: torch.Tensor  # fp32 scalar: sum of self-critical rewards
    images: int = 0

    @classmethod
    def zeros(cls, device: str) -> "StepTotals":
        return cls(*(torch.zeros((), device=device) for _ in range(3)))

    def add(self, step: "StepResult", images: int) -> None:
        self.loss += step.loss.detach().float() * step.tokens
        self.tokens += step.tokens
        self.reward += step.reward
        self.images += images

    def mean_loss(self) -> float:
        return float(self.loss / self.tokens.clamp(min=1))

    def mean_reward(self, samples_per_image: int) -> float:
        return float(self.reward) / max(1, self.images * samples_per_image)


@dataclass(frozen=True)
class StepResult:
    """One step's loss (per token), the number of tokens it averages over, and its reward sum."""

    loss: torch.Tensor
    tokens: torch.Tensor | int
    reward: torch.Tensor | float = 0.0


class TrainStep:
    """One optimisation step on a batch of images, with teacher forcing or self-critically.

    Nothing in a step reads a device tensor back: the captions are cut and their tokens
    counted on the CPU before they are copied, and the loss stays on the device.
    """

    def __init__(self, decoder: CaptionDecoder, trained: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 cfg: TrainConfig, runtime: RuntimeConfig, vocab: Vocabulary, split: Split, total_steps: int,
                 rewarder: CaptionReward | None = None) -> None:
        self.decoder, self.trained, self.optimizer = decoder, trained, optimizer
        self.cfg, self.runtime, self.vocab, self.split = cfg, runtime, vocab, split
        self.total_steps, self.rewarder = total_steps, rewarder
        self.per_image: list[list[int]] = [[] for _ in split.image_ids]
        for c, owner in enumerate(split.caption_image.tolist()):
            self.per_image[owner].append(c)
        self.per_step = int(cfg.extra.get("captions_per_image", 5))
        self.attention_penalty = float(cfg.extra.get("attention_penalty", 1.0))
        self.label_smoothing = float(cfg.extra.get("label_smoothing", 0.0))

    def __call__(self, step: int, images: list[int], feats: torch.Tensor, generator: torch.Generator
                 ) -> StepResult:
        """Train on ``images`` (indices into the split) with their features ``(M, R, F)`` on the device."""
        cfg, vocab = self.cfg, self.vocab
        for group in self.optimizer.param_groups:
            group["lr"] = group["base_lr"] * lr_factor(step, cfg.warmup_steps, self.total_steps)
        with training_autocast(self.runtime):
            if self.rewarder is not None:
                samples = sample_captions(self.decoder, feats, cfg.samples_per_image, cfg.max_caption_len,
                                          start_id=vocab.start_id, end_id=vocab.end_id,
                                          pad_id=vocab.pad_id, banned_ids=vocab.never_generated)
                rewards = self.rewarder(images, samples.tokens, cfg.samples_per_image)
                loss = self_critical_loss(samples, rewards, cfg.samples_per_image)
                result = StepResult(loss, samples.mask.sum(), rewards.sum())
            else:
                rows = [c for i in images for c in _pick(self.per_image[i], self.per_step, generator)]
                captions, tokens = reference_captions(self.split.captions[rows], vocab.pad_id)
                loss = teacher_forced_loss(self.decoder, feats, captions.to(feats.device, non_blocking=True),
                                            self.per_step, vocab.pad_id, self.attention_penalty,
                                            self.label_smoothing)
                result = StepResult(loss, tokens)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.trained.parameters(), cfg.grad_clip)
        self.optimizer.step()
        return result


def reference_captions(captions: torch.Tensor, pad_id: int) -> tuple[torch.Tensor, int]:
    """CPU captions ``(N, T)`` cut to the longest one, and the number of target tokens (after ``<start>``)."""
    lengths = (captions != pad_id).sum(1)  # (N,)
    return captions[:, :int(lengths.max())], int((lengths - 1).sum())


def teacher_forced_loss(decoder: CaptionDecoder, feats: torch.Tensor, caps: torch.Tensor, per_step: int,
                         pad_id: int, attention_penalty: float, label_smoothing: float) -> torch.Tensor:
    """Cross-entropy on the reference words (plus SAT's attention penalty) for captions cut to length."""
    logits, alphas = decoder(feats, caps, per_step)  # (N, T-1, V), (N, T-1, R)
    logits = logits.float()
    targets = caps[:, 1:]
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=pad_id,
                           label_smoothing=label_smoothing)
    if alphas is not None and attention_penalty > 0:
        mask = (targets != pad_id).float()[:, :, None]  # (N, T-1, 1)
        coverage = (alphas.float() * mask).sum(1)  # (N, R)
        loss = loss + attention_penalty * ((1.0 - coverage) ** 2).mean()
    return loss


def load_start_model(cfg: TrainConfig, choice: EncoderChoice) -> CaptionModel | None:
    """The model ``--init-model`` names, checked against the features training will use."""
    if cfg.init_model is None:
        if cfg.self_critical:
            raise TrainingError("--self-critical fine-tunes a trained model: pass it with --init-model MODEL "
                             "(train one with cross-entropy first)")
        return None
    if cfg.finetune_encoder:
        raise TrainingError("--init-model cannot be combined with --finetune-encoder")
    model = load_model(cfg.init_model)
    if model.encoder.finetuned == EXIT_FLOW and not cfg.finetune_exit_flow:
        raise TrainingError(f"{cfg.init_model} has a fine-tuned exit flow, which cached features cannot "
                            "reproduce: continue with --finetune-exit-flow (--encoder-lr sets how fast it "
                            "moves)")
    if model.extra_decoders:
        raise TrainingError(f"{cfg.init_model} is an ensemble of {len(model.decoders())} decoders; --init-model "
                            "needs a single decoder: fine-tune each member's own model file, then "
                            "`batchcap ensemble` them again")
    if model.encoder_state is not None and model.encoder.finetuned != EXIT_FLOW:
        raise TrainingError(f"{cfg.init_model} embeds a fine-tuned encoder; --init-model needs a model "
                            "trained on cached features of a stock encoder")
    weights_id = choice.spec.weights_sha256 or choice.spec.pretrained_tag
    theirs = model.encoder.weights_sha256 or model.encoder.pretrained_tag
    mismatches = [f"{what}: model {a!r}, now {b!r}" for what, a, b in (
        ("encoder", model.encoder.name, choice.config.name),
        ("encoder weights", theirs, weights_id),
        ("spatial features", model.encoder.spatial, choice.config.spatial),
        ("preprocessing", to_dict(model.preprocess), to_dict(choice.preprocess))) if a != b]
    if mismatches:
        raise TrainingError(f"{cfg.init_model} was trained on other features ({'; '.join(mismatches)}); use "
                            f"the encoder options it was trained with (see `batchcap info {cfg.init_model}`)")
    return model


def _pick(captions: list[int], count: int, generator: torch.Generator) -> list[int]:
    """Exactly ``count`` of an image's captions: a random subset, or all plus random repeats."""
    if len(captions) == count:
        return captions
    if len(captions) > count:
        picks = torch.randperm(len(captions), generator=generator)[:count].tolist()
        return [captions[i] for i in picks]
    extra = torch.randint(len(captions), (count - len(captions),), generator=generator).tolist()
    return captions + [captions[i] for i in extra]


def _model_file(cfg: TrainConfig, choice: EncoderChoice, dcfg: DecoderConfig, vocab: Vocabulary,
                decoder: CaptionDecoder, dataset: CaptionDataset, failures: dict[str, str], loop: dict[str, Any],
                scores: dict[str, Any], encoder: torch.nn.Module | None = None,
                start_model: CaptionModel | None = None) -> CaptionModel:
    """The model file's contents; a fine-tuned encoder is embedded (its weights are new).

    A model trained from ``--init-model`` keeps its start model's identity and training
    record under ``training.init_model``, so its whole history stays in one file.
    """
    state = {k: v.detach().cpu().clone() for k, v in decoder.state_dict().items()}
    spec = EncoderSpec(**{**to_dict(choice.spec), "feature_dim": dcfg.feature_dim})
    encoder_state = None
    if isinstance(encoder, XceptionExitFlow):  # only the exit flow is new: the spec still names the weights
        spec = EncoderSpec(**{**to_dict(spec), "finetuned": EXIT_FLOW})
        encoder_state = exit_flow_state(encoder)
    elif encoder is not None:
        spec = EncoderSpec(name=spec.name, spatial=spec.spatial, feature_dim=spec.feature_dim)
        encoder_state = {k: v.detach().cpu().clone() for k, v in encoder.state_dict().items()}
    return CaptionModel(
        name=Path(cfg.out).stem,
        encoder=spec,
        encoder_state=encoder_state,
        preprocess=choice.preprocess,
        decoder=dcfg,
        vocab=vocab,
        max_caption_len=cfg.max_caption_len,
        decoder_state=state,
        training={
            "batchcap_version": __version__,
            "data": dataset.summary(),
            "unreadable_images": len(failures),
            "config": {k: v for k, v in to_dict(cfg).items() if k not in ("out",)},
            "epoch": loop["epoch"] + 1 if loop["best_epoch"] is None else loop["best_epoch"],
            "history": loop["history"],
            **({"init_model": {"identity": start_model.identity, "training": start_model.training}}
               if start_model is not None else {}),
            **({"pretrain": loop["pretrain"]} if "pretrain" in loop else {}),
        },
        metrics={"selected_on": "val", "tokenizer": scores.get("tokenizer"),
                 **{k: v for k, v in scores.items() if k.startswith(("BLEU", "CIDEr"))}},
    )
