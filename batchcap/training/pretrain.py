"""Language-model pretraining of the decoder on caption text that has no photos.

Captioning data is photos *and* words; caption text alone is far more plentiful
(Flickr30k's 117k captions are in Flickr8k's style and world). Before captioning training,
``batchcap train --pretrain-captions FILE`` (repeatable: several files are read as one text)
teaches the fresh decoder's embedding, LSTM and output layer to write such sentences,
conditioned on a constant *null image* (all-zero features): the image pathway starts
untrained and learns from the photos afterwards.

The text is read in the captioning dataset's vocabulary (new words become ``<unk>``; with
``--vocabulary-from-text`` the text's words count towards that vocabulary too), and
captions that could leak the selection split are dropped: those of any photo the captioning
dataset lists (by file name, for ``IMAGE#N<TAB>caption`` files) and those equal, after
normalisation, to a validation caption.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from batchcap.config import RuntimeConfig, TrainConfig
from batchcap.data.captions.flickr8k import TOKEN_LINE, read_flickr8k_tokens
from batchcap.data.captions.records import CaptionDataset, DatasetError
from batchcap.fileio import file_sha256
from batchcap.model.decoder import CaptionDecoder
from batchcap.model.text import Vocabulary, normalize_caption
from batchcap.training.steps import lr_factor, reference_captions, teacher_forced_loss, training_autocast

HELD_OUT_SHARE = 0.01  # of the text, for the perplexity the training record reports


class PretrainError(Exception):
    """The caption text cannot be used (missing, unreadable or empty after filtering)."""


@dataclass(frozen=True)
class CaptionText:
    """Tokenised caption text: rows ``<start> w1 .. <end> <pad>..`` and what reading it found."""

    train: torch.Tensor  # (C, max_len + 2) long
    held_out: torch.Tensor  # (H, max_len + 2) long
    report: dict[str, Any]
    pad_id: int = 0


def read_caption_lines(path: str, notes: list[str] | None = None) -> list[tuple[str | None, str]]:
    """``(image, caption)`` pairs of ``path``: ``IMAGE#N<TAB>caption`` lines, or one caption per line.

    The format is decided by the first non-empty line; ``image`` is ``None`` for plain text.
    Token files go through the Flickr8k reader (:func:`batchcap.data.captions.flickr8k.read_flickr8k_tokens`),
    which skips ids that are not image names and empty captions with a line in ``notes``.
    """
    try:
        with open(path, encoding="utf-8-sig") as fh:
            lines = [line.rstrip("\r\n") for line in fh if line.strip()]
    except UnicodeDecodeError as error:
        raise PretrainError(
            f"{path}: not UTF-8 text ({error.reason} at byte {error.start}); expected "
            "IMAGE#N<TAB>caption lines or one caption per line"
        ) from None
    except OSError as error:
        raise PretrainError(f"{path}: {error.strerror}") from None
    if not lines:
        raise PretrainError(f"{path}: no captions (expected IMAGE#N<TAB>caption lines or one caption per line)")
    if TOKEN_LINE.match(lines[0]) is None:
        return [(None, line.strip()) for line in lines]
    try:
        captions = read_flickr8k_tokens(path, notes if notes is not None else [])
    except DatasetError as error:
        raise PretrainError(str(error)) from None
    return [(image, caption) for image, texts in captions.items() for caption in texts]


@dataclass(frozen=True)
class UsableText:
    """The captions of some caption-text files that may be trained on, normalised, and what was dropped."""

    captions: list[list[str]]
    files: list[dict[str, Any]]
    lines: int
    dropped: dict[str, int]
    notes: list[str]


def usable_caption_text(
    paths: str | Sequence[str], dataset_images: Iterable[str], val_captions: Iterable[str]
) -> UsableText:
    """The normalised captions of ``paths`` (one text, in file order), less what could leak the selection split.

    Dropped: the captions of any photo the captioning dataset lists, those equal to a validation
    caption after normalisation, and empty ones. Pretraining and ``--vocabulary-from-text`` read
    the same text through this one filter.
    """
    paths = [paths] if isinstance(paths, str) else list(paths)
    notes: list[str] = []
    pairs: list[tuple[str | None, str]] = []
    files: list[dict[str, Any]] = []
    for path in paths:
        read = read_caption_lines(path, notes)
        files.append({"file": path, "sha256": file_sha256(path), "lines": len(read)})
        pairs.extend(read)
    known_images = set(dataset_images)
    val_texts = {tuple(normalize_caption(c)) for c in val_captions}
    captions: list[list[str]] = []
    same_photo = same_text = empty = 0
    for image, caption in pairs:
        if image is not None and image in known_images:
            same_photo += 1
            continue
        tokens = normalize_caption(caption)
        if not tokens:
            empty += 1
            continue
        if tuple(tokens) in val_texts:
            same_text += 1
            continue
        captions.append(tokens)
    dropped = {"dataset_photos": same_photo, "val_captions": same_text, "empty": empty}
    return UsableText(captions, files, len(pairs), dropped, notes)


def prepare_caption_text(
    paths: str | Sequence[str],
    vocab: Vocabulary,
    max_len: int,
    dataset_images: Iterable[str],
    val_captions: Iterable[str],
    seed: int,
) -> CaptionText:
    """Tokenise the usable captions of ``paths`` (one text, in file order) in ``vocab``; hold 1 % out.

    The report names one file as ``file``/``sha256``, several as ``files`` (each with its own line count).
    """
    paths = [paths] if isinstance(paths, str) else list(paths)
    text = usable_caption_text(paths, dataset_images, val_captions)
    path = " + ".join(paths)
    rows: list[list[int]] = []
    words = unknown = 0
    for tokens in text.captions:
        ids = vocab.encode(tokens[:max_len])
        words += len(ids)
        unknown += sum(i == vocab.unk_id for i in ids)
        ids = [vocab.start_id] + ids + [vocab.end_id]
        rows.append(ids + [vocab.pad_id] * (max_len + 2 - len(ids)))
    same_photo, same_text, empty = (text.dropped[k] for k in ("dataset_photos", "val_captions", "empty"))
    if len(rows) < 2:
        raise PretrainError(
            f"{path}: {len(rows)} usable captions after filtering ({same_photo} of the "
            f"dataset's own photos, {same_text} equal to validation captions, {empty} empty)"
        )
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed))
    tokens_all = torch.tensor(rows, dtype=torch.long)[order]
    held = max(1, int(len(rows) * HELD_OUT_SHARE))
    files = text.files
    report = {
        **({"file": paths[0], "sha256": files[0]["sha256"]} if len(paths) == 1 else {"files": files}),
        "lines": text.lines,
        "captions": len(rows) - held,
        "held_out": held,
        "dropped_dataset_photos": same_photo,
        "dropped_val_captions": same_text,
        "dropped_empty": empty,
        "unknown_word_share": round(unknown / max(1, words), 4),
        "notes": text.notes,
    }
    return CaptionText(tokens_all[held:], tokens_all[:held], report, vocab.pad_id)


def _null_image(decoder: CaptionDecoder, device: str) -> torch.Tensor:
    """The constant picture the text is conditioned on: one all-zero region ``(1, 1, F)``."""
    return torch.zeros(1, 1, decoder.cfg.feature_dim, device=device)


def _batch_loss(decoder: CaptionDecoder, captions: torch.Tensor, pad_id: int, device: str) -> tuple[torch.Tensor, int]:
    """Mean next-word cross-entropy of ``captions`` given the null image, and their target-token count."""
    captions, tokens = reference_captions(captions, pad_id)
    loss = teacher_forced_loss(
        decoder,
        _null_image(decoder, device),
        captions.to(device),
        captions.shape[0],
        pad_id,
        attention_penalty=0.0,
        label_smoothing=0.0,
    )
    return loss, tokens


@torch.no_grad()
def perplexity(
    decoder: CaptionDecoder, captions: torch.Tensor, runtime: RuntimeConfig, pad_id: int = 0, batch_size: int = 500
) -> float:
    """Per-word perplexity of ``captions`` under the decoder given the null image (eval mode)."""
    was_training = decoder.training
    decoder.eval()
    total, tokens = 0.0, 0
    with training_autocast(runtime):
        for start in range(0, captions.shape[0], batch_size):
            loss, n = _batch_loss(decoder, captions[start : start + batch_size], pad_id, runtime.device)
            total, tokens = total + float(loss) * n, tokens + n
    decoder.train(was_training)
    return math.exp(total / max(1, tokens))


def pretrain_language_model(
    decoder: CaptionDecoder,
    text: CaptionText,
    runtime: RuntimeConfig,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    warmup_steps: int,
    weight_decay: float,
    grad_clip: float,
    seed: int,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Teacher-force ``decoder`` on ``text`` (null image, its own AdamW, warm-up + cosine); returns a report.

    The report (text statistics, held-out perplexity before and after, steps and seconds)
    goes into the model file's training record.
    """
    before = perplexity(decoder, text.held_out, runtime, text.pad_id)
    optimizer = torch.optim.AdamW(decoder.parameters(), lr=lr, weight_decay=weight_decay)
    steps_per_epoch = math.ceil(text.train.shape[0] / batch_size)
    total = steps_per_epoch * epochs
    started = time.time()
    step = 0
    by_epoch: list[float] = []  # held-out perplexity after each epoch: whether another epoch pays
    decoder.train()
    source = text.report.get("file") or " + ".join(f["file"] for f in text.report.get("files", []))
    log(
        f"language-model pretraining on {text.train.shape[0]} captions ({source}): {epochs} "
        f"epoch(s) of {steps_per_epoch} steps, {batch_size} captions a step; held-out perplexity {before:.1f}"
    )
    for epoch in range(1, epochs + 1):
        order = torch.randperm(text.train.shape[0], generator=torch.Generator().manual_seed(seed + epoch))
        loss_sum, token_sum = 0.0, 0
        for start in range(0, len(order), batch_size):
            for group in optimizer.param_groups:
                group["lr"] = lr * lr_factor(step, warmup_steps, total)
            with training_autocast(runtime):
                loss, tokens = _batch_loss(
                    decoder, text.train[order[start : start + batch_size]], text.pad_id, runtime.device
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(decoder.parameters(), grad_clip)
            optimizer.step()
            step += 1
            loss_sum, token_sum = loss_sum + float(loss.detach()) * tokens, token_sum + tokens
            if step % 100 == 0:
                log(f"pretraining step {step}/{total}: loss {loss_sum / token_sum:.3f} ({time.time() - started:.0f} s)")
        by_epoch.append(perplexity(decoder, text.held_out, runtime, text.pad_id))
        log(
            f"pretraining epoch {epoch}: train loss {loss_sum / max(1, token_sum):.3f}, "
            f"held-out perplexity {by_epoch[-1]:.1f}"
        )
    after = by_epoch[-1]
    seconds = round(time.time() - started, 1)
    log(f"pretraining done in {seconds:.0f} s: held-out perplexity {before:.1f} -> {after:.1f}")
    return {
        **text.report,
        "epochs": epochs,
        "steps": step,
        "batch_size": batch_size,
        "lr": lr,
        "seconds": seconds,
        "held_out_perplexity": {
            "before": round(before, 2),
            "after": round(after, 2),
            "by_epoch": [round(p, 2) for p in by_epoch],
        },
    }


def pretrain_for_training(
    cfg: TrainConfig,
    decoder: CaptionDecoder,
    dataset: CaptionDataset,
    vocab: Vocabulary,
    runtime: RuntimeConfig,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """``batchcap train --pretrain-captions``: the fresh decoder on ``cfg``'s caption text; returns the report.

    The settings are the captioning run's (``--lr``, ``--warmup-steps``, five captions per
    ``--batch-size`` photo); the dataset's photos and validation captions set what is dropped.
    """
    text = prepare_caption_text(
        cfg.pretrain_captions,
        vocab,
        cfg.max_caption_len,
        (r.image_id for records in dataset.splits.values() for r in records),
        (c for r in dataset.splits.get("val", []) for c in r.captions),
        cfg.seed,
    )
    report = text.report
    for note in report["notes"]:
        log(f"note: {note}")
    log(
        f"caption text: {report['captions']} captions ({report['unknown_word_share']:.1%} of words <unk>), "
        f"{report['held_out']} held out; dropped {report['dropped_dataset_photos']} of the dataset's photos, "
        f"{report['dropped_val_captions']} equal to validation captions"
    )
    return pretrain_language_model(
        decoder,
        text,
        runtime,
        epochs=cfg.pretrain_epochs,
        batch_size=cfg.batch_size * int(cfg.extra.get("captions_per_image", 5)),
        lr=cfg.lr,
        warmup_steps=cfg.warmup_steps,
        weight_decay=cfg.weight_decay,
        grad_clip=cfg.grad_clip,
        seed=cfg.seed,
        log=log,
    )
