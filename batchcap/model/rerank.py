"""Consensus reranking: the search's captions reordered by what people wrote for similar pictures.

A beam search ranks its hypotheses by the decoder's probability alone, and the likeliest caption is
often the safest, most generic one. Consensus reranking (Devlin et al., "Exploring Nearest Neighbor
Approaches for Image Captioning", 2015) reranks them by how well they agree with the reference
captions of the picture's nearest training pictures: a caption that says what people said of
pictures like this one is more often right. Here a hypothesis' reranking score is

    mean token log-probability + weight * consensus

where ``consensus`` is :meth:`batchcap.model.confidence.Neighbours.consensus`: the CIDEr-D of the
hypothesis against each neighbour's references, weighted towards the closest neighbours. The mean
(not the sum) of the log-probabilities keeps short captions from winning by length alone.

What it gains on both dev sets, and the sweep of weights and beams it was chosen by, are in
docs/experiments.md.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from batchcap.model.beam import BeamResult, token_logprobs_mean


def rerank_by_consensus(result: BeamResult, consensus: np.ndarray, weight: float) -> tuple[BeamResult, np.ndarray]:
    """Each image's hypotheses of ``result`` reordered by ``mean log-prob + weight * consensus``, best first.

    ``consensus`` is float64 ``(B, m)`` with ``m <= n_best``, one column per hypothesis in the
    search's order (NaN or missing columns: no hypothesis there). The returned result's ``scores``
    are the reranking scores (``-inf`` where the search found no finite hypothesis, which stay
    last); ties keep the search's order. Also returns ``consensus`` in the new order, ``(B, n_best)``.
    """
    batch, n_best = result.scores.shape
    values = np.full((batch, n_best), np.nan)
    values[:, : consensus.shape[1]] = consensus
    agreement = torch.from_numpy(values)  # (B, n) float64
    mean = token_logprobs_mean(result).detach().to("cpu", torch.float64)  # (B, n)
    searched = torch.isfinite(result.scores.detach().cpu())  # (B, n) slots holding a hypothesis
    score = torch.where(searched, mean + weight * torch.nan_to_num(agreement, nan=0.0), -torch.inf)
    order = torch.sort(score, dim=1, descending=True, stable=True).indices  # (B, n) on CPU

    def reorder(tensor: torch.Tensor) -> torch.Tensor:
        index = order.to(tensor.device)
        if tensor.dim() == 3:
            index = index[:, :, None].expand(-1, -1, tensor.shape[2])
        return tensor.gather(1, index)

    reranked = dataclasses.replace(
        result,
        tokens=reorder(result.tokens),
        lengths=reorder(result.lengths),
        scores=score.gather(1, order).to(result.scores.device, torch.float32),
        ended=reorder(result.ended),
        token_logprobs=None if result.token_logprobs is None else reorder(result.token_logprobs),
    )
    return reranked, agreement.gather(1, order).numpy()
