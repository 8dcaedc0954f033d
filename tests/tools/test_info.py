"""``batchcap info``: the model's lineage by the names its files recorded."""

from __future__ import annotations

import json
import re
from pathlib import Path

from click.testing import CliRunner

from batchcap.cli import cli
from batchcap.model.terms import model_terms
from batchcap.tools.info import lineage


def test_lineage_reads_the_init_model_chain_oldest_first() -> None:
    first = {"config": {"lr": 8e-4}, "epoch": 8, "history": [{"epoch": 8, "val": {"CIDEr": 0.479}}]}
    second = {
        "config": {"lr": 1e-4, "self_critical": True},
        "epoch": 3,
        "init_model": {"identity": "base@111111111111", "training": first},
    }
    third = {
        "config": {"lr": 5e-5, "self_critical": True},
        "epoch": 5,
        "init_model": {"identity": "scst@222222222222", "training": second},
    }
    assert lineage("final@333333333333", third) == [
        "base@111111111111: teacher forcing, lr 0.0008, epoch 8 selected, val CIDEr-D 0.479",
        "scst@222222222222: self-critical (CIDEr-D), lr 0.0001, epoch 3 selected",
        "final@333333333333: self-critical (CIDEr-D), lr 5e-05, epoch 5 selected",
    ]
    assert lineage("only@0", first) == ["only@0: teacher forcing, lr 0.0008, epoch 8 selected, val CIDEr-D 0.479"]
    pretrained = {**first, "pretrain": {"captions": 116496, "held_out_perplexity": {"before": 2548.0, "after": 30.1}}}
    assert lineage("lm@0", pretrained) == [
        "lm@0: language model on 116496 captions (held-out perplexity 30.1), "
        "then teacher forcing, lr 0.0008, epoch 8 selected, val CIDEr-D 0.479"
    ]


def test_info_on_the_packaged_model_shows_the_stages_the_model_card_names() -> None:
    result = CliRunner().invoke(cli, ["info"], terminal_width=200)
    assert result.exit_code == 0, result.output
    assert "lineage" in result.output
    # Every earlier stage the model card's lineage line names, in its order, is what the file records.
    card = (Path(__file__).resolve().parents[2] / "docs" / "model-card.md").read_text(encoding="utf-8")
    row = next(line for line in card.splitlines() if line.startswith("- **Lineage:**"))
    named = re.findall(r"\*\*(\d+)\.\*\* `([\w-]+@[0-9a-f]{12})`", row)
    assert named, row
    for number, identity in named:
        assert f"{number}. {identity}" in result.output, (identity, result.output)
    shipped = re.findall(r"`([\w-]+)`, the shipped model", row)
    assert shipped and f"{shipped[0]}@" in result.output, row


def test_licence_file_is_mit_as_pyproject_says() -> None:
    root = Path(__file__).resolve().parents[2]
    licence = (root / "LICENSE").read_text(encoding="utf-8")
    assert licence.startswith("MIT License") and "Copyright (c) 2026 the batchcap authors" in licence
    assert 'license = { text = "MIT" }' in (root / "pyproject.toml").read_text(encoding="utf-8")


def test_info_says_the_packaged_model_is_for_research_use_only() -> None:
    text = CliRunner().invoke(cli, ["info"], terminal_width=400)
    assert text.exit_code == 0, text.output
    assert "terms of use" in text.output and "research use only" in text.output
    assert "Flickr8k" in text.output and "Flickr30k captions" in text.output and "Keras" in text.output

    as_json = CliRunner().invoke(cli, ["info", "--json"])
    assert as_json.exit_code == 0, as_json.output
    licence = json.loads(as_json.output)["licence"]
    assert licence["terms"].startswith("research use only")
    terms = {s["source"].split(" (")[0]: s["terms"] for s in licence["sources"]}
    assert terms["Flickr8k"] == terms["Flickr30k captions"] == "research use"
    assert terms["Xception ImageNet weights from Keras"] == "MIT"
    assert licence["code"].startswith("MIT") and "training records in the model file" in licence["basis"]


def test_terms_follow_the_training_data_a_model_file_records(tiny_model_path: Path) -> None:
    # The test model records no real data set: its terms are unknown, not borrowed from the packaged model.
    tiny = CliRunner().invoke(cli, ["info", str(tiny_model_path), "--json"])
    assert tiny.exit_code == 0, tiny.output
    assert json.loads(tiny.output)["licence"]["terms"].startswith("unknown")
    # A model fine-tuned from a Flickr8k model on COCO captions inherits Flickr8k's terms.
    chain = {
        "data": {"format": "coco", "root": "/data/coco"},
        "init_model": {"identity": "base@1", "training": {"data": {"format": "flickr8k", "root": "/d/f8k"}}},
    }
    sources = {s["source"].split(" (")[0]: s["terms"] for s in model_terms({"training": chain})["sources"]}
    assert sources == {"MS-COCO captions": "research use", "Flickr8k": "research use"}
    assert model_terms({"training": chain})["terms"].startswith("research use only")
    # An ensemble's terms are those of every member's data.
    pair = {
        "ensemble": [
            {"identity": "a@1", "training": {"data": {"format": "flickr8k", "root": "/d/f8k"}}},
            {"identity": "b@2", "training": chain},
            {"identity": "c@3", "training": {"data": "my-own-photos"}},
        ]
    }
    sources = {s["source"].split(" (")[0]: s["terms"] for s in model_terms({"training": pair})["sources"]}
    assert sources["MS-COCO captions"] == sources["Flickr8k"] == "research use"
    assert sources["unrecognised training data"].startswith("unknown")
    # A packaged model without training records: what it is known to be.
    assert model_terms({}, is_default_model=True)["terms"].startswith("research use only")


def test_info_says_which_search_settings_the_confidence_was_fitted_for() -> None:
    from batchcap.tools.info import _calibrated_search

    reranked = _calibrated_search({"beam_size": 3, "max_len": 20, "length_penalty": 0.0, "consensus_weight": 1.0})
    assert "beam 3" in reranked and "consensus weight 1" in reranked and "uncalibrated" in reranked
    # a calibration from before reranking records no weight: it was fitted on the search's own order
    assert "no reranking" in _calibrated_search({"beam_size": 5, "max_len": 20, "length_penalty": 0.6})
    assert _calibrated_search({}) == ""
    shown = CliRunner().invoke(cli, ["info"])
    assert shown.exit_code == 0, shown.output
    cells = " ".join(re.sub(r"[│┃┌┐└┘├┤┬┴┼─]", " ", shown.output).split())  # the table's wrapped cell, as one line
    assert "fitted for beam 3, length penalty 0, consensus weight 1 (other search settings" in cells
    assert re.search(
        r"neighbours \d+ training pictures with \d+ captions; "
        r"the 10 nearest are read by the confidence and by consensus reranking",
        cells,
    )
