"""Language-model pretraining of the decoder on caption text that has no photos.

Captioning data is photos *and* words; caption text alone is far more plentiful
(Flickr30k's 117k captions are in Flickr8k's style and world). Before captioning training,
``batchcap train --pretrain-captions FILE`` teaches the fresh decoder's embedding, LSTM and
output layer to write such sentences, conditioned on a constant *null image* (all-zero
features): the image pathway starts untrained and learns from the photos afterwards.

The text is read in the captioning dataset's vocabulary (new words become ``<unk>``), and
captions that could leak the selection split are dropped: those of any photo the captioning
dataset lists (by file name, for ``IMAGE#N<TAB>caption`` files) and those equal, after
normalisation, to a validation caption.
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F

from batchcap.config import RuntimeConfig
from batchcap.decoder import CaptionDecoder
from batchcap.modelfile import file_sha256
from batchcap.text import Vocabulary, normalize_caption

_TOKEN_LINE = re.compile(r"^(?P<image>[^#\t]+)#\d+\t(?P<caption>.*)$")
HELD_OUT_SHARE = 0.01  # of the text, for the perplexity the training record reports


class PretrainError(Exception):
    """The caption text cannot be used (missing, unreadable or empty after filtering)."""


@dataclass(frozen=True)
class CaptionText:
    """Tokenised caption text: rows ``<start> w1 .. <end> <pad>..`` and what reading it found."""

    train: torch.Tensor  # (C, max_len + 2) long
    held_out: torch.Tensor  # (H, max_len + 2) long
    report: dict[str, Any]


def read_caption_lines(path: str) -> list[tuple[str | None, str]]:
    """``(image, caption)`` pairs of ``path``: ``IMAGE#N<TAB>caption`` lines, or one caption per line.

    The format is decided by the first non-empty line; ``image`` is ``None`` for plain text.
    """
    try:
        with open(path, encoding="utf-8-sig") as fh:
            lines = [line.rstrip("\r\n") for line in fh]
    except UnicodeDecodeError as error:
        raise PretrainError(f"{path}: not UTF-8 text ({error.reason} at byte {error.start}); expected "
                            "IMAGE#N<TAB>caption lines or one caption per line") from None
    except OSError as error:
        raise PretrainError(f"{path}: {error.strerror}") from None
    lines = [line for line in lines if line.strip()]
    if not lines:
        raise PretrainError(f"{path}: no captions (expected IMAGE#N<TAB>caption lines or one caption per line)")
    if _TOKEN_LINE.match(lines[0]) is None:
        return [(None, line.strip()) for line in lines]
    pairs = []
    for lineno, line in enumerate(lines, start=1):
        match = _TOKEN_LINE.match(line)
        if match is None:
            raise PretrainError(f"{path}: line {lineno} is not IMAGE#N<TAB>caption like the first: {line[:80]!r}")
        pairs.append((match["image"].strip(), match["caption"].strip()))
    return pairs


def prepare_caption_text(path: str, vocab: Vocabulary, max_len: int, dataset_images: Iterable[str],
                         val_captions: Iterable[str], seed: int) -> CaptionText:
    """Tokenise ``path``'s captions in ``vocab``, drop those that could leak, hold 1 % out."""
    pairs = read_caption_lines(path)
    known_images = set(dataset_images)
    val_texts = {tuple(normalize_caption(c)) for c in val_captions}
    rows: list[list[int]] = []
    same_photo = same_text = empty = words = unknown = 0
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
        ids = vocab.encode(tokens[:max_len])
        words += len(ids)
        unknown += sum(i == vocab.unk_id for i in ids)
        ids = [vocab.start_id] + ids + [vocab.end_id]
        rows.append(ids + [vocab.pad_id] * (max_len + 2 - len(ids)))
    if len(rows) < 2:
        raise PretrainError(f"{path}: {len(rows)} usable captions after filtering ({same_photo} of the "
                            f"dataset's own photos, {same_text} equal to validation captions, {empty} empty)")
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed))
    tokens_all = torch.tensor(rows, dtype=torch.long)[order]
    held = max(1, int(len(rows) * HELD_OUT_SHARE))
    report = {"file": path, "sha256": file_sha256(path), "lines": len(pairs), "captions": len(rows) - held,
              "held_out": held, "dropped_dataset_photos": same_photo, "dropped_val_captions": same_text,
              "dropped_empty": empty, "unknown_word_share": round(unknown / max(1, words), 4)}
    return CaptionText(tokens_all[held:], tokens_all[:held], report)


