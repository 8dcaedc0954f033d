"""Encode + search: a loaded model file becomes a callable from ``uint8`` batches to captions.

This is where the model file, the encoder weights and the runtime settings meet:
:func:`resolve_model_path` finds the model (``--model`` or the packaged default),
:func:`resolve_encoder_weights` finds weights the model can trust, and
:class:`Captioner` runs the batched encoder and the vectorised beam search.
"""
from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from batchcap.beam import BeamResult, beam_search
from batchcap.config import BeamConfig, EncoderConfig, RuntimeConfig
from batchcap.encoder import (ASSETS_DIR, ENV_WEIGHTS, EncoderError, WeightsSource, build_backbone, build_encoder,
                              find_referenced_weights)
from batchcap.modelfile import CaptionModel, ModelFileError, check_encoder_weights

DEFAULT_MODEL = ASSETS_DIR / "default-model.safetensors"


def resolve_model_path(model: str | None) -> Path:
    """``--model`` as given, or the model shipped inside the package."""
    if model:
        return Path(model)
    if not DEFAULT_MODEL.is_file():
        raise ModelFileError(
            f"no --model given and the packaged default model is missing ({DEFAULT_MODEL}); "
            "reinstall batchcap or pass --model FILE")
    return DEFAULT_MODEL


def resolve_encoder_weights(model: CaptionModel, explicit: str | None = None,
                            environ: "os._Environ[str] | dict[str, str] | None" = None) -> WeightsSource:
    """Pick the encoder weights for ``model``; refuse weights it was not trained with.

    Order: weights embedded in the model file; ``explicit`` (``--encoder-weights``); the
    file the model references (beside it or among the packaged assets); the
    ``BATCHCAP_ENCODER_WEIGHTS`` environment variable; timm's pretrained download when
    the model was trained with it. Never random weights.
    """
    environ = os.environ if environ is None else environ
    if model.encoder_state is not None:
        return WeightsSource("embedded", state=model.encoder_state)
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
        check_encoder_weights(model, path)
        return WeightsSource("file", path=path)
    if model.encoder.weights_sha256 is None:
        return WeightsSource("pretrained")
    raise EncoderError(
        f"this model needs the encoder weights {model.encoder.weights_file or ''} "
        f"(sha256 {model.encoder.weights_sha256[:12]}…), which were not found beside the model "
        f"or in the package; pass --encoder-weights FILE or set {ENV_WEIGHTS}")


def per_token_scores(result: BeamResult, length_penalty: float) -> torch.Tensor:
    """Mean log-probability per token (``<end>`` included) of each hypothesis.

    The beam ranks by ``sum / length ** length_penalty``; the output's ``score`` column is
    always the length-normalised ``sum / length``, so it compares across captions of
    different lengths (and across runs with different ``--length-penalty``).
    """
    length = (result.lengths + result.ended.long()).clamp(min=1).float()  # (B, n)
    raw = result.scores.float() * length.pow(length_penalty)  # (B, n) summed log-probs
    return raw / length


@dataclass(frozen=True)
class Caption:
    """One image's result: the best caption, its score, and the n-best list."""

    text: str
    score: float
    n_best: tuple[tuple[str, float], ...]


class Captioner:
    """Batched encoder + vectorised beam search for one model and one set of settings."""

    def __init__(self, model: CaptionModel, runtime: RuntimeConfig, beam: BeamConfig,
                 encoder_weights: str | None = None) -> None:
        self.model = model
        self.runtime = runtime
        self.beam = beam
        source = resolve_encoder_weights(model, encoder_weights)
        self.weights_source = source
        backbone = build_backbone(EncoderConfig(name=model.encoder.name, spatial=model.encoder.spatial), source)
        self.encoder = build_encoder(backbone, model.preprocess, runtime, spatial=model.encoder.spatial)
        self.decoder = model.build_decoder().to(runtime.device)

    @torch.inference_mode()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Features of a ``uint8`` (B, 3, H, W) batch, fp32."""
        return self.encoder(images)

    @torch.inference_mode()
    def search(self, features: torch.Tensor) -> list[Caption]:
        """Beam search from features; the decoder runs in fp32 so scores are fp32 log-probs."""
        vocab = self.model.vocab
        state = self.decoder.init_state(features.float())
        result = beam_search(self.decoder.step, state, self.beam, start_id=vocab.start_id, end_id=vocab.end_id,
                             pad_id=vocab.pad_id, banned_ids=vocab.never_generated)
        tokens = result.tokens.cpu().tolist()
        scores = per_token_scores(result, self.beam.length_penalty).cpu().tolist()
        captions = []
        for image_tokens, image_scores in zip(tokens, scores):
            ranked = [(vocab.decode(t), float(sc)) for t, sc in zip(image_tokens, image_scores)
                      if math.isfinite(sc)]  # a slot stays empty when fewer hypotheses existed
            captions.append(Caption(ranked[0][0], ranked[0][1], tuple(ranked)))
        return captions

    def __call__(self, images: torch.Tensor) -> list[Caption]:
        features = self.encode(images)
        with search_threads(self.runtime):
            return self.search(features)


@contextlib.contextmanager
def search_threads(runtime: RuntimeConfig) -> Iterator[None]:
    """On a CPU, run the beam search on one torch thread (then restore the count).

    Its ops are small (B*K rows), and two OpenMP threads fighting the encoder's thread
    pool and the decoding workers for two cores made it 3.5x slower than one thread,
    with identical captions (README, Performance). CUDA is left alone.
    """
    if torch.device(runtime.device).type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
