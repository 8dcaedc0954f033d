"""Training the caption decoder: cached encoder features, teacher forcing, selection by CIDEr.

The flow is ``dataset -> vocabulary -> feature cache -> epochs -> best model file``:

* captions are normalised with :func:`batchcap.model.text.normalize_caption` (the same function
  evaluation and captioning use) and the vocabulary is built from the train split;
* encoder features come from :class:`batchcap.training.feature_cache.FeatureCache`, computed once per
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
  (:mod:`batchcap.training.scst`) instead of on the reference words;
* several datasets train as one merged dataset (:mod:`batchcap.data.captions.mixture`): the
  vocabulary comes from all their training captions, an epoch draws from each by its weight and
  validation scores each dataset's val split (:mod:`batchcap.training.mixing`).
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from batchcap.config import BeamConfig, DecoderConfig, RuntimeConfig, TrainConfig, to_dict
from batchcap.data.captions.mixture import DatasetMix, mix_datasets
from batchcap.data.captions.records import CaptionDataset
from batchcap.encode.exit_flow import (
    TRUNK_LAYER,
    ExitFlowError,
    XceptionExitFlow,
    apply_exit_flow,
    check_supported,
    exit_flow_state,
)
from batchcap.encode.torch_backend import build_backbone
from batchcap.model.beam import beam_search
from batchcap.model.decoder import CaptionDecoder
from batchcap.model.modelfile import EXIT_FLOW, CaptionModel, EncoderSpec, load_model, save_model
from batchcap.model.text import Vocabulary, normalize_caption
from batchcap.training.calibrate import ending_and_familiarity, learn_word_rules
from batchcap.training.checkpoints import load_checkpoint, save_checkpoint
from batchcap.training.feature_cache import feature_memory_budget
from batchcap.training.feature_sources import (
    CachedFeatures,
    CachedTrunk,
    EncoderChoice,
    FinetunedEncoder,
    build_split,
    cached_splits,
    describe_residence,
    fits_on_device,
)
from batchcap.training.metrics import score_captions
from batchcap.training.mixing import combined_scores, draw_counts, epoch_order
from batchcap.training.pretrain import PretrainError, pretrain_for_training, usable_caption_text
from batchcap.training.scst import CaptionReward
from batchcap.training.steps import Split, StepTotals, TrainStep, use_tf32
from batchcap.version import __version__

Log = Callable[[str], None]

#: Caption styles new to a trained decoder (``--init-model`` without styles) learn at this multiple of
#: ``--lr``, like new layers in a fine-tuned network: at the decoder's rate (2e-4), offsets of its initial
#: state moved by under 0.02 in an epoch, too little to change a caption. A fresh decoder's styles learn
#: with the rest.
STYLE_LR_SCALE = 50.0


class TrainingError(Exception):
    """A training request that cannot work as given (no data in a split, a start model that does not fit)."""


def caption_features(
    decoder: CaptionDecoder,
    features: torch.Tensor,
    vocab: Vocabulary,
    beam: BeamConfig,
    batch_size: int = 100,
    unendable_ids: Sequence[int] = (),
    styles: torch.Tensor | None = None,
    **word_rules: Any,
) -> list[str]:
    """Beam-search captions for features (on any device), in order: validation and dev sweeps.

    The features move to the decoder's device chunk by chunk, so a CPU feature cache
    validates a CUDA decoder without holding the whole split on the GPU. ``unendable_ids``
    is the model's ending rule (training validates without one); ``word_rules`` are the
    search's other rules (:meth:`batchcap.model.modelfile.CaptionModel.word_rules`); ``styles``
    ``(M,)`` the caption style of each picture, for a decoder with styles.
    """
    decoder.eval()
    device = next(decoder.parameters()).device
    out: list[str] = []
    with torch.inference_mode():
        for start in range(0, features.shape[0], batch_size):
            chunk = features[start : start + batch_size].to(device, non_blocking=True)
            chunk_styles = None if styles is None else styles[start : start + batch_size]
            state = decoder.init_state(chunk.float(), styles=chunk_styles)
            result = beam_search(
                decoder.step,
                state,
                beam,
                start_id=vocab.start_id,
                end_id=vocab.end_id,
                pad_id=vocab.pad_id,
                banned_ids=vocab.never_generated,
                unendable_ids=unendable_ids,
                per_image=decoder.per_image_state,
                **word_rules,
            )
            out.extend(vocab.decode(row[0]) for row in result.tokens.cpu().tolist())
    return out


def validate(
    decoder: CaptionDecoder,
    split: Split,
    features: torch.Tensor,
    vocab: Vocabulary,
    beam: BeamConfig,
    groups: Sequence[tuple[str, list[str]]] = (),
    select: str = "mean",
    styles: torch.Tensor | None = None,
) -> dict[str, Any]:
    """BLEU and CIDEr-D of beam-search captions on ``split`` (batchcap tokenisation: fast, no Java).

    With ``groups`` (dataset name, its image ids) each dataset is scored on its own and the
    result combines them (:func:`batchcap.training.mixing.combined_scores`, by ``select``). A decoder
    with styles writes each picture in its own dataset's style (``styles``).
    """
    captions = caption_features(decoder, features, vocab, beam, styles=styles)
    predictions = dict(zip(split.image_ids, captions))
    if not groups:
        scores = score_captions(predictions, split.references, full=False)
        scores["examples"] = [[i, predictions[i]] for i in split.image_ids[:3]]
        return scores
    per_dataset = {}
    for name, ids in groups:
        per_dataset[name] = score_captions(
            {i: predictions[i] for i in ids}, {i: split.references[i] for i in ids}, full=False
        )
        per_dataset[name]["examples"] = [[i, predictions[i]] for i in ids[:3]]
    return combined_scores(per_dataset, select)


def train(
    cfg: TrainConfig,
    mix: DatasetMix,
    choice: EncoderChoice,
    decoder_cfg: dict[str, Any],
    runtime: RuntimeConfig,
    log: Log = print,
) -> CaptionModel:
    """Train a decoder on the train splits of ``mix``'s datasets, select on their val splits, save ``cfg.out``."""
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    out = Path(cfg.out)
    if mix.several:  # validation takes the first --val-images of each dataset; the epoch draws follow the config
        mix = mix_datasets(mix.datasets, cfg.dataset_weights, val_images=cfg.val_images)
    dataset = mix.merged
    train_records = dataset.splits.get("train", [])
    if not train_records:
        raise TrainingError("the dataset has no training images")
    for name, each in zip(mix.names, mix.datasets):
        if mix.several and not each.splits.get("train"):
            raise TrainingError(f"{name} ({each.root}) has no training images: every dataset given needs a train split")
    _refuse_conflicting_options(cfg)
    start_model = load_start_model(cfg, choice)
    vocab = _vocabulary(cfg, start_model, dataset, log)
    if start_model is not None and mix.several:
        _log_unknown_words(mix, vocab, log)
    data = _training_data(cfg, mix, choice, runtime, vocab, start_model, log)
    train_split, val_split, source = data.train, data.val, data.source
    owners = [mix.owner[i] for i in train_split.image_ids]
    groups = _validation_groups(mix, val_split) if mix.several else []
    # Trunk activations are not the model's features: an exit-flow model gets familiarity from calibrate.
    trust = ending_and_familiarity(
        train_split.records,
        train_split.image_ids,
        torch.empty(0) if cfg.finetune_exit_flow else train_split.features,
        runtime.precision,
        dataset_of={i: mix.names[d] for i, d in mix.owner.items()},
    )
    word_rules = learn_word_rules(train_split.records, trust[0], trust[1]["learnt_from"])
    log(
        f"train: {len(train_split.image_ids)} images, {train_split.captions.shape[0]} captions; "
        f"val: {len(val_split.image_ids)} images"
    )
    epoch_images = len(train_split.image_ids)
    if mix.several:
        counts = draw_counts(epoch_images, cfg.dataset_weights) if cfg.dataset_weights else None
        epoch_images = sum(counts) if counts else epoch_images
        for d, name in enumerate(mix.names):
            images = owners.count(d)
            drawn = f"{counts[d]} draws an epoch" if counts else "each once an epoch"
            log(f"  {name}: {images} train images ({drawn}), {len(groups[d][1])} val images")
    dcfg = _decoder_config(cfg, start_model, len(vocab), data.feature_dim, decoder_cfg, mix.names)
    # Seeded again here: building an encoder to fill a missing feature cache draws from the global
    # generator, and the same --seed must give the same model whether the cache was there or not.
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    decoder = _start_decoder(dcfg, start_model, vocab, log)
    decoder.to(runtime.device)
    train_styles = _style_indices(dcfg, mix, train_split.image_ids)
    val_styles = _style_indices(dcfg, mix, val_split.image_ids)
    new_styles = bool(dcfg.styles) and start_model is not None and not start_model.decoder.styles
    trained, optimizer = _optimizer(cfg, decoder, source, STYLE_LR_SCALE if new_styles else 1.0)
    total_steps = math.ceil(epoch_images / cfg.batch_size) * cfg.epochs
    checkpoint = out.with_name(out.name + ".ckpt")
    log_path = out.with_name(out.name + ".log.jsonl")
    loop: dict[str, Any] = {"epoch": 0, "step": 0, "best": None, "best_epoch": None, "bad_epochs": 0, "history": []}
    if cfg.resume and checkpoint.exists():
        loop = load_checkpoint(checkpoint, trained, optimizer)
        log(f"resumed from {checkpoint} after epoch {loop['epoch']}")
    elif cfg.pretrain_captions:  # before the first epoch only: a checkpoint holds the pretrained decoder
        try:
            loop["pretrain"] = pretrain_for_training(cfg, decoder, dataset, vocab, runtime, log)
        except PretrainError as exc:
            raise TrainingError(f"--pretrain-captions: {exc}") from exc
    val_beam = BeamConfig(beam_size=cfg.val_beam_size, max_len=cfg.max_caption_len)
    best_model: CaptionModel | None = None
    rewarder = None
    if cfg.self_critical:
        rewarder = CaptionReward(
            [[normalize_caption(c) for c in train_split.references[i]] for i in train_split.image_ids], vocab
        )
    stepper = TrainStep(
        decoder, trained, optimizer, cfg, runtime, vocab, train_split, total_steps, rewarder, train_styles
    )
    if use_tf32(runtime.device):
        log("fp32 matmuls use TF32 (Ampere or later GPU)")

    for epoch in range(loop["epoch"] + 1, cfg.epochs + 1):
        started = time.time()
        totals = _run_epoch(
            epoch,
            cfg,
            decoder,
            stepper,
            source,
            owners,
            loop,
            total_steps,
            self_critical=rewarder is not None,
            runtime=runtime,
            log=log,
        )
        train_loss = totals.mean_loss()  # waits for the epoch's last steps, so the time below is theirs
        train_time = time.time() - started
        scores = validate(
            decoder, val_split, source.val_features(val_split), vocab, val_beam, groups, cfg.select, val_styles
        )
        record = {
            "epoch": epoch,
            "step": loop["step"],
            "train_loss": train_loss,
            "train_seconds": round(train_time, 1),
            "val": scores,
            "time": time.time(),
        }
        if rewarder is not None:
            record["train_reward"] = totals.mean_reward(cfg.samples_per_image)
        loop["history"].append({k: v for k, v in record.items() if k != "time"})
        with open(log_path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")
        log(
            f"epoch {epoch}: loss {record['train_loss']:.3f}, val BLEU-4 {scores['BLEU-4']:.3f}, "
            f"CIDEr {scores['CIDEr']:.3f}, e.g. {scores['examples'][0][1]!r}"
        )
        for name, each in scores.get("datasets", {}).items():
            log(f"  {name}: val BLEU-4 {each['BLEU-4']:.3f}, CIDEr {each['CIDEr']:.3f}")
        if loop["best"] is None or scores["CIDEr"] > loop["best"]:
            loop["best"], loop["best_epoch"], loop["bad_epochs"] = scores["CIDEr"], epoch, 0
            best_model = _model_file(
                cfg,
                choice,
                dcfg,
                vocab,
                decoder,
                mix,
                data.failures,
                loop,
                scores,
                encoder=source.trainable,
                start_model=start_model,
            )
            best_model.unendable_words, best_model.ending_rule, best_model.familiarity, best_model.neighbours = trust
            best_model.ending_rule = dict(best_model.ending_rule)  # apply adds to it: not shared across epochs
            word_rules.apply(best_model)
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


def _refuse_conflicting_options(cfg: TrainConfig) -> None:
    """Options that cannot go together, and a bad memory budget, refused before minutes of extraction."""
    try:
        feature_memory_budget()
    except ValueError as exc:
        raise TrainingError(str(exc)) from exc
    if cfg.finetune_encoder and cfg.finetune_exit_flow:
        raise TrainingError(
            "--finetune-encoder already trains the exit flow: give one of --finetune-encoder and --finetune-exit-flow"
        )
    if cfg.vocabulary_from_text and not cfg.pretrain_captions:
        raise TrainingError("--vocabulary-from-text counts the words of --pretrain-captions: give that text too")
    if cfg.pretrain_captions and cfg.init_model:
        raise TrainingError(
            "--pretrain-captions pretrains a fresh decoder; --init-model already gives one: leave one of them out"
        )


def _vocabulary(cfg: TrainConfig, start_model: CaptionModel | None, dataset: CaptionDataset, log: Log) -> Vocabulary:
    """The start model's vocabulary, or one built from the training captions (and the caption text, if asked)."""
    if start_model is not None and cfg.vocabulary_from:
        vocab = load_model(cfg.vocabulary_from).vocab
        known = len(set(vocab.words) & set(start_model.vocab.words))
        log(
            f"starting from {cfg.init_model}: its decoder, with the vocabulary of {cfg.vocabulary_from} "
            f"({len(vocab)} words: {known} it knows, {len(vocab) - known} new)"
        )
        return vocab
    if start_model is not None:
        log(f"starting from {cfg.init_model}: its decoder and vocabulary ({len(start_model.vocab)} words)")
        return start_model.vocab
    captions = [normalize_caption(c) for r in dataset.splits.get("train", []) for c in r.captions]
    counted = "training captions"
    if cfg.vocabulary_from_text:
        try:
            text = usable_caption_text(
                cfg.pretrain_captions,
                (r.image_id for records in dataset.splits.values() for r in records),
                (c for r in dataset.splits.get("val", []) for c in r.captions),
            )
        except PretrainError as exc:
            raise TrainingError(f"--pretrain-captions: {exc}") from exc
        counted = f"{len(captions)} training captions and {len(text.captions)} of the caption text"
        captions += text.captions
    vocab = Vocabulary.build(captions, min_count=cfg.min_word_count)
    log(f"vocabulary: {len(vocab)} words (min count {cfg.min_word_count} over {counted})")
    return vocab


def _log_unknown_words(mix: DatasetMix, vocab: Vocabulary, log: Log) -> None:
    """How many of each dataset's training words the start model's vocabulary cannot say (they train as <unk>)."""
    for name, dataset in zip(mix.names, mix.datasets):
        words = [w for r in dataset.splits.get("train", []) for c in r.captions for w in normalize_caption(c)]
        unknown = vocab.encode(words).count(vocab.unk_id)
        log(f"  {name}: {unknown / max(1, len(words)):.1%} of training words are <unk> in the vocabulary trained with")


def _validation_groups(mix: DatasetMix, val_split: Split) -> list[tuple[str, list[str]]]:
    """Each dataset's name and its images in the val split; every dataset must have some."""
    groups = [(name, mix.ids_of(d, val_split.image_ids)) for d, name in enumerate(mix.names)]
    empty = [name for name, ids in groups if not ids]
    if empty:
        raise TrainingError(
            f"{', '.join(empty)}: no usable validation images; with several datasets each one's val split "
            "is scored, so every dataset needs one"
        )
    return groups


@dataclass
class _TrainingData:
    """The splits a run trains and selects on, and where a step's features come from."""

    train: Split
    val: Split
    source: CachedFeatures | FinetunedEncoder | CachedTrunk
    feature_dim: int
    failures: dict[str, str]


def _training_data(
    cfg: TrainConfig,
    mix: DatasetMix,
    choice: EncoderChoice,
    runtime: RuntimeConfig,
    vocab: Vocabulary,
    start_model: CaptionModel | None,
    log: Log,
) -> _TrainingData:
    """Features for the whole network fine-tuned, for the exit flow fine-tuned, or cached for a frozen encoder.

    With several datasets the merged val split already holds at most ``--val-images`` of each.
    """
    dataset = mix.merged
    val_limit = None if mix.several else cfg.val_images
    failures: dict[str, str] = {}
    source: CachedFeatures | FinetunedEncoder | CachedTrunk
    if cfg.finetune_encoder:
        train_split = build_split(dataset.splits.get("train", []), None, vocab, cfg.max_caption_len)
        val_split = build_split(dataset.splits.get("val", []), None, vocab, cfg.max_caption_len, limit=val_limit)
        backbone = build_backbone(choice.config, choice.source)
        source = FinetunedEncoder(backbone, choice.preprocess, train_split.records, runtime, cfg.augment)
        feature_dim = int(backbone.num_features)
    elif cfg.finetune_exit_flow:
        try:
            check_supported(choice.config.name, choice.config.spatial)
        except ExitFlowError as exc:
            raise TrainingError(str(exc)) from exc
        train_split, train_views, val_split, failures = cached_splits(
            dataset, choice, runtime, cfg, vocab, log, layer=TRUNK_LAYER, val_limit=val_limit
        )
        backbone = build_backbone(choice.config, choice.source)
        if start_model is not None and start_model.encoder.finetuned == EXIT_FLOW:
            apply_exit_flow(backbone, start_model.encoder_state or {}, str(cfg.init_model))
            log(f"exit flow: continuing from {cfg.init_model}'s fine-tuned one")
        source = CachedTrunk(train_views, XceptionExitFlow(backbone), runtime, val_split.features)
        log(
            f"trunk activations: {describe_residence(train_views)}; each step "
            f"trains the exit flow at lr {cfg.encoder_lr:g}"
        )
        feature_dim = int(backbone.num_features)
    else:
        train_split, train_views, val_split, failures = cached_splits(
            dataset, choice, runtime, cfg, vocab, log, val_limit=val_limit
        )
        on_device = fits_on_device(sum(v.nbytes for v in train_views), runtime.device)
        source = CachedFeatures(train_views, runtime.device, on_device)
        if on_device:
            log(f"features: kept on {runtime.device} ({sum(v.nbytes for v in train_views) / 2**30:.1f} GiB)")
        else:
            log(f"features: {describe_residence(train_views)}")
        feature_dim = int(train_split.features.shape[-1])
    if not val_split.image_ids:
        raise TrainingError("the dataset has no usable validation images: model selection needs a val split")
    return _TrainingData(train_split, val_split, source, feature_dim, failures)


def _decoder_config(
    cfg: TrainConfig,
    start_model: CaptionModel | None,
    vocab_size: int,
    feature_dim: int,
    decoder_cfg: dict[str, Any],
    dataset_names: Sequence[str],
) -> DecoderConfig:
    """The start model's decoder shape (which must fit the features), or a new one from the options.

    With ``--dataset-styles`` the decoder has one style per dataset, named and ordered like the datasets;
    a start model with styles keeps them, and must have been trained on datasets of the same names.
    """
    styles = tuple(dataset_names) if cfg.dataset_styles else ()
    if start_model is None:
        return DecoderConfig(vocab_size=vocab_size, feature_dim=feature_dim, **decoder_cfg, styles=styles)
    if start_model.decoder.feature_dim != feature_dim:
        raise TrainingError(
            f"{cfg.init_model} expects {start_model.decoder.feature_dim}-dim features; the encoder gives {feature_dim}"
        )
    theirs = start_model.decoder.styles
    if theirs and tuple(dataset_names) != theirs:
        raise TrainingError(
            f"{cfg.init_model} writes the caption styles of {', '.join(theirs)}; these DATA are "
            f"{', '.join(dataset_names)}: give the datasets it was trained on, in the same order"
        )
    if theirs and not cfg.dataset_styles:
        raise TrainingError(
            f"{cfg.init_model} has one caption style per dataset: continue with --dataset-styles "
            "(each caption trains in its own dataset's style)"
        )
    if styles or vocab_size != start_model.decoder.vocab_size:
        return DecoderConfig(**{**to_dict(start_model.decoder), "styles": styles, "vocab_size": vocab_size})
    return start_model.decoder


def _start_decoder(
    dcfg: DecoderConfig, start_model: CaptionModel | None, vocab: Vocabulary, log: Log
) -> CaptionDecoder:
    """A fresh decoder, or the start model's: one that gains styles starts them at zero offsets, and one
    that gains words (``--vocabulary-from``) keeps the rows of the words it knew."""
    if start_model is None:
        return CaptionDecoder(dcfg)
    new_styles = bool(dcfg.styles) and not start_model.decoder.styles
    if not new_styles and vocab == start_model.vocab:
        built = start_model.build_decoder()
        assert isinstance(built, CaptionDecoder)  # load_start_model refuses ensembles
        return built
    decoder = CaptionDecoder(dcfg)
    state = {k: v.float() for k, v in start_model.decoder_state.items()}
    if vocab != start_model.vocab:
        state = grown_vocabulary(state, start_model.vocab, vocab)
    missing, unexpected = decoder.load_state_dict(state, strict=False)
    assert not unexpected and all(k.startswith("style_memory.") for k in missing), (missing, unexpected)
    if new_styles:
        log(f"caption styles: {', '.join(dcfg.styles)}, starting from the start model's unstyled decoder")
    return decoder.train()


def grown_vocabulary(state: dict[str, torch.Tensor], old: Vocabulary, new: Vocabulary) -> dict[str, torch.Tensor]:
    """A decoder state moved from vocabulary ``old`` to ``new``: each word the two share keeps its rows
    of the word embedding and the output layer.

    A new word starts as the mean of the known words' embeddings (an average word as input), with zero
    output weights and the lowest known output bias, so it is as unlikely as the rarest known word until
    teacher forcing teaches it; a word ``new`` lacks is dropped.
    """
    index = {word: i for i, word in enumerate(old.words)}
    source = torch.tensor([index.get(word, -1) for word in new.words])  # (V_new,) -1: a new word
    known = source >= 0
    grown = dict(state)
    for key in ("embed.weight", "out.weight", "out.bias"):
        rows = state[key]
        fresh = rows.new_zeros((len(new.words), *rows.shape[1:]))
        if key == "embed.weight":
            fresh[:] = rows.mean(0)
        elif key == "out.bias":
            fresh[:] = rows.min()
        fresh[known] = rows[source[known]]
        grown[key] = fresh
    return grown


def _style_indices(dcfg: DecoderConfig, mix: DatasetMix, image_ids: Sequence[str]) -> torch.Tensor | None:
    """Each image's caption style (its dataset's index in ``dcfg.styles``); None for a decoder without styles."""
    if not dcfg.styles:
        return None
    index = {name: i for i, name in enumerate(dcfg.styles)}
    return torch.tensor([index[mix.names[mix.owner[i]]] for i in image_ids], dtype=torch.long)


def _optimizer(
    cfg: TrainConfig, decoder: torch.nn.Module, source: Any, style_lr_scale: float = 1.0
) -> tuple[torch.nn.ModuleDict, torch.optim.Optimizer]:
    """What is trained (the decoder, and a fine-tuned encoder part at its own rate) and its AdamW.

    A decoder's caption styles learn at ``style_lr_scale`` times ``--lr`` (:data:`STYLE_LR_SCALE`).
    """
    styles = [p for name, p in decoder.named_parameters() if name.startswith("style_memory.")]
    rest = [p for name, p in decoder.named_parameters() if not name.startswith("style_memory.")]
    groups = [{"params": rest, "lr": cfg.lr, "base_lr": cfg.lr}]
    if styles:
        style_lr = cfg.lr * style_lr_scale
        groups.append({"params": styles, "lr": style_lr, "base_lr": style_lr})
    trained = torch.nn.ModuleDict({"decoder": decoder})
    if source.trainable is not None:
        groups.append({"params": list(source.trainable.parameters()), "lr": cfg.encoder_lr, "base_lr": cfg.encoder_lr})
        trained["encoder"] = source.trainable
    return trained, torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)


