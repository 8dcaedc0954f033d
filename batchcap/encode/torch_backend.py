"""The encode stage: a timm network turns ``uint8`` image batches into features.

Weights come from, in order: the model file (embedded, or the file it references,
found beside the model or among the packaged assets); ``--encoder-weights`` /
``BATCHCAP_ENCODER_WEIGHTS``; timm's ``pretrained=True`` download (online users).
With none of these the encoder is refused -- never silently random at captioning time.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from batchcap.config import EncoderConfig, Preprocess, RuntimeConfig
from batchcap.encode.exit_flow import ExitFlowError, SideBySideExitFlows, apply_exit_flow
from batchcap.encode.weights import ENV_WEIGHTS, EncoderError, WeightsSource, load_state_dict_file
from batchcap.hardware import autocast


def build_backbone(cfg: EncoderConfig, source: WeightsSource) -> Any:
    """The timm network as a feature extractor (``num_classes=0``) with weights loaded, eval mode.

    With several exit flows (an ensemble whose members each fine-tuned their own), the trunk
    followed by every exit flow, their maps side by side (:class:`SideBySideExitFlows`).
    """
    import timm

    try:
        if source.kind == "pretrained":
            model = timm.create_model(cfg.name, pretrained=True, num_classes=0)
        else:
            model = timm.create_model(cfg.name, pretrained=False, num_classes=0)
    except RuntimeError as exc:
        raise EncoderError(f"encoder {cfg.name!r}: {exc}") from exc
    except Exception as exc:
        if source.kind == "pretrained":
            raise EncoderError(
                f"could not download pretrained weights for {cfg.name!r} ({exc.__class__.__name__}: {exc}); "
                f"offline, pass --encoder-weights FILE or set {ENV_WEIGHTS}"
            ) from exc
        raise
    if source.kind != "pretrained":
        state = source.state if source.state is not None else load_state_dict_file(source.path or "")
        state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
        missing, unexpected = model.load_state_dict(state, strict=False)
        unexpected = [k for k in unexpected if not k.startswith(("fc.", "head.", "classifier."))]
        if missing or unexpected:
            raise EncoderError(
                f"encoder weights ({source.describe()}) do not fit {cfg.name!r}: "
                f"{len(missing)} missing keys (e.g. {missing[:3]}), {len(unexpected)} unexpected "
                f"(e.g. {unexpected[:3]}); check --encoder-name"
            )
    if source.exit_flow is not None:
        try:
            apply_exit_flow(model, source.exit_flow, source.describe())
            if source.member_exit_flows:
                return SideBySideExitFlows(model, source.member_exit_flows, source.describe()).eval()
        except ExitFlowError as exc:
            raise EncoderError(str(exc)) from exc
    return model.eval()


# -- the stage ----------------------------------------------------------------------------
class Encoder(nn.Module):
    """Normalise a ``uint8`` batch on the device and return fp32 features.

    Output is ``(B, R, F)`` (the spatial map, ``R = h * w`` regions) when ``spatial``,
    else pooled ``(B, F)``.
    """

    def __init__(
        self, backbone: nn.Module, preprocess: Preprocess, runtime: RuntimeConfig, spatial: bool = True
    ) -> None:
        super().__init__()
        self.backbone: Any = backbone  # a timm network: forward_features is timm's, untyped
        self.runtime = runtime
        self.spatial = spatial
        self.mean: torch.Tensor
        self.std: torch.Tensor
        self.register_buffer("mean", torch.tensor(preprocess.mean).view(1, 3, 1, 1) * 255.0)
        self.register_buffer("std", torch.tensor(preprocess.std).view(1, 3, 1, 1) * 255.0)
        self.to(runtime.device)
        if runtime.channels_last:
            self.backbone.to(memory_format=torch.channels_last)
        if torch.device(runtime.device).type == "cuda":
            torch.backends.cudnn.benchmark = True  # fixed input shapes: cuDNN picks its fastest kernels once

    @torch.inference_mode()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.to(self.runtime.device, non_blocking=True).float()  # (B, 3, H, W)
        x = (x - self.mean) / self.std
        if self.runtime.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(self.runtime):
            fmap = self.backbone.forward_features(x)  # (B, F, h, w)
        fmap = fmap.float()
        if self.spatial:
            return fmap.flatten(2).transpose(1, 2).contiguous()  # (B, h*w, F)
        return fmap.mean(dim=(2, 3))  # (B, F)
