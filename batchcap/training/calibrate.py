"""``batchcap calibrate``: fit a model's familiarity statistics and confidence calibrator, and report them.

The flow is ``encode (cached) -> caption -> label -> fit -> measure -> model file``:

* pictures are encoded once by the model's own encoder at the run's precision and kept in a
  :class:`batchcap.training.feature_cache.FeatureCache` (``--cache-dir``), so a rerun costs only the search;
* familiarity is fitted on the pooled features of a deterministic subset of the training
  pictures (:func:`train_subset`: every k-th id in sorted order);
* every dev picture is captioned as ``batchcap run`` would, and labelled acceptable when its
  caption's CIDEr-D against its own references (:class:`batchcap.model.cider.CiderD`, document
  frequencies from the dev references) reaches the threshold;
* the calibrator (:func:`batchcap.model.confidence.fit_calibrator`) is measured by k-fold
  cross-validated AUROC on dev, then refitted on all of dev; the figures (AUROC, reliability
  table, confidence on unfamiliar pictures) are returned and stored with it;
* several datasets calibrate together (:class:`batchcap.data.captions.mixture.DatasetMix`):
  familiarity and neighbours come from the training pictures of all of them, the calibrator is
  fitted on the union of their dev sets (each set labelled against its own references), and the
  AUROC and the selective-captioning figure (:func:`selective_figure`) are reported per dev set
  and pooled.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from batchcap.config import NEIGHBOURS_K, BeamConfig, RuntimeConfig
from batchcap.data.captions.mixture import DatasetMix, mix_datasets
from batchcap.data.captions.records import CaptionDataset, CaptionRecord
from batchcap.data.extensions import is_image_name
from batchcap.model.cider import CiderD
from batchcap.model.confidence import (
    EVIDENCE,
    NEIGHBOUR_TEMPERATURE,
    Calibrator,
    Familiarity,
    Neighbours,
    auroc,
    fit_calibrator,
    fit_familiarity,
    reliability_table,
)
from batchcap.model.modelfile import CaptionModel
from batchcap.model.text import (
    DETERMINERS,
    ENDING_MAX_RATE,
    ENDING_MIN_COUNT,
    REPEAT_MIN_COUNT,
    REPEAT_MIN_SHARE,
    learn_repeatable,
    learn_unendable,
    learn_unendable_pairs,
    normalize_caption,
)
from batchcap.pipeline.captioner import Captioner
from batchcap.training.feature_cache import FeatureCache, FeatureKey

Log = Callable[[str], None]


def train_subset(records: Sequence[CaptionRecord], count: int | None) -> list[CaptionRecord]:
    """``count`` training records spread evenly over the ids in sorted order (deterministic); ``None``: all."""
    ordered = sorted(records, key=lambda r: r.image_id)
    if count is None or count >= len(ordered):
        return ordered
    step = len(ordered) / count
    return [ordered[int(i * step)] for i in range(count)]


def familiarity_note(pictures: int, of: int, precision: str, components: int) -> str:
    """How familiarity statistics were fitted, in the words the model card uses."""
    if pictures >= of:
        return f"all {of} train pictures, {precision} encoder features, {components} components"
    return (
        f"{pictures} train pictures (every {of / max(1, pictures):.0f}th id in sorted order), "
        f"{precision} encoder features, {components} components"
    )


def ending_and_familiarity(
    records: Sequence[CaptionRecord],
    ids: Sequence[str],
    features: torch.Tensor,
    precision: str,
    count: int = 1500,
    components: int = 128,
    dataset_of: dict[str, str] | None = None,
) -> tuple[tuple[str, ...], dict[str, Any], Familiarity | None, Neighbours | None]:
    """What ``batchcap train`` stores for trusting captions: the ending rule and familiarity.

    ``ids`` / ``features`` are the training split's cached features (empty when the encoder is
    fine-tuned: then there is no familiarity, as the features change with the encoder);
    ``dataset_of`` names each training picture's dataset, for the neighbours.
    """
    words = learn_unendable(normalize_caption(c) for r in records for c in r.captions)
    rule = {
        "learnt_from": f"{len(records)} train images",
        "max_end_rate": ENDING_MAX_RATE,
        "min_count": ENDING_MIN_COUNT,
    }
    if features.numel() == 0 or len(ids) < 3:
        return words, rule, None, None
    row = {image_id: n for n, image_id in enumerate(ids)}
    chosen_records = [r for r in train_subset(records, count) if r.image_id in row]
    chosen = features[torch.tensor([row[r.image_id] for r in chosen_records], dtype=torch.long)].float()
    pooled = chosen.mean(1) if chosen.dim() == 3 else chosen
    familiarity = fit_familiarity(
        pooled, components, note=familiarity_note(len(chosen_records), len(records), precision, components)
    )
    datasets = None if dataset_of is None else [dataset_of[r.image_id] for r in chosen_records]
    return words, rule, familiarity, fit_neighbours(familiarity, pooled, chosen_records, datasets=datasets)


@dataclass(frozen=True)
class WordRules:
    """The search's word rules besides the unendable words, learnt from training captions.

    ``unendable_pairs``: (determiner, word) pairs ``<end>`` may not follow ("a black");
    ``repeatable_words``: the only words that may follow themselves.
    """

    unendable_pairs: tuple[tuple[str, str], ...]
    repeatable_words: tuple[str, ...]
    learnt_from: str

    def apply(self, model: CaptionModel) -> None:
        """Store both rules, and how they were learnt, in ``model``'s ending and repeat rules."""
        self.apply_pairs(model)
        self.apply_repeats(model)

    def apply_pairs(self, model: CaptionModel) -> None:
        """Store the pairs in ``model``'s ending rule (learnt with the unendable words' thresholds)."""
        model.unendable_pairs = self.unendable_pairs
        model.ending_rule.setdefault("max_end_rate", ENDING_MAX_RATE)
        model.ending_rule.setdefault("min_count", ENDING_MIN_COUNT)
        model.ending_rule["determiners"] = list(DETERMINERS)

    def apply_repeats(self, model: CaptionModel) -> None:
        """Store the repeatable words as ``model``'s repeat rule."""
        model.repeatable_words = self.repeatable_words
        model.repeat_rule = {
            "learnt_from": self.learnt_from,
            "min_count": REPEAT_MIN_COUNT,
            "min_share": REPEAT_MIN_SHARE,
        }


