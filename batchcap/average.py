"""Weight averaging ("model soup"): one decoder whose weights are a weighted mean of several.

Decoders fine-tuned from one another (a cross-entropy model and its self-critical
fine-tune, or several fine-tunes of one start) stay in one basin of the loss, so the mean
of their weights captions about as well as an ensemble of them (Wortsman et al., 2022:
model soups; WiSE-FT) while costing one decoder at run time and on disk. Models trained
from different random starts do not average; evaluate the result (``batchcap eval``)
before using it.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Sequence

import torch

from batchcap.config import to_dict
from batchcap.modelfile import CaptionModel


class AverageError(Exception):
    """Models that cannot be averaged, or mixing weights that do not fit them."""


def same_encoder_state(a: CaptionModel, b: CaptionModel) -> bool:
    """Both models embed no encoder, or the very same encoder weights."""
    if a.encoder_state is None or b.encoder_state is None:
        return a.encoder_state is None and b.encoder_state is None
    return a.encoder_state.keys() == b.encoder_state.keys() and all(
        torch.equal(v, b.encoder_state[k]) for k, v in a.encoder_state.items())


def setup_differences(first: CaptionModel, other: CaptionModel) -> list[str]:
    """What besides the decoder sets ``other`` apart from ``first``: vocabulary, encoder, preprocessing,
    caption length, embedded encoder weights. Models that share all of these see the same pictures the
    same way and write in the same words (what averaging and ensembling both need)."""
    return [what for what, same in (
        ("vocabulary", other.vocab == first.vocab),
        ("encoder", to_dict(other.encoder) == to_dict(first.encoder)),
        ("preprocessing", other.preprocess == first.preprocess),
        ("maximum caption length", other.max_caption_len == first.max_caption_len),
        ("embedded encoder weights", same_encoder_state(first, other))) if not same]


def check_compatible(models: Sequence[CaptionModel]) -> None:
    """Refuse models that differ in anything but decoder weights (vocabulary, architecture, encoder)."""
    for model in models:
        if model.extra_decoders:
            raise AverageError(f"{model.path or model.name} is an ensemble of {len(model.decoders())} decoders; "
                               "average single-decoder models (or ensemble the averaged result)")
    first = models[0]
    for other in models[1:]:
        differences = setup_differences(first, other)
        if other.decoder != first.decoder:
            differences.append("decoder architecture")
        if differences:
            raise AverageError(f"{other.path or other.name} differs from {first.path or first.name} in "
                               f"{', '.join(differences)}; only decoders fine-tuned from one another "
                               "(batchcap train --init-model) can be averaged")


def average_models(models: Sequence[CaptionModel], weights: Sequence[float] | None = None,
                   name: str = "averaged") -> CaptionModel:
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
    state = {}
    for key, first in models[0].decoder_state.items():
        if first.is_floating_point():
            mean = sum(w * m.decoder_state[key].double() for w, m in zip(mix, models))  # float64: no drift
            state[key] = mean.float()
        else:
            state[key] = first.clone()
    members = [{"identity": m.identity, "weight": w, "training": m.training} for w, m in zip(mix, models)]
    return replace(models[0], name=name, decoder_state=state, training={"averaged": members}, metrics={},
                   path=None, tensors_sha256="")