def _run_epoch(
    epoch: int,
    cfg: TrainConfig,
    decoder: torch.nn.Module,
    stepper: TrainStep,
    source: Any,
    owners: list[int],
    loop: dict[str, Any],
    total_steps: int,
    *,
    self_critical: bool,
    runtime: RuntimeConfig,
    log: Log,
) -> StepTotals:
    """One pass over the training images in a seeded order; ``loop["step"]`` counts on.

    ``owners[i]`` is the dataset of training image ``i`` (:func:`batchcap.training.mixing.epoch_order`).
    """
    # Self-critical samples come from the policy that captions at run time (no dropout):
    # measured on Flickr8k dev, it learns faster than sampling through dropout.
    decoder.train(not self_critical)
    generator = torch.Generator().manual_seed(cfg.seed + epoch)
    order = epoch_order(owners, cfg.dataset_weights, generator, seed=cfg.seed, epoch=epoch)
    started = time.time()
    totals = StepTotals.zeros(runtime.device)
    batches = [
        [i for i in order[start : start + cfg.batch_size] if stepper.per_image[i]]
        for start in range(0, len(order), cfg.batch_size)
    ]
    for images, feats in source.epoch([b for b in batches if b], generator):
        totals.add(stepper(loop["step"], images, feats, generator), len(images))
        loop["step"] += 1
        if loop["step"] % 50 == 0:  # the only time a step's numbers come back to the host
            progress = (
                f"reward {totals.mean_reward(cfg.samples_per_image):.3f}"
                if self_critical
                else f"loss {totals.mean_loss():.3f}"
            )
            log(
                f"epoch {epoch} step {loop['step']}/{total_steps} {progress} "
                f"({totals.images / (time.time() - started):.0f} img/s)"
            )
    return totals


