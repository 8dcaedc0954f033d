"""The word rules end to end: learnt from a dataset's train captions into a model file
(``batchcap calibrate --word-rules-only``), reported by ``batchcap info``, obeyed when captioning
unless switched off."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import make_tiny_model, write_images

import batchcap
from batchcap.cli import cli
from batchcap.data.captions.records import CaptionRecord
from batchcap.model.modelfile import load_model, read_metadata, save_model
from batchcap.training.calibrate import add_missing_word_rules, learn_word_rules

FAST = {"device": "cpu", "precision": "fp32", "backend": "torch"}  # no OpenVINO conversion
FAST_CLI = ["--device", "cpu", "--precision", "fp32", "--backend", "torch"]

# "red" ends "a ball in red" but never "... in a red"; "runs runs" is said often enough to be allowed
CAPTIONS = ["a man runs on the grass"] * 30 + ["a dog in a red ball"] * 30 + ["a ball in red"] * 30
CAPTIONS += ["the cat runs runs"] * 6


def write_flickr8k(root: Path, captions: list[str], split: str = "train") -> None:
    """A Flickr8k-layout dataset of ``captions``, one per tiny picture, all in ``split``."""
    text = root / "Flickr8k_text"
    text.mkdir(parents=True)
    names = [p.name for p in write_images(root / "Flicker8k_Dataset", len(captions), size=(8, 8))]
    tokens = "".join(f"{name}#0\t{caption} .\r\n" for name, caption in zip(names, captions))
    (text / "Flickr8k.token.txt").write_text(tokens, newline="")
    for name, listed in (("train", split == "train"), ("dev", split == "dev"), ("test", False)):
        (text / f"Flickr_8k.{name}Images.txt").write_text("\n".join(names) + "\n" if listed else "")


def test_learn_word_rules_leaves_unendable_words_to_the_ending_rule() -> None:
    records = [CaptionRecord(f"p{i}", (c,)) for i, c in enumerate(CAPTIONS)]
    rules = learn_word_rules(records, unendable=(), learnt_from="test captions")
    assert ("a", "red") in rules.unendable_pairs and rules.repeatable_words == ("runs",)
    assert ("a", "red") not in learn_word_rules(records, ("red",), "test captions").unendable_pairs


def test_add_missing_word_rules_keeps_the_rules_a_model_has(tmp_path: Path) -> None:
    model = make_tiny_model(tmp_path / "m.safetensors")
    model.unendable_words, model.ending_rule = ("a",), {"learnt_from": "somewhere else"}
    records = [CaptionRecord(f"p{i}", (c,)) for i, c in enumerate(CAPTIONS)]
    said: list[str] = []
    add_missing_word_rules(model, records, "data/", said.append)
    assert model.unendable_words == ("a",) and model.ending_rule["learnt_from"] == "somewhere else"
    assert ("a", "red") in (model.unendable_pairs or ()) and model.repeatable_words == ("runs",)
    assert model.repeat_rule["learnt_from"] == "96 train images of data/"
    assert len(said) == 2  # the pairs and the repeat rule, not the words it had
    said.clear()
    model.repeatable_words = ()
    add_missing_word_rules(model, records, "data/", said.append)
    assert said == [] and model.repeatable_words == ()  # nothing missing: nothing relearnt


def test_calibrate_word_rules_only_then_info_then_captions_obey_them(tmp_path: Path) -> None:
    data = tmp_path / "data"
    write_flickr8k(data, CAPTIONS)
    base = tmp_path / "base.safetensors"
    make_tiny_model(base)  # stores no word rules, like files from before them
    ruled = tmp_path / "ruled.safetensors"
    runner = CliRunner()
    args = ["calibrate", str(data), "--model", str(base), "--word-rules-only", "--out", str(ruled)]
    result = runner.invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert "word pairs may not end a caption" in result.output and "1 words may follow themselves" in result.output
    meta = read_metadata(ruled)
    assert ["a", "red"] in meta["ending_rule"]["unendable_pairs"] and "a" in meta["ending_rule"]["unendable_words"]
    assert meta["repeat_rule"]["repeatable_words"] == ["runs"]
    assert meta["tensors_sha256"] == read_metadata(base)["tensors_sha256"]  # the weights are untouched

    shown = runner.invoke(cli, ["info", str(ruled)], terminal_width=200)
    assert shown.exit_code == 0, shown.output
    assert "word pairs may not end one (a red" in shown.output
    assert "1 words may follow themselves (runs" in shown.output

    model = load_model(ruled)
    runs, blue = model.vocab.ids_of(["runs"])[0], model.vocab.ids_of(["blue"])[0]
    model.decoder_state["out.bias"][blue] += 4.0  # a decoder that likes "blue" whatever came before
    model.decoder_state["out.bias"][model.vocab.end_id] -= 2.0
    save_model(model, ruled)
    pictures = write_images(tmp_path / "photos", 12)
    plain = batchcap.load_model(ruled, beam=3, allow_repeated_words=True, no_ending_rule=True, **FAST)
    loose = [r.caption.split() for r in plain.caption(pictures)]
    doubled = [w for c in loose for w, v in zip(c, c[1:]) if w == v]
    assert doubled, loose  # the random model doubles words when allowed to
    strict = [r.caption.split() for r in batchcap.load_model(ruled, beam=3, **FAST).caption(pictures)]
    assert not [w for c in strict for w, v in zip(c, c[1:]) if w == v and w != model.vocab.words[runs]]
    assert strict != loose


def test_word_rules_only_needs_a_train_split(tmp_path: Path) -> None:
    data = tmp_path / "data"
    write_flickr8k(data, CAPTIONS[:3], split="dev")
    make_tiny_model(tmp_path / "base.safetensors")
    args = ["calibrate", str(data), "--model", str(tmp_path / "base.safetensors"), "--word-rules-only"]
    result = CliRunner().invoke(cli, [*args, "--out", str(tmp_path / "x.safetensors")])
    assert result.exit_code == 2 and "train split" in result.output
    assert not (tmp_path / "x.safetensors").exists()


@pytest.mark.parametrize("flag", ["--no-ending-rule", "--allow-repeated-words"])
def test_the_off_switches_are_recorded_in_the_run_configuration(flag: str, tmp_path: Path) -> None:
    from batchcap.outputs.store import read_output_meta

    pictures = write_images(tmp_path / "photos", 2)
    out = tmp_path / "o.parquet"
    model = tmp_path / "m.safetensors"
    make_tiny_model(model)
    result = CliRunner().invoke(
        cli,
        ["run", str(pictures[0].parent), "--out", str(out), "--model", str(model), "--workers", "0", *FAST_CLI, flag],
    )
    assert result.exit_code == 0, result.output
    beam = read_output_meta(out)["resume_settings"]["beam"]
    assert (beam["ending_rule"], beam["allow_repeated_words"]) == (
        (False, False) if flag == "--no-ending-rule" else (True, True)
    )
