"""``batchcap ensemble``: several trained decoders over one encoder, stored as one model file."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from batchcap.model.compat import setup_differences
from batchcap.model.ensemble import COMBINE_RULES, EnsembleError
from batchcap.model.modelfile import CaptionModel


def ensemble_models(models: Sequence[CaptionModel], combine: str = "logprob", name: str = "ensemble") -> CaptionModel:
    """One model file holding every decoder of ``models`` (ensembles are flattened), searched as one.

    The result keeps the first model's vocabulary, encoder, preprocessing and ending rule;
    it drops confidence calibration and scores, which belong to a single decoder's captions:
    refit them (``batchcap calibrate``, ``batchcap eval``). Members with embedded encoders
    must embed the same one: the ensemble runs one encoder pass for all its decoders.
    """
    if combine not in COMBINE_RULES:
        raise EnsembleError(f"combine rule {combine!r}: expected one of {', '.join(COMBINE_RULES)}")
    if len(models) < 2:
        raise EnsembleError("an ensemble needs at least two models")
    first = models[0]
    for other in models:
        differences = setup_differences(first, other)
        if (other.unendable_words, other.unendable_pairs) != (first.unendable_words, first.unendable_pairs):
            differences.append("ending rule")
        if other.repeatable_words != first.repeatable_words:
            differences.append("repeat rule")
        if differences:
            raise EnsembleError(
                f"{other.path or other.name} differs from {first.path or first.name} in {', '.join(differences)}; "
                "ensemble members must share the vocabulary, encoder, preprocessing and caption length "
                "(train them on the same data and encoder; decoders fine-tuned with different encoders "
                "cannot share one encoder pass)"
            )
    members = [
        replace(member, state={k: v.clone() for k, v in member.state.items()})  # a model given twice
        for model in models
        for member in model.decoders()
    ]  # must not share tensors in the file
    head = members[0]
    return replace(
        first,
        name=name,
        decoder=head.config,
        decoder_state=head.state,
        extra_decoders=tuple(members[1:]),
        combine=combine,
        training={"ensemble": [{"identity": m.identity, "training": m.training} for m in members]},
        metrics={},
        calibration=None,
        path=None,
        tensors_sha256="",
    )
