"""Training on several datasets: how an epoch draws from each, and how validation picks the best epoch.

* An epoch is as many draws as there are training images in all the datasets together. Without
  weights each image is drawn once (one shuffled concatenation). With weights, dataset ``d`` gets
  ``w_d / sum(w)`` of the draws, dealt from an endless stream of shuffles of the whole dataset
  that carries on from one epoch to the next: every image comes round before any comes round
  again, so an oversampled dataset shows each image about ``count / size`` times an epoch and an
  undersampled one shows all of itself within ``ceil(size / count)`` epochs. The draws of all
  datasets are then shuffled together. Everything follows from ``--seed`` and the epoch number.
* Validation scores each dataset's dev split on its own (CIDEr-D's document frequencies come from
  that split's references), and the epoch kept is the one with the best selection score:
  the mean of the datasets' CIDEr-D (``mean``), the lowest (``min``) or the first dataset's (``first``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

SELECTIONS = ("mean", "min", "first")


def draw_counts(total: int, weights: Sequence[float]) -> list[int]:
    """How many of ``total`` draws each dataset gets: shares of ``weights``, rounded by largest remainder.

    Every dataset gets at least one draw, so none is left out of an epoch.
    """
    exact = [total * w / sum(weights) for w in weights]
    counts = [max(1, math.floor(x)) for x in exact]
    by_remainder = sorted(range(len(weights)), key=lambda d: exact[d] - math.floor(exact[d]), reverse=True)
    for d in by_remainder[: max(0, total - sum(counts))]:
        counts[d] += 1
    return counts


def epoch_order(
    owners: Sequence[int], weights: Sequence[float], generator: torch.Generator, *, seed: int = 0, epoch: int = 1
) -> list[int]:
    """Indices into the training split, in the order epoch ``epoch`` (from 1) visits them.

    ``owners[i]`` is the dataset of image ``i``. Without ``weights`` this is one random
    permutation from ``generator`` (what training on one dataset has always done); with them,
    see the module notes: ``seed`` seeds each dataset's stream of shuffles, ``generator`` the
    final mixing.
    """
    if not weights:
        return torch.randperm(len(owners), generator=generator).tolist()
    members: list[list[int]] = [[] for _ in weights]
    for index, owner in enumerate(owners):
        members[owner].append(index)
    draws: list[int] = []
    for dataset, (images, count) in enumerate(zip(members, draw_counts(len(owners), weights))):
        if images:
            draws += [images[i] for i in _dealt(len(images), (epoch - 1) * count, count, seed, dataset)]
    shuffle = torch.randperm(len(draws), generator=generator).tolist()
    return [draws[i] for i in shuffle]


def _dealt(size: int, start: int, count: int, seed: int, dataset: int) -> list[int]:
    """Positions ``start .. start + count`` of dataset ``dataset``'s endless stream of shuffles of ``range(size)``."""
    out: list[int] = []
    for shuffle in range(start // size, (start + count - 1) // size + 1):
        generator = torch.Generator().manual_seed((seed * 1_000_003 + dataset * 10_007 + shuffle) % 2**63)
        order = torch.randperm(size, generator=generator).tolist()
        begin = max(0, start - shuffle * size)
        end = min(size, start + count - shuffle * size)
        out += order[begin:end]
    return out


def selection_score(per_dataset: dict[str, dict[str, Any]], rule: str) -> float:
    """The number the best epoch is chosen by: the datasets' CIDEr-D combined by ``rule``."""
    values = [float(scores["CIDEr"]) for scores in per_dataset.values()]
    if rule == "first":
        return values[0]
    if rule == "min":
        return min(values)
    if rule == "mean":
        return sum(values) / len(values)
    raise ValueError(f"unknown selection rule {rule!r}: expected one of {', '.join(SELECTIONS)}")


def combined_scores(per_dataset: dict[str, dict[str, Any]], rule: str) -> dict[str, Any]:
    """One validation record for several datasets: each metric's mean, CIDEr by the selection rule.

    ``CIDEr`` is the selection score (what ``--patience`` and the best epoch follow), ``BLEU-*``
    the mean over datasets; the datasets' own scores stay in ``datasets``.
    """
    names = [k for k, v in next(iter(per_dataset.values())).items() if k.startswith("BLEU") and v is not None]
    out: dict[str, Any] = {name: sum(float(s[name]) for s in per_dataset.values()) / len(per_dataset) for name in names}
    out["CIDEr"] = selection_score(per_dataset, rule)
    out["selected_by"] = f"{rule} of the datasets' CIDEr-D"
    first = next(iter(per_dataset.values()))
    out["tokenizer"] = first.get("tokenizer")
    out["examples"] = [example for scores in per_dataset.values() for example in scores.get("examples", [])[:1]]
    out["datasets"] = {
        name: {k: v for k, v in scores.items() if k != "examples"} for name, scores in per_dataset.items()
    }
    return out
