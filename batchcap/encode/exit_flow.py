"""Fine-tuning Xception's exit flow on cached middle-flow activations (what a CPU can afford).

Xception is three flows: entry (``conv1`` .. ``block3``), middle (``block4`` .. ``block11``,
728 channels at 19x19) and exit (``block12``, ``conv3``/``conv4``: 728 -> 2048 channels at
10x10). The exit flow is about a ninth of the network's multiply-adds but most of its
high-level, task-specific features, so training only it (with the decoder) is the classic
cheap fine-tune:

* ``batchcap train --finetune-exit-flow`` caches the *trunk* (entry + middle flow) output
  once per picture, like the feature cache (layer ``block11``, fp16, 525 KB a picture), and
  each step runs only the exit flow forward and backward from it;
* the model file stores only the exit flow's tensors (``encoder.block12.*`` ...), with
  ``encoder.finetuned = "exit_flow"``; the rest of the encoder is still the weights file
  the spec names, so the shipped package does not carry a second copy of Xception.

Batch-norm statistics stay frozen (eval mode), as in ``--finetune-encoder``: a few dozen
pictures a step would only add noise to ImageNet's.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import nn

#: The layer whose output the trunk cache holds (the last block of the middle flow).
TRUNK_LAYER = "block11"
#: timm's ``legacy_xception`` children, in forward order, split where the middle flow ends.
TRUNK_MODULES = ("conv1", "bn1", "act1", "conv2", "bn2", "act2", *(f"block{n}" for n in range(1, 12)))
EXIT_MODULES = ("block12", "conv3", "bn3", "act3", "conv4", "bn4", "act4")
SUPPORTED = ("legacy_xception",)


class ExitFlowError(Exception):
    """An exit-flow fine-tune or model file that cannot work (another encoder, missing tensors)."""


def check_supported(encoder_name: str, spatial: bool) -> None:
    """Refuse encoders whose layout this split does not know, and pooled features."""
    if encoder_name not in SUPPORTED:
        raise ExitFlowError(
            f"--finetune-exit-flow knows the layout of {', '.join(SUPPORTED)} only, not "
            f"{encoder_name!r}; use --finetune-encoder to fine-tune the whole encoder"
        )
    if not spatial:
        raise ExitFlowError("--finetune-exit-flow needs spatial features (leave out --pooled)")


class _Flow(nn.Module):
    """Some of a backbone's children under their own names, so state-dict keys stay the backbone's."""

    def __init__(self, backbone: nn.Module, names: tuple[str, ...]) -> None:
        super().__init__()
        missing = [n for n in names if not hasattr(backbone, n)]
        if missing:
            raise ExitFlowError(f"the encoder has no {', '.join(missing)}: not timm's legacy_xception layout")
        self.names = names
        for name in names:
            self.add_module(name, getattr(backbone, name))  # shared with the backbone, not copied

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for name in self.names:
            x = getattr(self, name)(x)
        return x


class XceptionTrunk(_Flow):
    """Entry and middle flow: pictures ``(B, 3, H, W)`` to ``(B, 728, h, w)`` block-11 activations."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__(backbone, TRUNK_MODULES)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The name :class:`batchcap.encode.torch_backend.Encoder` calls, so the trunk encodes like a backbone."""
        return self(x)


class XceptionExitFlow(_Flow):
    """The exit flow: block-11 activations ``(B, 728, h, w)`` to the ``(B, 2048, h/2, w/2)`` feature map."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__(backbone, EXIT_MODULES)


class SideBySideExitFlows(nn.Module):
    """The trunk once, then several exit flows on its output: their feature maps side by side.

    What an ensemble of decoders fine-tuned with their own exit flows encodes with: ``forward_features``
    gives ``(B, 2048 * n, h, w)``, the backbone's own exit flow first and then one per entry of
    ``exit_flows``, so each decoder finds its own channels (:class:`batchcap.model.ensemble.EnsembleDecoder`).
    Costs one more exit flow (about a ninth of the network) per extra member.
    """

    def __init__(self, backbone: nn.Module, exit_flows: Sequence[dict[str, torch.Tensor]], what: str) -> None:
        super().__init__()
        self.trunk = XceptionTrunk(backbone)
        first = XceptionExitFlow(backbone)
        others = []
        for i, state in enumerate(exit_flows, 1):
            flow = copy.deepcopy(first)  # the exit modules only: the trunk stays one copy
            apply_exit_flow(flow, state, f"{what}, member {i}'s exit flow")
            others.append(flow)
        self.exit_flows = nn.ModuleList([first, *others])
        self.num_features = int(getattr(backbone, "num_features", 2048)) * len(self.exit_flows)
        self.pretrained_cfg = getattr(backbone, "pretrained_cfg", {})

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Pictures ``(B, 3, H, W)`` to every exit flow's map, concatenated along channels."""
        trunk = self.trunk(x)
        return torch.cat([flow(trunk) for flow in self.exit_flows], dim=1)


def trunk_to_map(rows: torch.Tensor) -> torch.Tensor:
    """Cached trunk rows ``(M, R, C)`` (regions first, as the cache stores them) to ``(M, C, h, w)``."""
    side = int(round(rows.shape[1] ** 0.5))
    if side * side != rows.shape[1]:
        raise ExitFlowError(f"trunk activations with {rows.shape[1]} regions are not a square map")
    return rows.transpose(1, 2).reshape(rows.shape[0], rows.shape[2], side, side)


def apply_exit_flow(backbone: nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """Load a model file's exit-flow tensors into ``backbone``; refuse any that do not fit it exactly."""
    expected = (
        {f"{n}.{k}" for n in EXIT_MODULES for k in getattr(backbone, n).state_dict()}
        if all(hasattr(backbone, n) for n in EXIT_MODULES)
        else set()
    )
    unknown = sorted(set(state) - expected)
    missing = sorted(expected - set(state))
    if unknown or missing or not expected:
        raise ExitFlowError(
            f"{what}: the exit-flow tensors do not fit the encoder ({len(missing)} missing, e.g. "
            f"{missing[:2]}; {len(unknown)} unexpected, e.g. {unknown[:2]}); the model file is "
            "corrupt or for another encoder"
        )
    current = backbone.state_dict()
    backbone.load_state_dict({**current, **{k: v.to(current[k].dtype) for k, v in state.items()}})


def exit_flow_state(head: XceptionExitFlow) -> dict[str, torch.Tensor]:
    """The exit flow's tensors under the backbone's key names, on the CPU: what the model file stores."""
    return {k: v.detach().cpu().clone() for k, v in head.state_dict().items()}
