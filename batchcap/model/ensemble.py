"""Decoder ensembles: N caption decoders searched as one, inside the same ``(B, K)`` beam.

At every word each member scores the same hypotheses from its own ``(h, c)``, and their
log-probabilities are combined into one distribution the beam search ranks by:

* ``logprob`` (the default): the mean of the members' log-probabilities, renormalised
  (a product of experts: a word needs every member's support);
* ``prob``: the log of the mean of their probabilities (a mixture: one confident member
  is enough).

The search never learns it drives several decoders: the ensemble's state is the members'
states laid end to end, and the encoder memory and attention keys of each member stay one
copy per image (:attr:`EnsembleDecoder.per_image_state`). Members share the vocabulary,
the encoder and the preprocessing; their architectures may differ.

Members fine-tuned with their own exit flows (``--finetune-exit-flow``) keep them: the encoder
then lays each member's feature map beside the others' (member 0's first), and with
``split_features`` each member reads only its own ``feature_dim`` slice.

Unlike weight averaging (:mod:`batchcap.tools.average`), an ensemble works for decoders trained
from different random starts, and costs one decoder step per member at run time.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from batchcap.model.decoder import CaptionDecoder, State

COMBINE_RULES = ("logprob", "prob")


class EnsembleError(Exception):
    """Models that cannot be searched as one ensemble."""


class EnsembleDecoder(nn.Module):
    """Several :class:`CaptionDecoder` s behind one ``init_state`` / ``step`` interface."""

    def __init__(
        self, members: Sequence[CaptionDecoder], combine: str = "logprob", split_features: bool = False
    ) -> None:
        super().__init__()
        if combine not in COMBINE_RULES:
            raise EnsembleError(f"combine rule {combine!r}: expected one of {', '.join(COMBINE_RULES)}")
        if len(members) < 1:
            raise EnsembleError("an ensemble needs at least one decoder")
        if len({m.cfg.styles for m in members}) > 1:
            raise EnsembleError(
                "the decoders know different caption styles ("
                + "; ".join(", ".join(m.cfg.styles) or "none" for m in members)
                + "): ensemble models trained with the same --dataset-styles datasets"
            )
        self.members = nn.ModuleList(members)
        self.combine = combine
        #: Where each member's features start and end along the last dimension; None: all read the same.
        self.feature_slices: list[tuple[int, int]] | None = None
        if split_features:
            ends = [0]
            for member in members:
                ends.append(ends[-1] + member.cfg.feature_dim)
            self.feature_slices = list(zip(ends[:-1], ends[1:]))
        self._sizes = [len(m.per_image_state) for m in members]
        #: Concatenation of the members' flags, in the order of the concatenated state.
        self.per_image_state = tuple(flag for m in members for flag in m.per_image_state)

    def _split(self, state: State) -> list[State]:
        parts, start = [], 0
        for size in self._sizes:
            parts.append(tuple(state[start : start + size]))
            start += size
        return parts

    def _decoders(self) -> list[CaptionDecoder]:
        return list(self.members)  # type: ignore[arg-type]  # a ModuleList of CaptionDecoders

    def init_state(self, features: torch.Tensor, styles: torch.Tensor | None = None) -> State:
        """Every member's initial state from the features (and styles), laid end to end.

        With ``feature_slices``, member ``i`` reads ``features[..., start_i:end_i]`` only.
        """
        return tuple(
            t
            for member, member_features in zip(self._decoders(), self.member_features(features))
            for t in member.init_state(member_features, styles=styles)
        )

    def member_features(self, features: torch.Tensor) -> list[torch.Tensor]:
        """What each member reads of ``features``: its own slice, or all of them when members share an encoder."""
        if self.feature_slices is None:
            return [features] * len(self.members)
        expected = self.feature_slices[-1][1]
        if features.shape[-1] != expected:
            raise EnsembleError(
                f"features of {features.shape[-1]} dimensions, but the members' exit flows give {expected}: "
                "encode with this model's encoder (each member's exit flow side by side)"
            )
        return [features[..., start:end] for start, end in self.feature_slices]

    def step(self, tokens: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        """One word for N hypotheses: the combined fp32 log-probabilities ``(N, V)`` and new state.

        Tensors a member returns unchanged (its memory and keys) come back as the same
        objects, as the beam search requires of per-image state.
        """
        log_probs: list[torch.Tensor] = []
        new_state: list[torch.Tensor] = []
        for member, part in zip(self._decoders(), self._split(state)):
            member_lp, member_state = member.step(tokens, part)
            log_probs.append(member_lp.float())
            new_state.extend(member_state)
        return combine_log_probs(log_probs, self.combine), tuple(new_state)


def combine_log_probs(log_probs: Sequence[torch.Tensor], rule: str = "logprob") -> torch.Tensor:
    """One normalised ``(N, V)`` log-distribution from the members' ``(N, V)`` log-probabilities."""
    if len(log_probs) == 1:
        return log_probs[0]
    stacked = torch.stack(list(log_probs))  # (M, N, V)
    if rule == "logprob":
        return torch.log_softmax(stacked.mean(0), dim=-1)
    if rule == "prob":
        return torch.logsumexp(stacked, dim=0) - math.log(len(log_probs))
    raise EnsembleError(f"combine rule {rule!r}: expected one of {', '.join(COMBINE_RULES)}")