def learn_word_rules(records: Sequence[CaptionRecord], unendable: Sequence[str], learnt_from: str) -> WordRules:
    """:class:`WordRules` from the captions of ``records``; pairs whose word is in ``unendable`` are left
    to the ending rule (such a word may not end a caption after anything)."""
    captions = [normalize_caption(c) for r in records for c in r.captions]
    return WordRules(learn_unendable_pairs(captions, unendable), learn_repeatable(captions), learnt_from)


def add_missing_word_rules(model: CaptionModel, records: Sequence[CaptionRecord], source: str, log: Log) -> None:
    """Learn the ending rule and the repeat rule from ``records`` (a train split of ``source``) where
    ``model`` lacks them; rules it has are kept, so an older model file gains the newer rules alone."""
    learnt_from = f"{len(records)} train images of {source}"
    if model.unendable_words is None:
        model.unendable_words, model.ending_rule, _, _ = ending_and_familiarity(records, [], torch.empty(0), "")
        model.ending_rule["learnt_from"] = learnt_from
        log(f"ending rule: {len(model.unendable_words)} words may not end a caption")
    if model.unendable_pairs is None or model.repeatable_words is None:
        rules = learn_word_rules(records, model.unendable_words, learnt_from)
        if model.unendable_pairs is None:
            rules.apply_pairs(model)
            log(f"ending rule: {len(rules.unendable_pairs)} word pairs may not end a caption")
        if model.repeatable_words is None:
            rules.apply_repeats(model)
            log(f"repeat rule: {len(rules.repeatable_words)} words may follow themselves")


