"""``batchcap info``: the model's lineage by the names its files recorded."""

from __future__ import annotations

import re
from pathlib import Path

from click.testing import CliRunner

from batchcap.cli import cli
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
    last = re.findall(r"\*\*(\d+)\.\*\* `([\w-]+)`, the shipped model", row)
    assert last and f"{last[0][0]}. {last[0][1]}@" in result.output, row
