"""Encode + search: a loaded model file becomes a callable from ``uint8`` batches to captions.

This is where the model file, the encoder weights and the runtime settings meet:
:func:`resolve_model_path` finds the model (``--model`` or the packaged default),
:func:`resolve_encoder_weights` finds weights the model can trust, and
:class:`Captioner` runs the batched encoder and the vectorised beam search.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from batchcap.config import BeamConfig, EncoderConfig, OptionError, RuntimeConfig
from batchcap.data.loader import Batch
from batchcap.encode.factory import build_encoder
from batchcap.encode.torch_backend import build_backbone
from batchcap.encode.weights import resolve_encoder_weights, stored_identity
from batchcap.model.beam import beam_search, token_logprobs_mean
from batchcap.model.confidence import caption_evidence
from batchcap.model.decoder import CaptionDecoder
from batchcap.model.ensemble import EnsembleDecoder
from batchcap.model.modelfile import CaptionModel
from batchcap.model.rerank import rerank_by_consensus

#: The status of a picture that decoded but got no caption: every hypothesis scored NaN or
#: -inf, as happens with NaN or inf features (an fp16 overflow, for example).
NO_CAPTION = "no_caption"


@dataclass(frozen=True)
class Caption:
    """One image's result: the best caption, its scores, and the n-best list.

    ``score`` is what the captions were ranked by: the search's ``sum log p / length ** length_penalty``,
    or with consensus reranking (``BeamConfig.consensus_weight``) ``mean log p + weight * consensus``;
    ``n_best`` pairs each caption with that same number, so the list reads in order.
    ``logprob`` is the best caption's mean log-probability per token; ``confidence`` the
    calibrated probability that it is acceptable (``None`` when the model has no calibrator).

    ``error`` says why an image has no caption (then ``text`` is empty and ``n_best`` too).
    """

    text: str
    score: float
    n_best: tuple[tuple[str, float], ...]
    logprob: float = float("nan")
    confidence: float | None = None
    familiarity: float | None = None
    error: str | None = None


def search_decoder(model: CaptionModel, runtime: RuntimeConfig) -> CaptionDecoder | EnsembleDecoder:
    """The model's decoder on the run's device, with bf16 weights when the run's precision is bf16.

    The search is matrix products of a few dozen rows by the LSTM and output weights; in bf16
    they run about 1.3x faster on this project's CPU, and on Flickr8k dev 981 of 1,000 captions
    equal the fp32 decoder's (CIDEr-D 0.5301 vs 0.5299; docs/performance.md). Scores stay fp32:
    the log-softmax runs in fp32. ``--precision fp32`` keeps the whole search fp32.
    """
    return model.build_decoder(torch.bfloat16 if runtime.precision == "bf16" else None).to(runtime.device)


def encode_fixed_size(
    encode: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, batch_size: int
) -> torch.Tensor:
    """``encode(images)``, with a short batch padded by blank pictures up to ``batch_size`` rows.

    On CUDA, cuDNN's autotuner (``cudnn.benchmark``) times its kernels again for every new
    input shape; padding the last batch of each worker keeps the encoder at one shape.
    The padding's features are dropped, so the result has one row per picture given.
    """
    count = images.shape[0]
    if 0 < count < batch_size:
        blank = images.new_zeros((batch_size - count, *images.shape[1:]))
        return encode(torch.cat([images, blank]))[:count]
    return encode(images)


def caption_batch(captioner: Callable[[torch.Tensor], list[Caption]], batch: Batch) -> list[Caption]:
    """Captions for ``batch.ok``; a picture without one moves from ``batch.ok`` to ``batch.failed``.

    So a bad picture becomes its own failure row (status ``no_caption``) and the rest of
    the batch, and the job, carry on.
    """
    captions = captioner(batch.images)
    kept, failed = [], []
    for item, caption in zip(batch.ok, captions, strict=True):
        if caption.error is None:
            kept.append((item, caption))
        else:
            failed.append(dataclasses.replace(item, status=NO_CAPTION, error=caption.error))
    batch.ok = [item for item, _ in kept]
    batch.failed = batch.failed + failed
    return [caption for _, caption in kept]


def style_index(model: CaptionModel, beam: BeamConfig) -> int | None:
    """The index of ``beam.style`` among the model's caption styles; None for ``auto``.

    Raises :class:`OptionError` for a style the model does not write.
    """
    if beam.style == "auto":
        return None
    styles = model.decoder.styles
    if beam.style not in styles:
        known = f"it writes {', '.join(styles)} (or auto)" if styles else "it has no caption styles: leave --style out"
        raise OptionError("--style", f"{beam.style!r} is not a caption style of {model.name}; {known}")
    return styles.index(beam.style)


def caption_styles(
    model: CaptionModel, count: int, nearest: tuple[torch.Tensor, torch.Tensor] | None, chosen: int | None = None
) -> torch.Tensor | None:
    """Each of ``count`` pictures' caption style (CPU long ``(count,)``) for a decoder with styles.

    ``chosen`` (from :func:`style_index`) for every picture; else (``auto``) the style of most of the
    picture's neighbours (``nearest``: :meth:`batchcap.model.confidence.Neighbours.nearest`), or the
    first style for a model without neighbours. None for a decoder without styles.
    """
    styles = model.decoder.styles
    if not styles:
        return None
    if chosen is not None:
        return torch.full((count,), chosen, dtype=torch.long)
    if nearest is not None and model.neighbours is not None:
        return model.neighbours.styles(nearest[1], styles)
    return torch.zeros(count, dtype=torch.long)


class Captioner:
    """Batched encoder + vectorised beam search for one model and one set of settings."""

    def __init__(
        self, model: CaptionModel, runtime: RuntimeConfig, beam: BeamConfig, encoder_weights: str | None = None
    ) -> None:
        self._style = style_index(model, beam)  # a style the model lacks is refused before the encoder loads
        self.model = model
        self.runtime = runtime
        self.beam = beam
        if model.neighbours is not None:
            model.neighbours.prepare_in_background()  # beside the encoder's start-up, not on the first batch
        source = resolve_encoder_weights(model, encoder_weights)
        self.weights_source = source
        encoder_cfg = EncoderConfig(name=model.encoder.name, spatial=model.encoder.spatial)
        self.encoder = build_encoder(
            lambda: build_backbone(encoder_cfg, source),
            model.preprocess,
            runtime,
            spatial=model.encoder.spatial,
            identity=stored_identity(encoder_cfg, source) if runtime.backend == "openvino" else None,
        )
        self.decoder = search_decoder(model, runtime)
        self.fixed_batch = torch.device(runtime.device).type == "cuda"
        self._search_cfg = search_settings(beam)
        self._word_rules = model.word_rules(beam)  # once, not per batch

    def with_beam(self, beam: BeamConfig) -> Captioner:
        """This captioner with other search settings, sharing its loaded encoder and decoder."""
        other = copy.copy(self)
        other.beam = beam
        other._search_cfg = search_settings(beam)
        other._word_rules = self.model.word_rules(beam)
        other._style = style_index(model=self.model, beam=beam)
        return other

    @torch.inference_mode()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Features of a ``uint8`` (B, 3, H, W) batch, fp32; on CUDA at one batch shape."""
        if self.fixed_batch:
            return encode_fixed_size(self.encoder, images, self.runtime.batch_size)
        return self.encoder(images)

    def search(self, features: torch.Tensor) -> list[Caption]:
        """Beam search from features (decoder in fp32, or bf16 at bf16 precision); scores are fp32 log-probs."""
        return self.search_with_evidence(features)[0]

    @torch.inference_mode()
    def search_with_evidence(self, features: torch.Tensor) -> tuple[list[Caption], np.ndarray]:
        """:meth:`search`, plus each image's calibrator inputs (:func:`caption_evidence`)."""
        vocab, model = self.model.vocab, self.model
        familiarity = whitened = nearest = None
        if model.familiarity is not None:
            pooled = features.float().mean(1) if features.dim() == 3 else features.float()
            familiarity = model.familiarity.score(pooled)
            if model.neighbours is not None:
                whitened = model.familiarity.whiten(pooled)
                nearest = model.neighbours.nearest(whitened)
        state = self.decoder.init_state(features, styles=self._styles(features.shape[0], nearest))
        result = beam_search(
            self.decoder.step,
            state,
            self._search_cfg,
            start_id=vocab.start_id,
            end_id=vocab.end_id,
            pad_id=vocab.pad_id,
            banned_ids=vocab.never_generated,
            per_image=self.decoder.per_image_state,
            **self._word_rules,
        )
        neighbours = None
        if model.neighbours is not None and whitened is not None:
            assert nearest is not None
            if self.beam.consensus_weight > 0:  # every hypothesis' consensus, then the best of them
                candidates = [
                    [vocab.decode(t) for t, score in zip(row, scores) if math.isfinite(score)]
                    for row, scores in zip(result.tokens.cpu().tolist(), result.scores.cpu().tolist())
                ]
                consensus = model.neighbours.consensus(candidates, nearest)
                result, consensus = rerank_by_consensus(result, consensus, self.beam.consensus_weight)
                neighbours = (nearest[0].mean(1).numpy(), consensus[:, 0])
            else:
                best = [vocab.decode(row[0]) for row in result.tokens.cpu().tolist()]
                neighbours = model.neighbours.query(whitened, best, nearest)
        evidence = caption_evidence(result, familiarity, neighbours)
        confidence = None if model.calibration is None else model.calibration(evidence).tolist()
        tokens = result.tokens[:, : self.beam.n_best].cpu().tolist()
        scores = result.scores[:, : self.beam.n_best].cpu().tolist()
        logprobs = token_logprobs_mean(result)[:, 0].cpu().tolist()
        captions = []
        for b, (image_tokens, image_scores) in enumerate(zip(tokens, scores)):
            ranked = [
                (vocab.decode(t), float(sc)) for t, sc in zip(image_tokens, image_scores) if math.isfinite(sc)
            ]  # a slot stays empty when fewer hypotheses existed
            if not ranked:
                captions.append(
                    Caption(
                        "",
                        math.nan,
                        (),
                        error="no finite caption: every hypothesis scored NaN or -inf (NaN or inf encoder features?)",
                    )
                )
                continue
            captions.append(
                Caption(
                    ranked[0][0],
                    ranked[0][1],
                    tuple(ranked),
                    logprob=float(logprobs[b]),
                    confidence=None if confidence is None else round(float(confidence[b]), 6),
                    familiarity=None if familiarity is None else float(familiarity[b]),
                )
            )
        return captions, evidence

    def _styles(self, count: int, nearest: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor | None:
        styles = caption_styles(self.model, count, nearest, self._style)
        return None if styles is None else styles.to(self.runtime.device)

    def __call__(self, images: torch.Tensor) -> list[Caption]:
        features = self.encode(images)
        with search_threads(self.runtime):
            return self.search(features)


def search_settings(beam: BeamConfig) -> BeamConfig:
    """What the beam search is asked for to give ``beam``'s captions and the calibrator's evidence.

    A second hypothesis gives the calibrator its margin; consensus reranking needs every finished
    hypothesis. Asking for more never changes the search's best caption.
    """
    wanted = beam.beam_size if beam.consensus_weight > 0 else max(beam.n_best, min(2, beam.beam_size))
    return dataclasses.replace(beam, n_best=wanted)


@contextlib.contextmanager
def search_threads(runtime: RuntimeConfig) -> Iterator[None]:
    """On a CPU, run the beam search on one torch thread (then restore the count).

    Its ops are small (B*K rows), and two OpenMP threads fighting the encoder's thread
    pool and the decoding workers for two cores made it 3.5x slower than one thread,
    with identical captions (docs/performance.md). CUDA is left alone.
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