def fit_neighbours(
    familiarity: Familiarity,
    pooled: torch.Tensor,
    records: Sequence[CaptionRecord],
    k: int = NEIGHBOURS_K,
    datasets: Sequence[str] | None = None,
) -> Neighbours:
    """The training pictures, whitened, with their reference captions (for ``consensus``) and the name
    of each one's dataset (for caption styles)."""
    return Neighbours(
        familiarity.whiten(pooled).float().contiguous(), [list(r.captions) for r in records], k, datasets=datasets
    )


def folder_items(folder: str | Path) -> list[tuple[str, str]]:
    """``(id, path)`` of the pictures directly in ``folder``, sorted by name."""
    paths = sorted(p for p in Path(folder).iterdir() if p.is_file() and is_image_name(p.name))
    return [(p.name, str(p)) for p in paths]


@dataclass
class EncodedSet:
    """Pictures of one set, encoded: ids and their spatial (or pooled) fp16 features."""

    ids: list[str]
    features: torch.Tensor  # fp16 (N, R, F) or (N, F)


def encode_cached(
    captioner: Captioner,
    items: Sequence[tuple[str, Any]],
    cache_root: str | Path,
    runtime: RuntimeConfig,
    pooled: bool,
    log: Log = print,
) -> EncodedSet:
    """Features of ``items`` ``(id, path or record)`` from the cache, computing the missing ones.

    ``pooled`` keeps only the mean over regions (what familiarity needs), a 100th of the space.
    """
    model = captioner.model
    key = FeatureKey(
        encoder=model.encoder.name,
        weights=model.encoder_weights_id(),
        preprocess=model.preprocess,
        spatial=model.encoder.spatial and not pooled,
        precision=runtime.precision,
    )
    cache = FeatureCache(cache_root, key)

    def encode(images: torch.Tensor) -> torch.Tensor:
        features = captioner.encode(images)
        return features.mean(1) if pooled and features.dim() == 3 else features

    def progress(done: int, total: int) -> None:
        if done % 256 < runtime.batch_size or done == total:
            log(f"  encoded {done}/{total}")

    failures = cache.extract(items, encode, runtime, on_progress=progress)
    if failures:
        log(f"  {len(failures)} pictures could not be read (e.g. {next(iter(failures.items()))})")
    wanted = [i for i, _ in items if i not in failures]
    ids, features = cache.load(wanted)
    return EncodedSet(ids, features)


def caption_encoded(captioner: Captioner, encoded: EncodedSet, batch: int = 64) -> tuple[list[Any], np.ndarray]:
    """Captions and calibrator evidence for every picture of ``encoded``, searched in batches."""
    captions: list[Any] = []
    evidence = []
    device = captioner.runtime.device
    for start in range(0, len(encoded.ids), batch):
        feats = encoded.features[start : start + batch].to(device).float()
        got, ev = captioner.search_with_evidence(feats)
        captions += got
        evidence.append(ev)
    return captions, (np.concatenate(evidence) if evidence else np.zeros((0, len(EVIDENCE))))


def quality_labels(
    captions: Sequence[str], references: Sequence[Sequence[str]], threshold: float
) -> tuple[np.ndarray, np.ndarray]:
    """Per-image CIDEr-D (toolkit scale, document frequencies from these references) and ``>= threshold``."""
    refs = [[normalize_caption(r) for r in image_refs] for image_refs in references]
    cider = CiderD(refs)
    values = np.array([cider.score(normalize_caption(c), cider.prepare(r)) for c, r in zip(captions, refs)])
    return values, (values >= threshold).astype(np.int64)


def selective_figure(confidence: np.ndarray, labels: np.ndarray, keep: float = 0.8) -> dict[str, Any]:
    """At the confidence threshold that keeps ``keep`` of the acceptable captions, the share of bad ones kept.

    What a reviewer gets from a threshold: the lower ``unacceptable_kept``, the more of the bad
    captions the threshold sets aside while losing only ``1 - keep`` of the good ones. ``None``
    where the set has no acceptable (or no unacceptable) caption.
    """
    good, bad = np.sort(confidence[labels == 1])[::-1], confidence[labels == 0]
    if not len(good) or not len(bad):
        return {"threshold": None, "acceptable_kept": None, "unacceptable_kept": None}
    threshold = float(good[max(0, int(np.ceil(keep * len(good))) - 1)])
    return {
        "threshold": round(threshold, 4),
        "acceptable_kept": round(float((good >= threshold).mean()), 3),
        "unacceptable_kept": round(float((bad >= threshold).mean()), 3),
    }