def load_start_model(cfg: TrainConfig, choice: EncoderChoice) -> CaptionModel | None:
    """The model ``--init-model`` names, checked against the features training will use."""
    if cfg.init_model is None:
        if cfg.self_critical:
            raise TrainingError(
                "--self-critical fine-tunes a trained model: pass it with --init-model MODEL "
                "(train one with cross-entropy first)"
            )
        return None
    if cfg.finetune_encoder:
        raise TrainingError("--init-model cannot be combined with --finetune-encoder")
    model = load_model(cfg.init_model)
    if model.encoder.finetuned == EXIT_FLOW and not cfg.finetune_exit_flow:
        raise TrainingError(
            f"{cfg.init_model} has a fine-tuned exit flow, which cached features cannot "
            "reproduce: continue with --finetune-exit-flow (--encoder-lr sets how fast it "
            "moves)"
        )
    if model.extra_decoders:
        raise TrainingError(
            f"{cfg.init_model} is an ensemble of {len(model.decoders())} decoders; --init-model "
            "needs a single decoder: fine-tune each member's own model file, then "
            "`batchcap ensemble` them again"
        )
    if model.encoder_state is not None and model.encoder.finetuned != EXIT_FLOW:
        raise TrainingError(
            f"{cfg.init_model} embeds a fine-tuned encoder; --init-model needs a model "
            "trained on cached features of a stock encoder"
        )
    weights_id = choice.spec.weights_sha256 or choice.spec.pretrained_tag
    theirs = model.encoder.weights_sha256 or model.encoder.pretrained_tag
    mismatches = [
        f"{what}: model {a!r}, now {b!r}"
        for what, a, b in (
            ("encoder", model.encoder.name, choice.config.name),
            ("encoder weights", theirs, weights_id),
            ("spatial features", model.encoder.spatial, choice.config.spatial),
            ("preprocessing", to_dict(model.preprocess), to_dict(choice.preprocess)),
        )
        if a != b
    ]
    if mismatches:
        raise TrainingError(
            f"{cfg.init_model} was trained on other features ({'; '.join(mismatches)}); use "
            f"the encoder options it was trained with (see `batchcap info {cfg.init_model}`)"
        )
    return model


