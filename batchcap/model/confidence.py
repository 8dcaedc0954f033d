"""How far to trust a caption: picture familiarity, the caption's own evidence, a calibrated confidence.

* :class:`Familiarity` -- how close a picture's pooled encoder feature lies to the training
  pictures': a Mahalanobis distance on a low-rank (PCA) fit of their features, the residual
  dimensions pooled into one variance. Fitted at train time (or by ``batchcap calibrate``)
  and stored in the model file as ``familiarity.*`` tensors.
* :class:`Neighbours` -- the same training pictures, kept as unit vectors in the whitened
  PCA space of that fit with their reference captions: a picture's nearest training
  pictures, and how well its caption agrees with what people wrote for those
  (``consensus``, CIDEr-D against their references: the strongest single predictor of a
  caption's quality we measured).
* :func:`caption_evidence` -- per image, the numbers the calibrator reads: mean and minimum
  token log-probability of the best caption, its margin over the second best, its length,
  the picture's familiarity, its neighbours' similarity and the caption's consensus.
* :class:`Calibrator` -- a logistic regression on those numbers (standardised), fitted on
  dev pictures against a per-image quality label; its few coefficients live in the model
  file's metadata, readable by anyone. ``confidence`` is its output: the estimated
  probability that the caption is acceptable.

Everything here is float64 and deterministic: the same features give the same confidence.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from batchcap.config import NEIGHBOURS_K
from batchcap.model.beam import BeamResult
from batchcap.model.cider import CiderD
from batchcap.model.text import normalize_caption

EVIDENCE = ("mean_logprob", "min_logprob", "margin", "length", "familiarity", "neighbour_similarity", "consensus")
# How sharply the consensus favours the closest neighbours: weights softmax(temperature * cosine).
NEIGHBOUR_TEMPERATURE = 10.0


@dataclass(frozen=True)
class Familiarity:
    """Low-rank Gaussian fit of training pictures' pooled features.

    ``score(x)`` is ``log(d / F)`` for the squared Mahalanobis distance
    ``d = sum_k (u_k . (x - mean))**2 / var_k + |residual|**2 / residual_var`` in ``F``
    dimensions: about 0 for a typical training picture, larger for unfamiliar ones.
    """

    mean: torch.Tensor  # float32 (F,)
    components: torch.Tensor  # float32 (k, F), orthonormal rows
    variances: torch.Tensor  # float32 (k,)
    residual_variance: float
    images: int
    note: str = ""

    def whiten(self, pooled: torch.Tensor) -> torch.Tensor:
        """float64 ``(B, k)`` unit vectors: pooled features projected on the components, whitened."""
        x = pooled.detach().to("cpu", torch.float64) - self.mean.double()
        z = (x @ self.components.double().T) / self.variances.double().sqrt()
        return z / z.norm(dim=1, keepdim=True).clamp(min=1e-12)

    def score(self, pooled: torch.Tensor) -> torch.Tensor:
        """float64 ``(B,)`` familiarity scores of pooled features ``(B, F)`` (lower = more familiar)."""
        x = pooled.detach().to("cpu", torch.float64) - self.mean.double()
        proj = x @ self.components.double().T  # (B, k)
        residual = (x * x).sum(1) - (proj * proj).sum(1)
        d = (proj * proj / self.variances.double()).sum(1) + residual.clamp(min=0) / self.residual_variance
        return torch.log(d.clamp(min=1e-12) / x.shape[1])

    def tensors(self) -> dict[str, torch.Tensor]:
        return {
            "familiarity.mean": self.mean,
            "familiarity.components": self.components,
            "familiarity.variances": self.variances,
        }

    def meta(self) -> dict[str, Any]:
        return {
            "residual_variance": self.residual_variance,
            "images": self.images,
            "components": int(self.components.shape[0]),
            "note": self.note,
        }

    @classmethod
    def from_file(cls, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> Familiarity:
        return cls(
            mean=tensors["familiarity.mean"].float(),
            components=tensors["familiarity.components"].float(),
            variances=tensors["familiarity.variances"].float(),
            residual_variance=float(meta["residual_variance"]),
            images=int(meta["images"]),
            note=str(meta.get("note", "")),
        )


def fit_familiarity(pooled: torch.Tensor, components: int = 128, note: str = "") -> Familiarity:
    """Fit :class:`Familiarity` on pooled features ``(N, F)`` of training pictures (float64 SVD)."""
    x = pooled.detach().to("cpu", torch.float64)
    n, dim = x.shape
    if n < 3:
        raise ValueError(f"familiarity needs at least 3 pictures, got {n}")
    mean = x.mean(0)
    _, singular, vh = torch.linalg.svd(x - mean, full_matrices=False)
    variances = singular**2 / (n - 1)  # (min(n, F),)
    k = min(components, n - 2, dim - 1)
    rest = variances[k:].sum() / max(1, dim - k)  # the remaining variance, spread over the other dimensions
    return Familiarity(
        mean=mean.float(),
        components=vh[:k].float().contiguous(),
        variances=variances[:k].clamp(min=1e-12).float(),
        residual_variance=float(max(rest, 1e-12)),
        images=n,
        note=note,
    )


class Neighbours:
    """Training pictures as whitened unit vectors (``Familiarity.whiten``) with their reference captions.

    ``query`` gives, per picture, the mean cosine similarity of its ``k`` nearest training
    pictures and the caption's ``consensus`` with what people wrote for them: the CIDEr-D of
    the caption against each neighbour's references, averaged with weights
    ``softmax(temperature * cosine)`` so that the closest neighbours count most (document
    frequencies from every stored reference). ``temperature=None`` is the consensus of model
    files fitted before the weighting: the CIDEr-D against all ``k`` neighbours' references pooled.

    ``datasets`` names each picture's dataset (None: not recorded); a decoder with caption styles
    writes a picture in the style of most of its neighbours' datasets (:meth:`styles`).
    """

    def __init__(
        self,
        vectors: torch.Tensor,
        captions: Sequence[Sequence[str]],
        k: int = NEIGHBOURS_K,
        temperature: float | None = NEIGHBOUR_TEMPERATURE,
        datasets: Sequence[str] | None = None,
    ) -> None:
        self.vectors = vectors.float()  # (N, c)
        self.captions = [list(c) for c in captions]
        if datasets is not None and len(datasets) != len(self.captions):
            raise ValueError(f"{len(datasets)} dataset names for {len(self.captions)} neighbours")
        self.datasets = None if datasets is None else list(datasets)
        self.k = min(k, len(self.captions))
        self.temperature = temperature
        # Built on first use (about half a second for 30,000 captions), or in the background while the
        # encoder starts (prepare_in_background): loading a model file stays quick.
        self._words: list[list[list[str]]] | None = None
        self._cider_d: CiderD | None = None
        self._refs: dict[int, list[Any]] = {}  # prepared on first use: a short run queries few pictures
        self._style_of: dict[tuple[str, ...], torch.Tensor] = {}  # per style list: each picture's style index
        self._building = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.pop("_building")  # a lock does not pickle; the copy builds its own frequencies
        state.update(_words=None, _cider_d=None, _refs={}, _style_of={})
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._building = threading.Lock()

    def prepare_in_background(self) -> threading.Thread | None:
        """Build the document frequencies in a thread now, so the first query does not wait for them.

        Returns the thread (None when they are built already); a query waits for it by itself.
        """
        if self._cider_d is not None:
            return None
        thread = threading.Thread(target=lambda: self._cider, name="batchcap-neighbours", daemon=True)
        thread.start()
        return thread

    @property
    def _cider(self) -> CiderD:
        """CiderD with document frequencies from every stored reference."""
        with self._building:  # a query waits for a build the background thread has begun
            if self._cider_d is None:
                self._words = [[normalize_caption(c) for c in refs] for refs in self.captions]
                self._cider_d = CiderD(self._words)
        return self._cider_d

    def _prepared(self, j: int) -> list[Any]:
        """Training picture ``j``'s reference vectors, computed once."""
        refs = self._refs.get(j)
        if refs is None:
            cider = self._cider
            assert self._words is not None
            refs = self._refs[j] = cider.prepare(self._words[j])
        return refs

    def nearest(self, whitened: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``k`` nearest training pictures of whitened unit vectors ``(B, c)``: float64 cosines and
        indices, both ``(B, k)``, closest first."""
        sim = whitened.double() @ self.vectors.double().T  # (B, N)
        top = sim.topk(self.k, dim=1)
        return top.values, top.indices

    def styles(self, indices: torch.Tensor, styles: Sequence[str]) -> torch.Tensor:
        """Each picture's caption style, an index into ``styles``: the one most of its neighbours
        (``indices`` from :meth:`nearest`) were trained in, ties to the earlier style; the first style
        when no neighbour's dataset is one of ``styles`` (or datasets were not recorded)."""
        rows = indices.shape[0]
        if self.datasets is None or not styles:
            return torch.zeros(rows, dtype=torch.long)
        key = tuple(styles)
        of = self._style_of.get(key)
        if of is None:  # once per style list, not per batch: N names looked up
            index = {name: i for i, name in enumerate(styles)}
            of = self._style_of[key] = torch.tensor([index.get(name, len(styles)) for name in self.datasets])  # (N,)
        votes = torch.zeros(rows, len(styles) + 1, dtype=torch.long)
        votes.scatter_add_(1, of[indices.cpu()], torch.ones_like(indices, dtype=torch.long, device="cpu"))
        return votes[:, : len(styles)].argmax(1)  # argmax takes the first of equal counts

    def query(
        self,
        whitened: torch.Tensor,
        texts: Sequence[str],
        nearest: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """``(similarity, consensus)`` float64 arrays for whitened unit vectors ``(B, c)`` and their
        captions; ``nearest`` is :meth:`nearest`'s answer for them, when already asked."""
        values, indices = self.nearest(whitened) if nearest is None else nearest
        consensus = self.consensus([[text] for text in texts], (values, indices))
        return values.mean(1).numpy(), consensus[:, 0]

    def consensus(self, candidates: Sequence[Sequence[str]], nearest: tuple[torch.Tensor, torch.Tensor]) -> np.ndarray:
        """float64 ``(B, n)``: the consensus of each of picture ``b``'s candidate captions with its
        neighbours (``nearest``: :meth:`nearest`'s answer); NaN where a picture has fewer than ``n``.

        The neighbours' references are prepared once per picture and each candidate is vectorised
        once, whatever the number of candidates: what consensus reranking
        (:func:`batchcap.model.rerank.rerank_by_consensus`) costs.
        """
        values, indices = nearest
        width = max((len(c) for c in candidates), default=0)
        out = np.full((len(candidates), width), np.nan)
        for b, (row, cosines, texts) in enumerate(zip(indices.tolist(), values, candidates)):
            if self.temperature is None:
                pooled = [r for j in row for r in self._prepared(j)]
                out[b, : len(texts)] = [self._cider.score(normalize_caption(t), pooled) for t in texts]
                continue
            groups = [self._prepared(j) for j in row]
            weights = torch.softmax(self.temperature * cosines, 0)
            for n, text in enumerate(texts):
                each = torch.tensor(self._cider.score_each(normalize_caption(text), groups), dtype=torch.float64)
                out[b, n] = float((weights * each).sum())
        return out

    def meta(self) -> dict[str, Any]:
        """What the model file's metadata keeps: ``k``, the weighting, the reference captions and datasets.

        The datasets are stored as their names once and an index per picture.
        """
        weighting = {} if self.temperature is None else {"temperature": self.temperature}
        datasets = {}
        if self.datasets is not None:
            names = list(dict.fromkeys(self.datasets))
            datasets = {"datasets": {"names": names, "index": [names.index(d) for d in self.datasets]}}
        return {"k": self.k, **weighting, "captions": self.captions, **datasets}

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"familiarity.neighbours": self.vectors}


def caption_evidence(
    result: BeamResult, familiarity: torch.Tensor | None, neighbours: tuple[np.ndarray, np.ndarray] | None = None
) -> np.ndarray:
    """float64 ``(B, len(EVIDENCE))``: the calibrator's inputs for each image's best caption.

    ``mean_logprob`` and ``min_logprob`` are over the caption's tokens (``<end>`` included
    when it ended); ``margin`` is the best hypothesis' search score minus the second's
    (NaN with one hypothesis); ``length`` counts words; ``familiarity`` and the
    ``neighbours`` pair ``(neighbour_similarity, consensus)`` are NaN without statistics.
    """
    assert result.token_logprobs is not None
    lengths = result.lengths[:, 0].cpu()
    tokens = (lengths + result.ended[:, 0].cpu().long()).clamp(min=1)  # (B,)
    logprobs = result.token_logprobs[:, 0].cpu().double()  # (B, T+1)
    kept = torch.arange(logprobs.shape[1])[None, :] < tokens[:, None]
    mean = logprobs.sum(1) / tokens
    low = logprobs.masked_fill(~kept, math.inf).amin(1)
    scores = result.scores.cpu().double()
    if scores.shape[1] > 1:
        margin = torch.where(torch.isfinite(scores[:, 1]), scores[:, 0] - scores[:, 1], torch.nan)
    else:
        margin = torch.full_like(mean, torch.nan)
    fam = familiarity.double().cpu() if familiarity is not None else torch.full_like(mean, torch.nan)
    similarity, consensus = (
        (torch.from_numpy(n) for n in neighbours)
        if neighbours is not None
        else (torch.full_like(mean, torch.nan), torch.full_like(mean, torch.nan))
    )
    return torch.stack([mean, low, margin, lengths.double(), fam, similarity, consensus], 1).numpy()


@dataclass(frozen=True)
class Calibrator:
    """``confidence = sigmoid(intercept + coef . (x - center) / scale)`` over :data:`EVIDENCE`.

    A missing input (NaN: no second hypothesis at ``--beam 1``, no familiarity statistics)
    is replaced by its ``center``, i.e. contributes nothing. ``report`` holds how it was
    fitted and how well it ranks (written by ``batchcap calibrate``).
    """

    features: tuple[str, ...]
    center: tuple[float, ...]
    scale: tuple[float, ...]
    coef: tuple[float, ...]
    intercept: float
    report: dict[str, Any] = field(default_factory=dict)

    def __call__(self, evidence: np.ndarray) -> np.ndarray:
        """float64 ``(B,)`` confidences in [0, 1] from ``caption_evidence`` rows."""
        columns = [EVIDENCE.index(name) for name in self.features]
        x = np.asarray(evidence, dtype=np.float64)[:, columns]
        center = np.asarray(self.center)
        x = np.where(np.isnan(x), center, x)
        z = self.intercept + ((x - center) / np.asarray(self.scale)) @ np.asarray(self.coef)
        return 1.0 / (1.0 + np.exp(-z))

    def to_dict(self) -> dict[str, Any]:
        return {
            "features": list(self.features),
            "center": list(self.center),
            "scale": list(self.scale),
            "coef": list(self.coef),
            "intercept": self.intercept,
            "report": self.report,
        }

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> Calibrator:
        return cls(
            features=tuple(doc["features"]),
            center=tuple(map(float, doc["center"])),
            scale=tuple(map(float, doc["scale"])),
            coef=tuple(map(float, doc["coef"])),
            intercept=float(doc["intercept"]),
            report=dict(doc.get("report", {})),
        )


def fit_logistic(x: np.ndarray, y: np.ndarray, l2: float = 1.0, iterations: int = 50) -> tuple[np.ndarray, float]:
    """L2-regularised logistic regression by Newton's method: ``(coef, intercept)``, float64.

    ``l2`` penalises the coefficients (not the intercept) as ``l2 / 2 * |coef|**2``,
    on the scale of the summed log-likelihood.
    """
    n, d = x.shape
    design = np.hstack([np.ones((n, 1)), x])
    w = np.zeros(d + 1)
    penalty = np.full(d + 1, float(l2))
    penalty[0] = 0.0
    for _ in range(iterations):
        p = 1.0 / (1.0 + np.exp(-(design @ w)))
        grad = design.T @ (p - y) + penalty * w
        hessian = (design * (p * (1 - p))[:, None]).T @ design + np.diag(penalty) + 1e-9 * np.eye(d + 1)
        update = np.linalg.solve(hessian, grad)
        w -= update
        if np.abs(update).max() < 1e-10:
            break
    return w[1:], float(w[0])


def fit_calibrator(
    evidence: np.ndarray, labels: np.ndarray, features: Sequence[str] = EVIDENCE, l2: float = 1.0
) -> Calibrator:
    """Standardise the chosen ``features`` of ``evidence`` and fit :func:`fit_logistic` to ``labels``."""
    columns = [EVIDENCE.index(name) for name in features]
    x = np.asarray(evidence, dtype=np.float64)[:, columns]
    center = np.nanmean(x, 0)
    center = np.where(np.isnan(center), 0.0, center)
    x = np.where(np.isnan(x), center, x)
    scale = x.std(0)
    scale = np.where(scale > 0, scale, 1.0)
    coef, intercept = fit_logistic((x - center) / scale, np.asarray(labels, dtype=np.float64), l2)
    return Calibrator(tuple(features), tuple(center.tolist()), tuple(scale.tolist()), tuple(coef.tolist()), intercept)


def auroc(scores: Sequence[float] | np.ndarray, labels: Sequence[int] | np.ndarray) -> float:
    """Area under the ROC curve (ties count half): the chance a good caption outscores a bad one."""
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels).astype(bool)
    pos, neg = int(y.sum()), int((~y).sum())
    if not pos or not neg:
        return float("nan")
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(len(s))
    sorted_s = s[order]
    i = 0
    while i < len(s):  # average ranks over ties
        j = i
        while j + 1 < len(s) and sorted_s[j + 1] == sorted_s[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return float((ranks[y].sum() - pos * (pos + 1) / 2) / (pos * neg))


def reliability_table(
    confidence: Sequence[float] | np.ndarray, labels: Sequence[int] | np.ndarray, bins: int = 5
) -> list[dict[str, Any]]:
    """Per equal-width confidence bin: pictures, mean confidence and the share actually acceptable."""
    c = np.asarray(confidence, dtype=np.float64)
    y = np.asarray(labels, dtype=np.float64)
    rows = []
    for b in range(bins):
        low, high = b / bins, (b + 1) / bins
        inside = (c >= low) & ((c < high) if b < bins - 1 else (c <= high))
        n = int(inside.sum())
        rows.append(
            {
                "bin": f"{low:.1f}-{high:.1f}",
                "images": n,
                "mean_confidence": round(float(c[inside].mean()), 3) if n else None,
                "acceptable": round(float(y[inside].mean()), 3) if n else None,
            }
        )
    return rows
