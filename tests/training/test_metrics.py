"""batchcap.training.metrics: the COCO scorers on hand-made captions, the tokenizer choice, the checks."""

from __future__ import annotations

import os
import stat
import sys
from pathlib import Path

import pytest

from batchcap.training.metrics import (
    INSTALL_HINT,
    MetricsUnavailable,
    java_available,
    require_metrics,
    score_captions,
)

REFERENCES = {
    "1": ["a black dog runs across the green grass", "a dog is running on the grass"],
    "2": ["a man rides a red bicycle down the street", "a person on a bike in the city"],
    "3": ["two children play in the blue water", "kids are swimming in a pool"],
    "4": ["a woman sits on a bench in the park", "a lady is sitting on a park bench"],
}
EXACT = {k: v[0] for k, v in REFERENCES.items()}
UNRELATED = {
    "1": "an old clock hangs above the kitchen door",
    "2": "three birds fly over snowy mountains at dawn",
    "3": "a plate of pasta with tomato sauce",
    "4": "the airplane lands on a wet runway",
}
BLEU = [f"BLEU-{n}" for n in range(1, 5)]


def test_fast_scores_have_only_bleu_and_cider_with_batchcap_tokens() -> None:
    scores = score_captions(EXACT, REFERENCES, full=False)
    assert set(scores) == {"images", "tokenizer", *BLEU, "CIDEr"}
    assert scores["images"] == 4 and scores["tokenizer"] == "batchcap"
    assert all(isinstance(scores[k], float) for k in [*BLEU, "CIDEr"])


def test_an_exact_match_has_bleu_one() -> None:
    scores = score_captions(EXACT, REFERENCES, full=False)
    for name in BLEU:
        assert scores[name] == pytest.approx(1.0, abs=1e-6), name


def test_the_batchcap_tokenizer_normalises_before_scoring() -> None:
    """Case and punctuation do not count: the prediction is normalised like the references."""
    shouted = {k: v.upper().replace(" ", " , ") + " !" for k, v in EXACT.items()}
    assert score_captions(shouted, REFERENCES, full=False)["BLEU-4"] == pytest.approx(1.0, abs=1e-6)


def test_matching_captions_score_higher_than_unrelated_ones() -> None:
    good = score_captions(EXACT, REFERENCES, full=False)
    bad = score_captions(UNRELATED, REFERENCES, full=False)
    for name in [*BLEU, "CIDEr"]:
        assert good[name] > bad[name] + 0.3, name
    assert bad["BLEU-4"] < 0.05
    half = {**EXACT, "3": UNRELATED["3"], "4": UNRELATED["4"]}
    middle = score_captions(half, REFERENCES, full=False)
    assert bad["CIDEr"] < middle["CIDEr"] < good["CIDEr"]


def test_only_predicted_ids_are_scored() -> None:
    scores = score_captions({"1": EXACT["1"], "2": EXACT["2"]}, REFERENCES, full=False)
    assert scores["images"] == 2
    with pytest.raises(ValueError, match="no captions"):
        score_captions({}, REFERENCES)
    with pytest.raises(KeyError):
        score_captions({"5": "a dog"}, REFERENCES, full=False)  # a prediction needs references


def test_full_scores_without_java_add_rouge_and_say_meteor_was_skipped() -> None:
    scores = score_captions(EXACT, REFERENCES, full=True, use_java=False)
    assert scores["tokenizer"] == "batchcap"
    assert scores["ROUGE-L"] == pytest.approx(1.0, abs=1e-6)
    assert scores["METEOR"] is None
    assert "METEOR skipped" in str(scores["note"])
    unrelated = score_captions(UNRELATED, REFERENCES, full=True, use_java=False)
    assert unrelated["ROUGE-L"] < 0.5


@pytest.mark.slow
def test_full_scores_with_java_use_ptb_tokens_and_meteor() -> None:
    if not java_available():
        pytest.skip("no java on PATH")
    scores = score_captions(EXACT, REFERENCES, full=True)
    assert scores["tokenizer"] == "ptb" and "note" not in scores
    assert scores["BLEU-4"] == pytest.approx(1.0, abs=1e-6)
    assert isinstance(scores["METEOR"], float) and scores["METEOR"] > 0.9


def test_java_available_looks_on_the_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    assert java_available() is False
    java = empty / "java"
    java.write_text("#!/bin/sh\nexit 0\n")
    java.chmod(java.stat().st_mode | stat.S_IXUSR)
    assert java_available() is True
    monkeypatch.setenv("PATH", os.pathsep.join([str(tmp_path / "nowhere"), str(empty)]))
    assert java_available() is True


def test_require_metrics_passes_when_installed_and_names_the_fix_when_not(monkeypatch: pytest.MonkeyPatch) -> None:
    require_metrics()  # a regular dependency: installed here
    monkeypatch.setitem(sys.modules, "pycocoevalcap", None)  # how Python spells "blocked"
    with pytest.raises(MetricsUnavailable) as caught:
        require_metrics()
    assert INSTALL_HINT in str(caught.value)
