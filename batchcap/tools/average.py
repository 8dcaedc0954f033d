"""Weight averaging ("model soup"): one decoder whose weights are a weighted mean of several.

Decoders fine-tuned from one another (a cross-entropy model and its self-critical
fine-tune, or several fine-tunes of one start) stay in one basin of the loss, so the mean
of their weights captions about as well as an ensemble of them (Wortsman et al., 2022:
model soups; WiSE-FT) while costing one decoder at run time and on disk. Models trained
from different random starts do not average; evaluate the result (``batchcap eval``)
before using it. Models whose exit flow was fine-tuned with the decoder
(``--finetune-exit-flow``) average their exit flows too, with the same weights.
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Sequence
from dataclasses import replace

import torch

from batchcap.model.compat import setup_differences
from batchcap.model.modelfile import EXIT_FLOW, CaptionModel


class AverageError(Exception):
    """Models that cannot be averaged, or mixing weights that do not fit them."""


def check_compatible(models: Sequence[CaptionModel]) -> None:
    """Refuse models that differ in anything but decoder weights (vocabulary, architecture, encoder)."""
    for model in models:
        if model.extra_decoders:
            raise AverageError(
                f"{model.path or model.name} is an ensemble of {len(model.decoders())} decoders; "
                "average single-decoder models (or ensemble the averaged result)"
            )
    first = models[0]
    for other in models[1:]:
        differences = setup_differences(first, other, exit_flows_may_differ=True)
        if other.decoder != first.decoder:
            differences.append("decoder architecture")
        if differences:
            raise AverageError(
                f"{other.path or other.name} differs from {first.path or first.name} in "
                f"{', '.join(differences)}; only decoders fine-tuned from one another "
                "(batchcap train --init-model) can be averaged"
            )


def average_models(
    models: Sequence[CaptionModel], weights: Sequence[float] | None = None, name: str = "averaged"
) -> CaptionModel:
    """A model whose decoder weights are the ``weights``-weighted mean of ``models``' (equal by default).

    Weights are normalised to sum to one. The result keeps everything else of the first
    model; its training record lists each member's identity, weight and training record.
    Its scores are unknown until it is evaluated, so it records none.
    """
    if not models:
        raise AverageError("no models to average")
    weights = [1.0] * len(models) if weights is None else [float(w) for w in weights]
    if len(weights) != len(models):
        raise AverageError(f"{len(weights)} weights for {len(models)} models; give one weight per model")
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        raise AverageError(f"weights must be non-negative and not all zero (got {weights})")
    check_compatible(models)
    total = sum(weights)
    mix = [w / total for w in weights]
    state = weighted_mean([m.decoder_state for m in models], mix)
    encoder_state = models[0].encoder_state
    if models[0].encoder.finetuned == EXIT_FLOW:  # fine-tuned from one another too: the exit flows average
        encoder_state = weighted_mean([m.encoder_state or {} for m in models], mix)
    members = [{"identity": m.identity, "weight": w, "training": m.training} for w, m in zip(mix, models)]
    return replace(
        models[0],
        name=name,
        decoder_state=state,
        encoder_state=encoder_state,
        training={"averaged": members},
        metrics={},
        path=None,
        tensors_sha256="",
    )


def weighted_mean(states: Sequence[dict[str, torch.Tensor]], mix: Sequence[float]) -> dict[str, torch.Tensor]:
    """``sum(mix[i] * states[i])`` for floating tensors (in float64: no drift); others from the first state."""
    mean = {}
    for key, first in states[0].items():
        if first.is_floating_point():
            terms = [w * s[key].double() for w, s in zip(mix, states)]
            mean[key] = functools.reduce(operator.add, terms).float()
        else:
            mean[key] = first.clone()
    return mean