def _rounded_auroc(scores: np.ndarray, labels: np.ndarray) -> float | None:
    value = auroc(scores, labels)
    return None if np.isnan(value) else round(value, 3)


def cross_validated(
    evidence: np.ndarray, labels: np.ndarray, folds: int, features: Sequence[str] = EVIDENCE, l2: float = 1.0
) -> np.ndarray:
    """Out-of-fold confidences: picture ``i`` is scored by a calibrator fitted without fold ``i % folds``."""
    out = np.empty(len(labels))
    fold = np.arange(len(labels)) % folds
    for k in range(folds):
        held = fold == k
        calibrator = fit_calibrator(evidence[~held], labels[~held], features, l2)
        out[held] = calibrator(evidence[held])
    return out


#: The ``--min-confidence`` values the report describes: review queues at the low end, unattended
#: publishing at the high end.
THRESHOLD_GRID = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8)


def threshold_table(confidence: np.ndarray, labels: np.ndarray, grid: Sequence[float]) -> list[dict[str, Any]]:
    """What ``--min-confidence P`` does on dev, for each P of ``grid`` (out-of-fold confidences).

    Both sides of the threshold: the share of captions set aside and how many of those are bad (for a
    review queue), and the share of the acceptable captions it keeps and how many of the kept ones are
    acceptable (for publishing unattended). A share of an empty set is ``None``.
    """
    rows = []
    good = labels == 1
    for p in grid:
        aside = confidence < p
        kept = ~aside
        rows.append(
            {
                "min_confidence": p,
                "dev_set_aside": round(float(aside.mean()), 3),
                "dev_bad_among_set_aside": round(float(1 - labels[aside].mean()), 3) if aside.any() else None,
                "dev_acceptable_kept": round(float(kept[good].mean()), 3) if good.any() else None,
                "dev_acceptable_among_kept": round(float(labels[kept].mean()), 3) if kept.any() else None,
            }
        )
    return rows


def recommend_threshold(confidence: np.ndarray, labels: np.ndarray, bad_share: float = 0.8) -> float:
    """The highest ``--min-confidence`` (0.05 grid) whose set-aside captions are at least ``bad_share`` bad.

    Chosen on out-of-fold dev confidences, so that a reviewer who opens the set-aside rows
    mostly finds captions that needed review, and as many of those as that allows.
    """
    best = 0.05
    for step in np.arange(0.05, 1.0, 0.05):
        aside = confidence < step
        if aside.sum() and (1 - labels[aside]).mean() >= bad_share:
            best = float(round(step, 2))
    return best