def _model_file(
    cfg: TrainConfig,
    choice: EncoderChoice,
    dcfg: DecoderConfig,
    vocab: Vocabulary,
    decoder: CaptionDecoder,
    mix: DatasetMix,
    failures: dict[str, str],
    loop: dict[str, Any],
    scores: dict[str, Any],
    encoder: torch.nn.Module | None = None,
    start_model: CaptionModel | None = None,
) -> CaptionModel:
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
            "data": mix.summary(),
            "unreadable_images": len(failures),
            "config": {k: v for k, v in to_dict(cfg).items() if k not in ("out",)},
            "epoch": loop["epoch"] + 1 if loop["best_epoch"] is None else loop["best_epoch"],
            "history": loop["history"],
            **(
                {"init_model": {"identity": start_model.identity, "training": start_model.training}}
                if start_model is not None
                else {}
            ),
            **({"pretrain": loop["pretrain"]} if "pretrain" in loop else {}),
        },
        metrics={
            "selected_on": "val",
            "tokenizer": scores.get("tokenizer"),
            **{k: v for k, v in scores.items() if k.startswith(("BLEU", "CIDEr"))},
            **(
                {
                    "selected_by": scores["selected_by"],
                    **{f"CIDEr ({name})": each["CIDEr"] for name, each in scores["datasets"].items()},
                }
                if "datasets" in scores
                else {}
            ),
        },
    )
