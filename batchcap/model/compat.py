"""Whether two model files can be combined (averaged, or run as an ensemble): the same encoder, preprocessing
and vocabulary, and what differs when they are not.
"""

from __future__ import annotations

import torch

from batchcap.config import to_dict
from batchcap.model.modelfile import EXIT_FLOW, CaptionModel


def same_tensors(a: dict[str, torch.Tensor] | None, b: dict[str, torch.Tensor] | None) -> bool:
    """Both state dicts are absent, or hold the very same tensors under the same names."""
    if a is None or b is None:
        return a is None and b is None
    return a.keys() == b.keys() and all(torch.equal(v, b[k]) for k, v in a.items())


def same_encoder_state(a: CaptionModel, b: CaptionModel) -> bool:
    """Both models embed no encoder, or the very same encoder weights."""
    return same_tensors(a.encoder_state, b.encoder_state)


def same_exit_flow_keys(a: CaptionModel, b: CaptionModel) -> bool:
    """Both models store a fine-tuned exit flow (``--finetune-exit-flow``) with the same tensors, values aside."""
    return (
        a.encoder.finetuned == b.encoder.finetuned == EXIT_FLOW
        and a.encoder_state is not None
        and b.encoder_state is not None
        and a.encoder_state.keys() == b.encoder_state.keys()
        and all(v.shape == b.encoder_state[k].shape for k, v in a.encoder_state.items())
    )


def setup_differences(first: CaptionModel, other: CaptionModel, exit_flows_may_differ: bool = False) -> list[str]:
    """What besides the decoder sets ``other`` apart from ``first``: vocabulary, encoder, preprocessing,
    caption length, embedded encoder weights. Models that share all of these see the same pictures the
    same way and write in the same words (what averaging and ensembling both need).

    ``exit_flows_may_differ``: fine-tuned exit flows count as the same setup when their tensors
    match in name and shape (averaging averages them; an ensemble, which encodes once, cannot).
    """
    same_weights = same_encoder_state(first, other) or (exit_flows_may_differ and same_exit_flow_keys(first, other))
    return [
        what
        for what, same in (
            ("vocabulary", other.vocab == first.vocab),
            ("encoder", to_dict(other.encoder) == to_dict(first.encoder)),
            ("preprocessing", other.preprocess == first.preprocess),
            ("maximum caption length", other.max_caption_len == first.max_caption_len),
            ("embedded encoder weights", same_weights),
        )
        if not same
    ]