def calibrate(
    model: CaptionModel,
    dataset: CaptionDataset | DatasetMix,
    runtime: RuntimeConfig,
    beam: BeamConfig,
    *,
    cache_dir: str | Path,
    unfamiliar: str | Path | None = None,
    train_images: int | None = None,
    neighbours_k: int = NEIGHBOURS_K,
    components: int = 128,
    folds: int = 5,
    label_threshold: float = 0.5,
    l2: float = 1.0,
    refit_familiarity: bool = False,
    encoder_weights: str | None = None,
    log: Log = print,
) -> dict[str, Any]:
    """Give ``model`` word rules (those it lacks), familiarity statistics and a fitted calibrator.

    Returns the report stored as ``calibration.report``: what was fitted on what, the
    cross-validated AUROC of ``confidence`` against that of the scores, per-feature
    AUROCs, a reliability table, the selective-captioning figure, and confidence on the
    ``unfamiliar`` pictures. ``dataset`` may be several datasets (a :class:`DatasetMix`): then
    their train and dev splits are pooled, and ``per_set`` reports each dev set on its own.
    """
    mix = dataset if isinstance(dataset, DatasetMix) else mix_datasets([dataset])
    dataset = mix.merged
    train, dev = dataset.splits.get("train", []), dataset.splits.get("val", [])
    for name, each in zip(mix.names, mix.datasets):
        if not each.splits.get("train") or not each.splits.get("val"):
            raise ValueError(
                f"{each.root}: calibration needs a train split (familiarity, ending rule) and a "
                "val split (the calibrator's labels)"
                + (f" in every dataset given ({name} lacks one)" if mix.several else "")
            )
    add_missing_word_rules(model, train, str(dataset.root), log)
    model.calibration = None  # the captioner must not use an old calibrator while we fit a new one
    captioner = Captioner(model, runtime, beam, encoder_weights)
    _fit_familiarity_and_neighbours(
        model,
        captioner,
        train,
        {i: mix.names[d] for i, d in mix.owner.items()},
        runtime,
        cache_dir=cache_dir,
        train_images=train_images,
        neighbours_k=neighbours_k,
        components=components,
        refit=refit_familiarity,
        log=log,
    )
    log(f"dev: encoding {len(dev)} pictures")
    encoded = encode_cached(captioner, [(r.image_id, r) for r in dev], cache_dir, runtime, pooled=False, log=log)
    by_id = {r.image_id: r for r in dev}
    captions, evidence = caption_encoded(captioner, encoded)
    texts = [c.text for c in captions]
    # Each dev set is labelled against its own references (CIDEr-D's document frequencies are that set's).
    sets = [np.array([mix.owner[i] == d for i in encoded.ids]) for d in range(len(mix.datasets))]
    cider, labels = np.zeros(len(texts)), np.zeros(len(texts), dtype=np.int64)
    for members in sets:
        if members.any():
            where = np.flatnonzero(members)
            cider[where], labels[where] = quality_labels(
                [texts[i] for i in where], [by_id[encoded.ids[i]].captions for i in where], label_threshold
            )
    log(f"dev: {labels.mean():.1%} of captions reach CIDEr-D {label_threshold}")

    oof = cross_validated(evidence, labels, folds, EVIDENCE, l2)
    logprob = evidence[:, EVIDENCE.index("mean_logprob")]
    ranked_score = np.array([c.score for c in captions])
    single = {
        name: round(
            auroc(np.nan_to_num(evidence[:, i], nan=0.0) * (-1 if name in ("familiarity", "length") else 1), labels), 3
        )
        for i, name in enumerate(EVIDENCE)
    }
    picture_free = [f for f in EVIDENCE if f not in ("familiarity", "neighbour_similarity", "consensus")]
    without_fam = cross_validated(evidence, labels, folds, [f for f in EVIDENCE if f != "familiarity"], l2)
    summary_only = cross_validated(evidence, labels, folds, picture_free + ["familiarity"], l2)
    calibrator = fit_calibrator(evidence, labels, EVIDENCE, l2)
    threshold = recommend_threshold(oof, labels)
    report: dict[str, Any] = {
        "label": f"per-image CIDEr-D >= {label_threshold} (batchcap.model.cider.CiderD, document frequencies from "
        "the dev references)",
        "fitted_on": f"{len(labels)} val pictures of {dataset.root}",
        "pooled": {
            "pictures": len(labels),
            "acceptable_share": round(float(labels.mean()), 3),
            "auroc": _rounded_auroc(oof, labels),
            "selective": selective_figure(oof, labels),
        },
        "beam": {
            "beam_size": beam.beam_size,
            "max_len": beam.max_len,
            "length_penalty": beam.length_penalty,
            "consensus_weight": beam.consensus_weight,
        },
        "precision": runtime.precision,
        "acceptable_share": round(float(labels.mean()), 3),
        "auroc": {
            f"confidence ({folds}-fold cross-validated)": round(auroc(oof, labels), 3),
            "confidence without familiarity (cross-validated)": round(auroc(without_fam, labels), 3),
            "confidence without neighbours: log-probs, margin, length, familiarity (cross-validated)": round(
                auroc(summary_only, labels), 3
            ),
            "logprob (schema-1 score: mean log-prob per token)": round(auroc(logprob, labels), 3),
            "score (search ranking score)": round(auroc(ranked_score, labels), 3),
            "single features (sign: higher = better)": single,
        },
        "reliability": reliability_table(oof, labels),
        "recommended_min_confidence": threshold,
        "dev": {
            "mean_confidence": round(float(oof.mean()), 3),
            "set_aside_share": round(float((oof < threshold).mean()), 3),
            "mean_cider": round(float(cider.mean()), 3),
        },
    }
    if mix.several:
        pooled_threshold = report["pooled"]["selective"]["threshold"]
        report["per_set"] = {
            name: {
                "root": each.root,
                "pictures": int(members.sum()),
                "acceptable_share": round(float(labels[members].mean()), 3) if members.any() else None,
                "auroc": _rounded_auroc(oof[members], labels[members]),
                "selective": selective_figure(oof[members], labels[members]),
                "unacceptable_kept_at_pooled_threshold": (
                    round(float((oof[members & (labels == 0)] >= pooled_threshold).mean()), 3)
                    if pooled_threshold is not None and (members & (labels == 0)).any()
                    else None
                ),
            }
            for name, each, members in zip(mix.names, mix.datasets, sets)
        }
    grid = THRESHOLD_GRID
    report["thresholds"] = threshold_table(oof, labels, grid)
    if unfamiliar is not None:
        report["unfamiliar"] = _unfamiliar_report(
            captioner, calibrator, unfamiliar, evidence, threshold, grid, cache_dir=cache_dir, runtime=runtime, log=log
        )
    model.calibration = Calibrator(
        calibrator.features, calibrator.center, calibrator.scale, calibrator.coef, calibrator.intercept, report
    )
    return report


