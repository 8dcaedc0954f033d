"""Self-critical sequence training: fine-tune a trained decoder on the CIDEr-D of its own captions.

Teacher forcing (cross-entropy on the reference words) trains the decoder on prefixes it
never produces at captioning time, and optimises word likelihood rather than the metric
captions are judged by. Self-critical training (Rennie et al., CVPR 2017) closes both
gaps with REINFORCE: the decoder *samples* ``S`` captions per image, each is rewarded
with its CIDEr-D against the image's references, and the gradient raises the
log-probability of captions that beat a baseline and lowers the others. The baseline is
the mean reward of the image's other ``S - 1`` samples (Luo, 2020: no extra greedy
decode, and lower variance than the greedy baseline of the original paper).

It starts from a cross-entropy model (``batchcap train --init-model``); from random
weights every sample scores zero and nothing is learned.

:class:`CiderD` is the reward. It computes exactly what ``pycocoevalcap``'s CIDEr-D
computes for one candidate, with the document frequencies fixed once from the training
references instead of recomputed from every batch (tested against pycocoevalcap).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from batchcap.model.cider import CiderD
from batchcap.model.decoder import CaptionDecoder
from batchcap.model.text import END, Vocabulary


class CaptionReward:
    """CIDEr-D of sampled captions against their image's references, counting the caption's end as a word.

    Plain CIDEr-D barely notices a caption cut short: "two dogs play in front of a" keeps
    most of the n-grams of "... in front of a house". Trained on it, a decoder learns to
    stop mid-phrase (16 % of dev captions did, in a measured run). Appending ``<end>`` to
    every reference and to every sample that ended (Luo's fix in self-critical.pytorch)
    makes "of a <end>" an n-gram no reference has, and a proper ending one they share.
    Document frequencies come from all ``references`` and each image's reference vectors
    are computed once, so a step only vectorises its samples.
    """

    def __init__(self, references: Sequence[Sequence[Sequence[str]]], vocab: Vocabulary) -> None:
        refs = [[[*ref, END] for ref in image_refs] for image_refs in references]
        self.cider = CiderD(refs)
        self.prepared = [self.cider.prepare(r) for r in refs]
        self.vocab = vocab

    def words(self, row: Sequence[int]) -> list[str]:
        """A sampled row as CIDEr-D sees it: its words, then ``<end>`` if it ended."""
        words = self.vocab.decode(row).split()
        return [*words, END] if self.vocab.end_id in row else words

    def __call__(self, images: Sequence[int], tokens: torch.Tensor, samples_per_image: int) -> torch.Tensor:
        """Rewards ``(len(images) * samples_per_image,)`` for image-major sampled ``tokens`` ``(N, T)``."""
        rewards = [
            self.cider.score(self.words(row), self.prepared[images[n // samples_per_image]])
            for n, row in enumerate(tokens.tolist())
        ]
        return torch.tensor(rewards, dtype=torch.float32)


@dataclass(frozen=True)
class Samples:
    """``N = M * S`` sampled captions, image-major, and the log-probabilities that chose them."""

    tokens: torch.Tensor  # long (N, T): word ids, <end> where a caption ended, pad after
    log_probs: torch.Tensor  # float (N, T): log p of each chosen token, 0 after <end>; differentiable
    mask: torch.Tensor  # float (N, T): 1 for the words and the <end> that were chosen


def sample_captions(
    decoder: CaptionDecoder,
    features: torch.Tensor,
    samples_per_image: int,
    max_len: int,
    *,
    start_id: int,
    end_id: int,
    pad_id: int,
    banned_ids: Sequence[int] = (),
    styles: torch.Tensor | None = None,
) -> Samples:
    """Sample ``samples_per_image`` captions for each image from the decoder's distribution.

    Runs with autograd on (unlike beam search) so the chosen tokens' log-probabilities
    carry gradients. ``banned_ids`` are never sampled; ``<end>`` is not allowed as the
    first word (an empty caption). ``styles`` ``(M,)``: each image's caption style.
    """
    state = decoder.init_state(features, samples_per_image, styles)
    rows = state[0].shape[0]
    device = state[0].device
    tokens = torch.full((rows,), start_id, dtype=torch.long, device=device)
    alive = torch.ones(rows, dtype=torch.bool, device=device)
    banned = torch.zeros(decoder.cfg.vocab_size, dtype=torch.bool, device=device)
    banned[list(banned_ids)] = True
    first_banned = banned.clone()
    first_banned[end_id] = True
    chosen, picked_logp, masks = [], [], []
    for t in range(max_len + 1):
        log_probs, state = decoder.step(tokens, state)  # (N, V) fp32
        never = first_banned if t == 0 else banned
        log_probs = torch.log_softmax(log_probs.masked_fill(never, -math.inf), -1)  # renormalised
        if t == max_len:  # the last position can only end the caption
            token = torch.full((rows, 1), end_id, dtype=torch.long, device=device)
        else:
            with torch.no_grad():
                token = torch.multinomial(log_probs.exp(), 1)  # (N, 1)
        step_mask = alive.float()
        picked_logp.append(log_probs.gather(1, token).squeeze(1) * step_mask)
        masks.append(step_mask)
        token = token.squeeze(1)
        chosen.append(torch.where(alive, token, torch.full_like(token, pad_id)))
        alive = alive & (token != end_id)
        tokens = token
        if not bool(alive.any()):
            break
    return Samples(torch.stack(chosen, 1), torch.stack(picked_logp, 1), torch.stack(masks, 1))


def self_critical_loss(samples: Samples, rewards: torch.Tensor, samples_per_image: int) -> torch.Tensor:
    """REINFORCE loss with the leave-one-out baseline: each sample against the mean of its image's others.

    ``rewards`` is ``(N,)`` image-major. The loss is averaged over chosen tokens, so long
    and short captions weigh by their length, as in the reference implementations.
    """
    per_image = rewards.view(-1, samples_per_image)  # (M, S)
    baseline = (per_image.sum(1, keepdim=True) - per_image) / max(1, samples_per_image - 1)
    advantage = (per_image - baseline).reshape(-1, 1).to(samples.log_probs.device)  # (N, 1)
    return -(advantage * samples.log_probs * samples.mask).sum() / samples.mask.sum().clamp(min=1.0)
