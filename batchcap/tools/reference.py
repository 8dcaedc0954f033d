"""The tutorial-style captioning path, kept as a baseline for ``batchcap bench``.

This is how the Keras tutorials batchcap descends from caption a picture, done with
batchcap's own model file so the two paths can be compared caption for caption:

* one picture per call: Pillow opens it, converts to RGB and resizes it to the model's
  input size (the model file's preprocessing, applied with Pillow on the full decode,
  no ``draft()``), then normalises in float32 NumPy;
* one encoder forward per picture, fp32, default memory format, no autocast;
* greedy decoding that, for every word ``t``, rebuilds the decoder state from the image
  features and feeds the whole prefix ``<start> w1 .. w(t-1)`` again, keeping only the
  last output -- the tutorial's ``model.predict`` on the padded prefix, ``O(T**2)`` steps.

It follows batchcap's caption rules (``<pad> <start> <unk>`` are never emitted, ``<end>``
not before ``min_len`` words) so that :class:`batchcap.pipeline.captioner.Captioner` with
``--beam 1 --precision fp32`` must return the same caption; ``tests/tools/test_reference.py``
checks that. It is deliberately slow: never use it to caption a collection.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from batchcap.config import EncoderConfig, Preprocess
from batchcap.data.preprocess import resize_target
from batchcap.encode.torch_backend import build_backbone
from batchcap.encode.weights import resolve_encoder_weights
from batchcap.model.modelfile import CaptionModel
from batchcap.pipeline.captioner import caption_styles


def reference_pixels(path: str | Path, cfg: Preprocess) -> torch.Tensor:
    """One picture as the normalised float32 ``(1, 3, H, W)`` input, the tutorial way."""
    with Image.open(path) as opened:
        img = ImageOps.exif_transpose(opened).convert("RGB")
    tw, th = resize_target(img.width, img.height, cfg)
    if img.size != (tw, th):
        img = img.resize((tw, th), resample=Image.Resampling[cfg.interpolation.upper()], reducing_gap=None)
    if cfg.resize == "crop":
        left, top = max(0, round((tw - cfg.width) / 2)), max(0, round((th - cfg.height) / 2))
        img = img.crop((left, top, left + cfg.width, top + cfg.height))
    unit = np.asarray(img, dtype=np.float32) / 255.0  # (H, W, 3)
    x = (unit - np.asarray(cfg.mean, dtype=np.float32)) / np.asarray(cfg.std, dtype=np.float32)
    return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))[None]  # (1, 3, H, W)


class ReferenceCaptioner:
    """Tutorial-style captioner: one picture, fp32, prefix re-run at every word.

    ``encoder_weights`` is resolved exactly as :class:`batchcap.pipeline.captioner.Captioner`
    does, so both paths use the same network.
    """

    def __init__(
        self,
        model: CaptionModel,
        encoder_weights: str | None = None,
        min_len: int = 1,
        max_len: int | None = None,
        device: torch.device | str = "cpu",
    ) -> None:

        self.model = model
        self.min_len = min_len
        self.max_len = max_len or model.max_caption_len
        self.device = torch.device(device)
        source = resolve_encoder_weights(model, encoder_weights)
        self.backbone = (
            build_backbone(EncoderConfig(name=model.encoder.name, spatial=model.encoder.spatial), source)
            .float()
            .eval()
            .to(self.device)
        )
        self.decoder = model.build_decoder().float().eval().to(self.device)

    @torch.inference_mode()
    def features(self, path: str | Path) -> torch.Tensor:
        """Encoder features of one picture: ``(1, R, F)`` spatial or ``(1, F)`` pooled."""
        pixels = reference_pixels(path, self.model.preprocess).to(self.device)  # (1, 3, H, W)
        fmap = self.backbone.forward_features(pixels)  # (1, F, h, w)
        if self.model.encoder.spatial:
            return fmap.flatten(2).transpose(1, 2)  # (1, h*w, F)
        return fmap.mean(dim=(2, 3))  # (1, F)

    def styles(self, features: torch.Tensor) -> torch.Tensor | None:
        """A decoder with caption styles: the picture's ``auto`` style, as ``run`` chooses it."""
        model = self.model
        if not model.decoder.styles:
            return None
        nearest = None
        if model.familiarity is not None and model.neighbours is not None:
            pooled = features.float().mean(1) if features.dim() == 3 else features.float()
            nearest = model.neighbours.nearest(model.familiarity.whiten(pooled.cpu()))
        styles = caption_styles(model, features.shape[0], nearest)
        return None if styles is None else styles.to(self.device)

    @torch.inference_mode()
    def next_word(self, features: torch.Tensor, prefix: list[int]) -> int:
        """The arg-max word after ``prefix``, recomputed from scratch (the tutorial's cost)."""
        vocab = self.model.vocab
        state = self.decoder.init_state(features, styles=self.styles(features))
        log_probs = None
        for token in prefix:  # re-run the whole prefix, keep the last output
            log_probs, state = self.decoder.step(torch.tensor([token], device=self.device), state)
        assert log_probs is not None
        scores = log_probs[0].clone()  # (V,)
        scores[[vocab.pad_id, vocab.start_id, vocab.unk_id]] = float("-inf")
        if len(prefix) - 1 < self.min_len:
            scores[vocab.end_id] = float("-inf")
        return int(scores.argmax())

    def caption(self, path: str | Path) -> str:
        """Greedy caption of the picture at ``path``."""
        return self.greedy(self.features(path))

    def greedy(self, features: torch.Tensor) -> str:
        """Greedy caption from one picture's features ``(1, R, F)`` or ``(1, F)``."""
        vocab = self.model.vocab
        features = features.to(self.device).float()
        prefix = [vocab.start_id]
        for _ in range(self.max_len):
            word = self.next_word(features, prefix)
            if word == vocab.end_id:
                break
            prefix.append(word)
        return vocab.decode(prefix[1:])