def _fit_familiarity_and_neighbours(
    model: CaptionModel,
    captioner: Captioner,
    train: Sequence[CaptionRecord],
    dataset_of: dict[str, str],
    runtime: RuntimeConfig,
    *,
    cache_dir: str | Path,
    train_images: int | None,
    neighbours_k: int,
    components: int,
    refit: bool,
    log: Log,
) -> None:
    """Fit what tells familiar pictures from new ones, from pooled features of training pictures.

    Familiarity is kept when the model has it (unless ``refit``); the neighbours are fitted again
    unless the model's are of the same pictures, ``k`` and weighting: more and closer neighbours
    make a better consensus, so they default to every training picture. ``dataset_of`` names each
    training picture's dataset; neighbours stored without them are fitted again.
    """
    if model.familiarity is None or refit:
        subset = train_subset(train, train_images)
        log(f"familiarity: pooled features of {len(subset)} train pictures")
        pooled = encode_cached(captioner, [(r.image_id, r) for r in subset], cache_dir, runtime, pooled=True, log=log)
        model.familiarity = fit_familiarity(
            pooled.features.float(),
            components,
            note=familiarity_note(len(pooled.ids), len(train), runtime.precision, components),
        )
        model.neighbours = None
    subset = train_subset(train, train_images)
    stored = model.neighbours
    if (
        stored is None
        or stored.temperature != NEIGHBOUR_TEMPERATURE
        or stored.k != min(neighbours_k, len(subset))
        or len(stored.captions) != len(subset)
        or stored.datasets is None
    ):
        log(f"neighbours: pooled features of {len(subset)} train pictures, {neighbours_k} nearest each")
        pooled = encode_cached(captioner, [(r.image_id, r) for r in subset], cache_dir, runtime, pooled=True, log=log)
        by_train_id = {r.image_id: r for r in subset}
        model.neighbours = fit_neighbours(
            model.familiarity,
            pooled.features.float(),
            [by_train_id[i] for i in pooled.ids],
            neighbours_k,
            [dataset_of[i] for i in pooled.ids],
        )


