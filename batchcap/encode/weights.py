"""Where an encoder's weights come from, in order: the model file (embedded, or the file it references,
found beside the model or among the packaged assets); ``--encoder-weights`` / ``BATCHCAP_ENCODER_WEIGHTS``;
timm's ``pretrained=True`` download (online users). With none of these the encoder is refused --
never silently random at captioning time.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from batchcap.config import EncoderConfig
from batchcap.fileio import file_sha256, tensors_sha256
from batchcap.model.modelfile import ASSETS_DIR, CaptionModel, check_encoder_weights

ENV_WEIGHTS = "BATCHCAP_ENCODER_WEIGHTS"


# -- weights -----------------------------------------------------------------------------
def load_state_dict_file(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """A state dict from safetensors, or from a torch file loaded with ``weights_only=True``."""
    path = Path(path)
    if not path.is_file():
        raise EncoderError(f"encoder weights {path}: no such file")
    with open(path, "rb") as fh:
        head = fh.read(8)
    if head[:2] == b"PK" or head[:1] == b"\x80":  # zip (torch.save) or legacy pickle
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise EncoderError(f"encoder weights {path}: not a loadable weights-only state dict ({exc})") from exc
        if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
            state = state["state_dict"]
        if not isinstance(state, dict):
            raise EncoderError(f"encoder weights {path}: expected a state dict, found {type(state).__name__}")
        return state
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as exc:
        raise EncoderError(f"encoder weights {path}: not a safetensors or torch weights file ({exc})") from exc


@dataclass(frozen=True)
class WeightsSource:
    """Where the encoder's weights come from: a state dict in memory, a file, or timm's download."""

    kind: str  # "embedded" | "file" | "pretrained"
    path: str | None = None
    state: dict[str, torch.Tensor] | None = None
    file_sha256: str | None = None  # the file's, when the model's check already hashed it
    #: A model file's fine-tuned exit flow, loaded over the file's or the download's weights.
    exit_flow: dict[str, torch.Tensor] | None = None
    #: An ensemble's further members' own exit flows, each run beside ``exit_flow`` on the shared trunk.
    member_exit_flows: tuple[dict[str, torch.Tensor], ...] = ()

    def describe(self) -> str:
        base = {"embedded": "embedded in the model file", "pretrained": "timm pretrained download"}.get(
            self.kind, str(self.path)
        )
        if self.member_exit_flows:
            return base + f" with the model file's {1 + len(self.member_exit_flows)} fine-tuned exit flows"
        return base + (" with the model file's fine-tuned exit flow" if self.exit_flow is not None else "")


def find_referenced_weights(weights_file: str | None, model_path: str | None) -> Path | None:
    """The encoder weights file a model file names, beside it or among the packaged assets."""
    if not weights_file:
        return None
    candidates = []
    if model_path:
        candidates.append(Path(model_path).resolve().parent / weights_file)
    candidates.append(ASSETS_DIR / weights_file)
    return next((c for c in candidates if c.is_file()), None)


def stored_identity(cfg: EncoderConfig, source: WeightsSource) -> tuple[str, str] | None:
    """(architecture, digest of the weights as stored) without building the network; None for a download.

    The digest is the weights file's sha256 (the one :func:`batchcap.model.modelfile.check_encoder_weights`
    computed, when given) or, for an embedded encoder, the hash of its tensors.

    What the OpenVINO cache is keyed by, so a cached graph is found before timm is even imported.
    """
    if source.kind == "pretrained":
        return None

    if source.file_sha256:  # hashed already when the weights were checked against the model
        digest = "file:" + source.file_sha256
    elif source.state is not None:
        digest = "stored:" + tensors_sha256(source.state)
    else:
        digest = "file:" + file_sha256(source.path or "")
    if source.exit_flow is not None:
        digest += "+exit_flow:" + tensors_sha256(source.exit_flow)
    for flow in source.member_exit_flows:
        digest += "+exit_flow:" + tensors_sha256(flow)
    return cfg.name, digest


def resolve_encoder_weights(
    model: CaptionModel, explicit: str | None = None, environ: os._Environ[str] | dict[str, str] | None = None
) -> WeightsSource:
    """Pick the encoder weights for ``model``; refuse weights it was not trained with.

    Order: weights embedded in the model file; ``explicit`` (``--encoder-weights``); the
    file the model references (beside it or among the packaged assets); the
    ``BATCHCAP_ENCODER_WEIGHTS`` environment variable; timm's pretrained download when
    the model was trained with it. Never random weights.
    """
    environ = os.environ if environ is None else environ
    if model.encoder_state is not None and not model.encoder.finetuned:
        return WeightsSource("embedded", state=model.encoder_state)
    base = _base_weights(model, explicit, environ)
    if model.encoder.finetuned:  # the file holds the fine-tuned exit flow(s), the rest is the base weights
        return dataclasses.replace(
            base, exit_flow=model.encoder_state or {}, member_exit_flows=model.member_exit_flows()
        )
    return base


def _base_weights(
    model: CaptionModel, explicit: str | None, environ: os._Environ[str] | dict[str, str]
) -> WeightsSource:
    """The weights file (or download) ``model`` names, found and checked as :func:`resolve_encoder_weights` says."""
    candidates: list[str] = []
    if explicit:
        candidates.append(explicit)
    referenced = find_referenced_weights(model.encoder.weights_file, model.path)
    if referenced is not None:
        candidates.append(str(referenced))
    if environ.get(ENV_WEIGHTS):
        candidates.append(environ[ENV_WEIGHTS])
    if candidates:
        path = candidates[0]
        if not Path(path).is_file():
            raise EncoderError(f"encoder weights {path}: no such file")
        return WeightsSource("file", path=path, file_sha256=check_encoder_weights(model, path))
    if model.encoder.weights_sha256 is None:
        return WeightsSource("pretrained")
    raise EncoderError(
        f"this model needs the encoder weights {model.encoder.weights_file or ''} "
        f"(sha256 {model.encoder.weights_sha256[:12]}…), which were not found beside the model "
        f"or in the package; pass --encoder-weights FILE or set {ENV_WEIGHTS}"
    )


class EncoderError(Exception):
    """The encoder cannot be built as asked (missing weights, bad device, bad precision)."""