def _null_image(decoder: CaptionDecoder, device: str) -> torch.Tensor:
    """The constant picture the text is conditioned on: one all-zero region ``(1, 1, F)``."""
    return torch.zeros(1, 1, decoder.cfg.feature_dim, device=device)


def _batch_loss(decoder: CaptionDecoder, captions: torch.Tensor, device: str) -> tuple[torch.Tensor, int]:
    """Mean next-word cross-entropy of ``captions`` (cut to their longest) and their target-token count."""
    lengths = (captions != 0).sum(1)
    captions = captions[:, :int(lengths.max())].to(device)
    logits, _ = decoder(_null_image(decoder, device), captions, captions.shape[0])  # (N, T-1, V)
    targets = captions[:, 1:]
    loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=0)
    return loss, int((lengths - 1).sum())


@torch.no_grad()
def perplexity(decoder: CaptionDecoder, captions: torch.Tensor, runtime: RuntimeConfig,
               batch_size: int = 500) -> float:
    """Per-word perplexity of ``captions`` under the decoder given the null image (eval mode)."""
    was_training = decoder.training
    decoder.eval()
    total, tokens = 0.0, 0
    with _autocast(runtime):
        for start in range(0, captions.shape[0], batch_size):
            loss, n = _batch_loss(decoder, captions[start:start + batch_size], runtime.device)
            total, tokens = total + float(loss) * n, tokens + n
    decoder.train(was_training)
    return math.exp(total / max(1, tokens))


def _autocast(runtime: RuntimeConfig) -> torch.autocast:
    from batchcap.train import training_autocast  # train imports this module

    return training_autocast(runtime)


def pretrain_language_model(decoder: CaptionDecoder, text: CaptionText, runtime: RuntimeConfig, *, epochs: int,
                            batch_size: int, lr: float, warmup_steps: int, weight_decay: float,
                            grad_clip: float, seed: int, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Teacher-force ``decoder`` on ``text`` (null image, its own AdamW, warm-up + cosine); returns a report.

    The report (text statistics, held-out perplexity before and after, steps and seconds)
    goes into the model file's training record.
    """
    from batchcap.train import lr_factor  # the captioning schedule, so both stages read alike

    before = perplexity(decoder, text.held_out, runtime)
    optimizer = torch.optim.AdamW(decoder.parameters(), lr=lr, weight_decay=weight_decay)
    steps_per_epoch = math.ceil(text.train.shape[0] / batch_size)
    total = steps_per_epoch * epochs
    started = time.time()
    step = 0
    decoder.train()
    log(f"language-model pretraining on {text.train.shape[0]} captions ({text.report['file']}): {epochs} "
        f"epoch(s) of {steps_per_epoch} steps, {batch_size} captions a step; held-out perplexity {before:.1f}")
    for epoch in range(1, epochs + 1):
        order = torch.randperm(text.train.shape[0], generator=torch.Generator().manual_seed(seed + epoch))
        loss_sum, token_sum = 0.0, 0
        for start in range(0, len(order), batch_size):
            for group in optimizer.param_groups:
                group["lr"] = lr * lr_factor(step, warmup_steps, total)
            with _autocast(runtime):
                loss, tokens = _batch_loss(decoder, text.train[order[start:start + batch_size]], runtime.device)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(decoder.parameters(), grad_clip)
            optimizer.step()
            step += 1
            loss_sum, token_sum = loss_sum + float(loss.detach()) * tokens, token_sum + tokens
            if step % 100 == 0:
                log(f"pretraining step {step}/{total}: loss {loss_sum / token_sum:.3f} "
                    f"({time.time() - started:.0f} s)")
        log(f"pretraining epoch {epoch}: train loss {loss_sum / max(1, token_sum):.3f}")
    after = perplexity(decoder, text.held_out, runtime)
    seconds = round(time.time() - started, 1)
    log(f"pretraining done in {seconds:.0f} s: held-out perplexity {before:.1f} -> {after:.1f}")
    return {**text.report, "epochs": epochs, "steps": step, "batch_size": batch_size, "lr": lr,
            "seconds": seconds, "held_out_perplexity": {"before": round(before, 2), "after": round(after, 2)}}