def _unfamiliar_report(
    captioner: Captioner,
    calibrator: Any,
    unfamiliar: str | Path,
    dev_evidence: np.ndarray,
    threshold: float,
    grid: Sequence[float],
    *,
    cache_dir: str | Path,
    runtime: RuntimeConfig,
    log: Log,
) -> dict[str, Any]:
    """How the fitted confidence treats pictures unlike the dev set: their confidence and familiarity."""
    items = folder_items(unfamiliar)
    log(f"unfamiliar: encoding {len(items)} pictures of {unfamiliar}")
    other = encode_cached(captioner, items, cache_dir, runtime, pooled=False, log=log)
    other_captions, other_evidence = caption_encoded(captioner, other)
    conf = calibrator(other_evidence)
    column = EVIDENCE.index("familiarity")
    fam_dev, fam_other = dev_evidence[:, column], other_evidence[:, column]
    return {
        "pictures": f"{len(other.ids)} pictures of {unfamiliar}",
        "mean_confidence": round(float(conf.mean()), 3),
        "set_aside_share": round(float((conf < threshold).mean()), 3),
        "familiarity_auroc_vs_dev": round(
            auroc(np.concatenate([fam_other, fam_dev]), np.r_[np.ones(len(fam_other)), np.zeros(len(fam_dev))]), 3
        ),
        "set_aside_at": {str(p): round(float((conf < p).mean()), 3) for p in grid},
        "examples": [
            {"id": i, "caption": c.text, "confidence": round(float(p), 3)}
            for i, c, p in list(zip(other.ids, other_captions, conf))[:5]
        ],
    }


def format_report(report: dict[str, Any]) -> str:
    """The calibration report as the few lines a person reads."""
    lines = [f"label: {report['label']}; acceptable on dev: {report['acceptable_share']:.1%}"]
    for name, value in report["auroc"].items():
        lines.append(f"  AUROC {name}: {value}")
    sets = dict(report.get("per_set", {}))
    if "pooled" in report:
        sets["pooled" if sets else "dev"] = report["pooled"]
    if sets:
        lines.append(
            "  per dev set (out-of-fold): pictures / acceptable / AUROC / bad captions kept when 80% of good ones are"
        )
    for name, row in sets.items():
        figure = row["selective"]
        kept = figure["unacceptable_kept"]
        lines.append(
            f"    {name}: {row.get('pictures', '-')} / "
            + (f"{row['acceptable_share']:.1%}" if row.get("acceptable_share") is not None else "-")
            + f" / {row.get('auroc', '-')} / "
            + (f"{kept:.1%} (confidence >= {figure['threshold']})" if kept is not None else "n/a")
        )
    lines.append("  reliability (out-of-fold, dev): bin / pictures / mean confidence / acceptable")
    for row in report["reliability"]:
        lines.append(f"    {row['bin']}  {row['images']:>5}  {row['mean_confidence']}  {row['acceptable']}")
    lines.append(
        f"  recommended --min-confidence {report['recommended_min_confidence']}: sets aside "
        f"{report['dev']['set_aside_share']:.1%} of dev (mean confidence {report['dev']['mean_confidence']})"
    )
    for row in report.get("thresholds", []):
        other = report.get("unfamiliar", {}).get("set_aside_at", {}).get(str(row["min_confidence"]))
        bad = row["dev_bad_among_set_aside"]  # None when the threshold sets no dev picture aside
        good_kept, good_among = row.get("dev_acceptable_kept"), row.get("dev_acceptable_among_kept")
        lines.append(
            f"    --min-confidence {row['min_confidence']}: sets aside {row['dev_set_aside']:.1%} of dev"
            + (f" ({bad:.0%} of them bad)" if bad is not None else "")
            + (f", {other:.1%} of the unfamiliar pictures" if other is not None else "")
            + (f"; keeps {good_kept:.0%} of the acceptable" if good_kept is not None else "")
            + (f", {good_among:.0%} of what it keeps acceptable" if good_among is not None else "")
        )
    if "unfamiliar" in report:
        u = report["unfamiliar"]
        lines.append(
            f"  unfamiliar ({u['pictures']}): mean confidence {u['mean_confidence']}, set aside "
            f"{u['set_aside_share']:.1%}; familiarity AUROC vs dev {u['familiarity_auroc_vs_dev']}"
        )
    return "\n".join(lines)
