"""``batchcap ensemble``: several trained decoders stored as one model file, searched as one.

Members that share one encoder share one encoder pass. Members fine-tuned with their own exit
flows (``--finetune-exit-flow``, over the same base weights) keep them: the ensemble's encoder runs
the trunk once and each member's exit flow on it, and each decoder reads its own features.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import torch

from batchcap.model.compat import same_tensors, setup_differences
from batchcap.model.ensemble import COMBINE_RULES, EnsembleError
from batchcap.model.modelfile import EXIT_FLOW, CaptionModel, DecoderMember


def ensemble_models(models: Sequence[CaptionModel], combine: str = "logprob", name: str = "ensemble") -> CaptionModel:
    """One model file holding every decoder of ``models`` (ensembles are flattened), searched as one.

    The result keeps the first model's vocabulary, encoder, preprocessing and ending rule;
    it drops confidence calibration and scores, which belong to a single decoder's captions:
    refit them (``batchcap calibrate``, ``batchcap eval``). Members with embedded encoders
    must embed the same one, or each a fine-tuned exit flow of the same base weights: then
    every member keeps its own, and the familiarity statistics and neighbours, fitted on
    one exit flow's features, are dropped too (``batchcap calibrate`` fits them again).
    """
    if combine not in COMBINE_RULES:
        raise EnsembleError(f"combine rule {combine!r}: expected one of {', '.join(COMBINE_RULES)}")
    if len(models) < 2:
        raise EnsembleError("an ensemble needs at least two models")
    first = models[0]
    shared = all(_one_exit_flow(m) and same_tensors(_flows(m)[0], _flows(first)[0]) for m in models)
    per_member = not shared and all(m.encoder.finetuned == EXIT_FLOW for m in models)
    for other in models:
        differences = setup_differences(first, other, exit_flows_may_differ=per_member)
        if (other.unendable_words, other.unendable_pairs) != (first.unendable_words, first.unendable_pairs):
            differences.append("ending rule")
        if other.repeatable_words != first.repeatable_words:
            differences.append("repeat rule")
        if differences:
            raise EnsembleError(
                f"{other.path or other.name} differs from {first.path or first.name} in {', '.join(differences)}; "
                "ensemble members must share the vocabulary, encoder, preprocessing and caption length "
                "(train them on the same data and encoder weights; members fine-tuned with "
                "--finetune-exit-flow keep their own exit flows, other fine-tuned encoders cannot be joined)"
            )
    members = [
        replace(
            member,
            state={k: v.clone() for k, v in member.state.items()},  # a model given twice must not share tensors
            exit_flow=_cloned(flow) if per_member else None,
        )
        for model in models
        for member, flow in zip(model.decoders(), _flows(model))
    ]
    head = members[0]
    return replace(
        first,
        # fitted on member 0's features alone: calibrate fits them again on the joined ones
        familiarity=None if per_member else first.familiarity,
        neighbours=None if per_member else first.neighbours,
        encoder_state=head.exit_flow if per_member else first.encoder_state,
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


def _flows(model: CaptionModel) -> list[dict[str, torch.Tensor] | None]:
    """The exit flow (or embedded encoder) each of ``model``'s decoders reads, member 0 first."""
    members: list[DecoderMember] = model.decoders()
    if model.exit_flow_per_member:
        return [m.exit_flow for m in members]
    return [model.encoder_state] * len(members)


def _one_exit_flow(model: CaptionModel) -> bool:
    """Every decoder of ``model`` reads the same encoder."""
    flows = _flows(model)
    return all(same_tensors(flow, flows[0]) for flow in flows)


def _cloned(state: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor] | None:
    return None if state is None else {k: v.clone() for k, v in state.items()}
