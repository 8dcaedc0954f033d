"""batchcap.training.calibrate: the pure parts (subset, labels, cross-validation, threshold, report text)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import write_images

from batchcap.data.captions.records import CaptionRecord
from batchcap.model.confidence import EVIDENCE, auroc
from batchcap.training.calibrate import (
    cross_validated,
    folder_items,
    format_report,
    quality_labels,
    recommend_threshold,
    threshold_table,
    train_subset,
)


def records(n: int) -> list[CaptionRecord]:
    return [CaptionRecord(f"id{i:03d}", (f"caption {i}",)) for i in range(n)]


def test_train_subset_is_evenly_spaced_over_sorted_ids() -> None:
    shuffled = records(100)
    np.random.default_rng(0).shuffle(shuffled)  # type: ignore[arg-type]
    chosen = train_subset(shuffled, 10)
    assert [r.image_id for r in chosen] == [f"id{i:03d}" for i in range(0, 100, 10)]
    assert train_subset(list(reversed(shuffled)), 10) == chosen  # input order does not matter
    odd = [r.image_id for r in train_subset(records(10), 4)]
    assert odd == ["id000", "id002", "id005", "id007"]  # int(i * 2.5)
    assert len({r.image_id for r in train_subset(records(1000), 333)}) == 333  # no repeats


def test_train_subset_of_more_than_there_are_is_all_sorted() -> None:
    some = records(5)[::-1]
    assert [r.image_id for r in train_subset(some, 5)] == [f"id{i:03d}" for i in range(5)]
    assert len(train_subset(some, 50)) == 5


REFS = [
    ["a black dog runs on the grass", "a dog running across a lawn"],
    ["a man rides a red bicycle", "a cyclist on a red bike"],
    ["two children swim in a pool", "kids swimming in blue water"],
    ["a woman sits on a park bench", "a lady on a bench"],
]


def test_quality_labels_score_each_caption_against_its_own_references() -> None:
    captions = ["a black dog runs on the grass", "A man rides a RED bicycle.", "a plate of food", "a dog"]
    cider, labels = quality_labels(captions, REFS, threshold=0.5)
    assert cider.shape == labels.shape == (4,)
    assert labels.dtype == np.int64
    assert cider[0] > 1.0 and cider[1] > 1.0  # matches (case and punctuation normalised)
    assert cider[2] == pytest.approx(0.0)
    assert list(labels) == [1, 1, 0, int(cider[3] >= 0.5)]
    swapped, _ = quality_labels([captions[1], captions[0]], REFS[:2], threshold=0.5)
    assert swapped.max() < 0.5  # a caption is judged by its own picture's references only


def test_quality_labels_threshold_is_inclusive() -> None:
    cider, _ = quality_labels(["a dog runs on the grass"] + [r[0] for r in REFS[1:]], REFS, threshold=0.0)
    _, labels = quality_labels(["a dog runs on the grass"] + [r[0] for r in REFS[1:]], REFS, threshold=cider[0])
    assert labels[0] == 1


def _evidence(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = (rng.random(n) < 0.5).astype(np.int64)
    return rng.normal(size=(n, len(EVIDENCE))), labels


def test_cross_validated_confidence_finds_a_feature_that_carries_the_label() -> None:
    evidence, labels = _evidence(200, seed=1)
    evidence[:, EVIDENCE.index("margin")] = labels + 0.4 * np.random.default_rng(2).normal(size=200)
    oof = cross_validated(evidence, labels, folds=5)
    assert oof.shape == (200,) and ((oof > 0) & (oof < 1)).all()
    assert auroc(oof, labels) > 0.9


def test_cross_validated_confidence_of_noise_is_near_chance() -> None:
    evidence, labels = _evidence(600, seed=3)
    assert abs(auroc(cross_validated(evidence, labels, folds=5), labels) - 0.5) < 0.1


def test_each_picture_is_scored_without_its_own_fold() -> None:
    """Relabelling the pictures of fold 0 changes every other fold's confidences, never fold 0's."""
    evidence, labels = _evidence(50, seed=4)
    evidence[:, 0] += labels
    before = cross_validated(evidence, labels, folds=5)
    fold0 = np.arange(50) % 5 == 0
    flipped = labels.copy()
    flipped[fold0] = 1 - flipped[fold0]
    after = cross_validated(evidence, flipped, folds=5)
    assert np.array_equal(before[fold0], after[fold0])
    assert not np.allclose(before[~fold0], after[~fold0])


def test_cross_validated_uses_only_the_named_features() -> None:
    evidence, labels = _evidence(100, seed=5)
    column = EVIDENCE.index("familiarity")
    evidence[:, column] = labels  # a perfect feature, left out
    without = [f for f in EVIDENCE if f != "familiarity"]
    assert auroc(cross_validated(evidence, labels, 5, without), labels) < 0.8
    assert auroc(cross_validated(evidence, labels, 5, ["familiarity"]), labels) > 0.95


def test_recommend_threshold_is_the_highest_grid_step_that_sets_aside_mostly_bad_captions() -> None:
    confidence = (np.arange(100) + 0.5) / 100
    labels = (confidence >= 0.3).astype(np.int64)  # everything under 0.3 is bad
    # below 0.35: 30 bad of 35 (86%); below 0.4: 30 of 40 (75%), under the 80% asked for
    assert recommend_threshold(confidence, labels) == 0.35
    assert recommend_threshold(confidence, labels, bad_share=0.7) == 0.4
    assert recommend_threshold(confidence, labels, bad_share=1.0) == 0.3


def test_recommend_threshold_falls_back_to_the_lowest_step() -> None:
    confidence = np.linspace(0.0, 1.0, 50)
    assert recommend_threshold(confidence, np.ones(50, dtype=np.int64)) == 0.05  # nothing bad to set aside
    assert recommend_threshold(np.full(10, 0.5), np.zeros(10, dtype=np.int64)) == 0.95  # all bad
    assert isinstance(recommend_threshold(confidence, np.zeros(50, dtype=np.int64)), float)


def test_folder_items_lists_the_pictures_directly_in_the_folder(tmp_path: Path) -> None:
    write_images(tmp_path, 2, prefix="b")
    write_images(tmp_path, 1, fmt="PNG", prefix="a")
    write_images(tmp_path / "nested", 1)  # not directly in the folder
    (tmp_path / "notes.txt").write_text("not a picture")
    (tmp_path / "UPPER.JPG").write_bytes((tmp_path / "b00000.jpg").read_bytes())
    items = folder_items(tmp_path)
    assert [name for name, _ in items] == ["UPPER.JPG", "a00000.png", "b00000.jpg", "b00001.jpg"]
    assert all(Path(path) == tmp_path / name for name, path in items)
    assert folder_items(str(tmp_path / "nested")) == [("img00000.jpg", str(tmp_path / "nested" / "img00000.jpg"))]


def report(thresholds: list[dict], unfamiliar: dict | None = None) -> dict:
    out = {
        "label": "per-image CIDEr-D >= 0.5",
        "acceptable_share": 0.625,
        "auroc": {"confidence (5-fold cross-validated)": 0.81, "logprob": 0.7},
        "reliability": [
            {"bin": "0.0-0.2", "images": 12, "mean_confidence": 0.1, "acceptable": 0.25},
            {"bin": "0.8-1.0", "images": 30, "mean_confidence": 0.9, "acceptable": 0.93},
        ],
        "recommended_min_confidence": 0.3,
        "dev": {"mean_confidence": 0.6, "set_aside_share": 0.125, "mean_cider": 0.7},
        "thresholds": thresholds,
    }
    if unfamiliar is not None:
        out["unfamiliar"] = unfamiliar
    return out


def test_format_report_reads_as_a_few_lines() -> None:
    text = format_report(
        report(
            [{"min_confidence": 0.3, "dev_set_aside": 0.125, "dev_bad_among_set_aside": 0.8}],
            {
                "pictures": "7 pictures of other/",
                "mean_confidence": 0.2,
                "set_aside_share": 0.5,
                "familiarity_auroc_vs_dev": 0.88,
                "set_aside_at": {"0.3": 0.5},
            },
        )
    )
    lines = text.splitlines()
    assert lines[0] == "label: per-image CIDEr-D >= 0.5; acceptable on dev: 62.5%"
    assert "  AUROC confidence (5-fold cross-validated): 0.81" in lines
    assert "  AUROC logprob: 0.7" in lines
    assert "    0.0-0.2     12  0.1  0.25" in lines
    assert "  recommended --min-confidence 0.3: sets aside 12.5% of dev (mean confidence 0.6)" in lines
    assert (
        "    --min-confidence 0.3: sets aside 12.5% of dev (80% of them bad), 50.0% of the unfamiliar pictures"
    ) in lines
    assert lines[-1] == (
        "  unfamiliar (7 pictures of other/): mean confidence 0.2, set aside 50.0%; familiarity AUROC vs dev 0.88"
    )


def test_format_report_without_unfamiliar_pictures() -> None:
    text = format_report(report([{"min_confidence": 0.3, "dev_set_aside": 0.0, "dev_bad_among_set_aside": 0.5}]))
    assert "unfamiliar" not in text
    assert text.splitlines()[-1] == "    --min-confidence 0.3: sets aside 0.0% of dev (50% of them bad)"


def test_format_report_when_a_threshold_sets_nothing_aside() -> None:
    """``calibrate`` records ``None`` as the bad share of an empty set-aside; the report must still print."""
    text = format_report(report([{"min_confidence": 0.2, "dev_set_aside": 0.0, "dev_bad_among_set_aside": None}]))
    line = text.splitlines()[-1]
    assert line.startswith("    --min-confidence 0.2: sets aside 0.0% of dev")
    assert "None" not in line and "of them bad" not in line


def test_threshold_table_counts_both_sides_of_each_threshold() -> None:
    # ten captions: confidence and whether each is acceptable
    confidence = np.array([0.05, 0.15, 0.25, 0.35, 0.45, 0.55, 0.65, 0.75, 0.85, 0.95])
    labels = np.array([0, 0, 1, 0, 1, 0, 1, 1, 0, 1])
    rows = {row["min_confidence"]: row for row in threshold_table(confidence, labels, (0.0, 0.3, 0.7, 1.0))}
    # 0.3 sets aside the three lowest (two bad); keeps 4 of the 5 acceptable among the 7 it keeps
    assert rows[0.3] == {
        "min_confidence": 0.3,
        "dev_set_aside": 0.3,
        "dev_bad_among_set_aside": round(2 / 3, 3),
        "dev_acceptable_kept": 0.8,
        "dev_acceptable_among_kept": round(4 / 7, 3),
    }
    # 0.7 publishes the three highest, two of them acceptable
    assert rows[0.7]["dev_acceptable_kept"] == 0.4 and rows[0.7]["dev_acceptable_among_kept"] == round(2 / 3, 3)
    assert rows[0.0]["dev_bad_among_set_aside"] is None and rows[0.0]["dev_acceptable_kept"] == 1.0
    assert rows[1.0]["dev_acceptable_among_kept"] is None and rows[1.0]["dev_set_aside"] == 1.0


def test_format_report_says_what_a_threshold_keeps() -> None:
    row = {
        "min_confidence": 0.6,
        "dev_set_aside": 0.69,
        "dev_bad_among_set_aside": 0.64,
        "dev_acceptable_kept": 0.49,
        "dev_acceptable_among_kept": 0.75,
    }
    assert format_report(report([row])).splitlines()[-1] == (
        "    --min-confidence 0.6: sets aside 69.0% of dev (64% of them bad); keeps 49% of the acceptable, "
        "75% of what it keeps acceptable"
    )
