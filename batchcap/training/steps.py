"""One training step, for teacher forcing and self-critical training alike: the loss, the schedule, the
precision, and the running totals a log line reports.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from batchcap.config import RuntimeConfig, TrainConfig
from batchcap.data.captions.records import CaptionRecord
from batchcap.hardware import cuda_is_ampere_or_newer
from batchcap.model.decoder import CaptionDecoder
from batchcap.model.text import Vocabulary
from batchcap.training.scst import CaptionReward, sample_captions, self_critical_loss


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warm-up to 1, then cosine decay to 0.1 at ``total`` steps."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def training_autocast(runtime: RuntimeConfig) -> torch.autocast:
    """bf16 autocast when the precision is bf16, else off: what training and its validation share.

    fp16 is not used for training (it would need loss scaling): ``--precision fp16``
    trains in fp32.
    """
    return torch.autocast(torch.device(runtime.device).type, dtype=torch.bfloat16, enabled=runtime.precision == "bf16")


def use_tf32(device: str) -> bool:
    """Let fp32 matmuls use TF32 tensor cores on Ampere and later GPUs (for this process).

    Training's fp32 work (the master weights' optimizer maths, fp32 runs) speeds up by
    several times at a 10-bit mantissa, plenty for SGD. Returns whether it was enabled.
    """
    if torch.device(device).type != "cuda" or not cuda_is_ampere_or_newer(torch.device(device)):
        return False
    torch.set_float32_matmul_precision("high")  # TF32; cuDNN convolutions use TF32 by default
    return True


@dataclass
class StepTotals:
    """Sums over an epoch's steps, kept on the device so that a step never waits for the GPU."""

    loss: torch.Tensor  # fp32 scalar: sum of loss x tokens
    tokens: torch.Tensor  # fp32 scalar
    reward: torch.Tensor  # fp32 scalar: sum of self-critical rewards
    images: int = 0

    @classmethod
    def zeros(cls, device: str) -> StepTotals:
        return cls(torch.zeros((), device=device), torch.zeros((), device=device), torch.zeros((), device=device))

    def add(self, step: StepResult, images: int) -> None:
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

    def __init__(
        self,
        decoder: CaptionDecoder,
        trained: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        cfg: TrainConfig,
        runtime: RuntimeConfig,
        vocab: Vocabulary,
        split: Split,
        total_steps: int,
        rewarder: CaptionReward | None = None,
        styles: torch.Tensor | None = None,
    ) -> None:
        """``styles`` ``(M,)``: the caption style of each of the split's images (a decoder with styles)."""
        self.decoder, self.trained, self.optimizer = decoder, trained, optimizer
        self.styles = styles
        self.cfg, self.runtime, self.vocab, self.split = cfg, runtime, vocab, split
        self.total_steps, self.rewarder = total_steps, rewarder
        self.per_image: list[list[int]] = [[] for _ in split.image_ids]
        for c, owner in enumerate(split.caption_image.tolist()):
            self.per_image[owner].append(c)
        self.per_step = int(cfg.extra.get("captions_per_image", 5))
        self.attention_penalty = float(cfg.extra.get("attention_penalty", 1.0))
        self.label_smoothing = float(cfg.extra.get("label_smoothing", 0.0))

    def __call__(self, step: int, images: list[int], feats: torch.Tensor, generator: torch.Generator) -> StepResult:
        """Train on ``images`` (indices into the split) with their features ``(M, R, F)`` on the device."""
        cfg, vocab = self.cfg, self.vocab
        styles = None if self.styles is None else self.styles[images].to(feats.device, non_blocking=True)
        for group in self.optimizer.param_groups:
            group["lr"] = group["base_lr"] * lr_factor(step, cfg.warmup_steps, self.total_steps)
        with training_autocast(self.runtime):
            if self.rewarder is not None:
                samples = sample_captions(
                    self.decoder,
                    feats,
                    cfg.samples_per_image,
                    cfg.max_caption_len,
                    start_id=vocab.start_id,
                    end_id=vocab.end_id,
                    pad_id=vocab.pad_id,
                    banned_ids=vocab.never_generated,
                    styles=styles,
                )
                rewards = self.rewarder(images, samples.tokens, cfg.samples_per_image)
                loss = self_critical_loss(samples, rewards, cfg.samples_per_image)
                result = StepResult(loss, samples.mask.sum(), rewards.sum())
            else:
                rows = [c for i in images for c in _pick(self.per_image[i], self.per_step, generator)]
                captions, tokens = reference_captions(self.split.captions[rows], vocab.pad_id)
                loss = teacher_forced_loss(
                    self.decoder,
                    feats,
                    captions.to(feats.device, non_blocking=True),
                    self.per_step,
                    vocab.pad_id,
                    self.attention_penalty,
                    self.label_smoothing,
                    styles,
                )
                result = StepResult(loss, tokens)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.trained.parameters(), cfg.grad_clip)
        self.optimizer.step()
        return result


def reference_captions(captions: torch.Tensor, pad_id: int) -> tuple[torch.Tensor, int]:
    """CPU captions ``(N, T)`` cut to the longest one, and the number of target tokens (after ``<start>``)."""
    lengths = (captions != pad_id).sum(1)  # (N,)
    return captions[:, : int(lengths.max())], int((lengths - 1).sum())


def teacher_forced_loss(
    decoder: CaptionDecoder,
    feats: torch.Tensor,
    caps: torch.Tensor,
    per_step: int,
    pad_id: int,
    attention_penalty: float,
    label_smoothing: float,
    styles: torch.Tensor | None = None,
) -> torch.Tensor:
    """Cross-entropy on the reference words (plus SAT's attention penalty) for captions cut to length."""
    logits, alphas = decoder(feats, caps, per_step, styles)  # (N, T-1, V), (N, T-1, R)
    logits = logits.float()
    targets = caps[:, 1:]
    loss = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=pad_id, label_smoothing=label_smoothing
    )
    if alphas is not None and attention_penalty > 0:
        mask = (targets != pad_id).float()[:, :, None]  # (N, T-1, 1)
        coverage = (alphas.float() * mask).sum(1)  # (N, R)
        loss = loss + attention_penalty * ((1.0 - coverage) ** 2).mean()
    return loss


def _pick(captions: list[int], count: int, generator: torch.Generator) -> list[int]:
    """Exactly ``count`` of an image's captions: a random subset, or all plus random repeats."""
    if len(captions) == count:
        return captions
    if len(captions) > count:
        picks = torch.randperm(len(captions), generator=generator)[:count].tolist()
        return [captions[i] for i in picks]
    extra = torch.randint(len(captions), (count - len(captions),), generator=generator).tolist()
    return captions + [captions[i] for i in extra]


@dataclass
class Split:
    """One split in memory: features per image, and every caption as padded token ids."""

    image_ids: list[str]
    features: torch.Tensor  # fp16 (M, R, F); empty when fine-tuning the encoder
    records: list[CaptionRecord]
    captions: torch.Tensor  # long (C, T) = <start> w.. <end> <pad>..
    caption_image: torch.Tensor  # long (C,) index into image_ids
    references: dict[str, list[str]]  # raw reference captions, for scoring
