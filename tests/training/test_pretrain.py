"""Language-model pretraining on caption text: reading, leak filtering, learning, and its place in training."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import timm
import torch
from click.testing import CliRunner
from conftest import write_shapes_dataset
from safetensors.torch import save_file

from batchcap.cli import cli
from batchcap.config import DecoderConfig, RuntimeConfig
from batchcap.model.decoder import CaptionDecoder
from batchcap.model.modelfile import load_model
from batchcap.model.terms import model_terms
from batchcap.model.text import Vocabulary, normalize_caption
from batchcap.training.pretrain import (
    PretrainError,
    perplexity,
    prepare_caption_text,
    pretrain_language_model,
    read_caption_lines,
    usable_caption_text,
)

CPU = RuntimeConfig(device="cpu", precision="fp32", batch_size=8, workers=0)


def test_token_files_and_plain_text_are_read(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens.txt"
    tokens.write_bytes(b"1.jpg#0\tA dog runs .\r\n1.jpg#1\tA dog plays\r\n\r\n2.jpg#0\tTwo cats .\r\n")
    assert read_caption_lines(str(tokens)) == [
        ("1.jpg", "A dog runs ."),
        ("1.jpg", "A dog plays"),
        ("2.jpg", "Two cats ."),
    ]
    plain = tmp_path / "plain.txt"
    plain.write_text("a dog runs\n\n  two cats sit  \n")
    assert read_caption_lines(str(plain)) == [(None, "a dog runs"), (None, "two cats sit")]


@pytest.mark.parametrize(
    "content, message",
    [
        (b"1.jpg#0\ta dog\nno tab here\n", "line 2: expected IMAGE#N<TAB>caption"),
        (b"\xff\xfe a dog\n", "not UTF-8"),
        (b"\n\n", "no captions"),
    ],
)
def test_unusable_text_is_refused_with_the_reason(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "text.txt"
    path.write_bytes(content)
    with pytest.raises(PretrainError, match=message):
        read_caption_lines(str(path))


def test_captions_that_could_leak_the_selection_split_are_dropped(tmp_path: Path) -> None:
    path = tmp_path / "tokens.txt"
    lines = [
        "own.jpg#0\ta red circle",
        "other.jpg#0\tThe dog runs on the grass .",
        "other.jpg#1\ta blue zebra",
        "third.jpg#0\ta dog runs on the grass",
        "fourth.jpg#0\t...",
    ]
    path.write_text("\n".join(lines * 50) + "\n")
    vocab = Vocabulary.build([["a", "dog", "runs", "on", "the", "grass", "blue"]], min_count=1)
    text = prepare_caption_text(str(path), vocab, 20, ["own.jpg"], ["The dog runs on the grass."], seed=0)
    report = text.report
    assert (report["dropped_dataset_photos"], report["dropped_val_captions"], report["dropped_empty"]) == (50, 50, 50)
    # only exact copies (after normalisation) of a validation caption go: "a dog runs ..." stays
    assert report["captions"] + report["held_out"] == 100 and report["held_out"] == 1
    assert report["unknown_word_share"] == pytest.approx(50 / 450, abs=1e-4)  # "zebra" of "a blue zebra"
    zebra = [vocab.start_id, *vocab.encode(["a", "blue"]), vocab.unk_id, vocab.end_id] + [vocab.pad_id] * 17
    rows = torch.cat([text.train, text.held_out]).tolist()
    assert rows.count(zebra) == 50 and len(rows[0]) == 22


def test_several_text_files_are_read_as_one_text_and_each_is_recorded(tmp_path: Path) -> None:
    flickr, coco = tmp_path / "flickr.token.txt", tmp_path / "coco.token.txt"
    flickr.write_text("".join(f"f{i}.jpg#0\ta dog runs on the grass\n" for i in range(30)))
    coco.write_text("".join(f"coco_{i:012d}.jpg#0\ta pizza on a table\n" for i in range(20)) + "own.jpg#0\ta cat\n")
    vocab = Vocabulary.build([["a", "dog", "runs", "on", "the", "grass", "pizza", "table"]], min_count=1)
    text = prepare_caption_text([str(flickr), str(coco)], vocab, 20, ["own.jpg"], [], seed=0)
    report = text.report
    assert [f["file"] for f in report["files"]] == [str(flickr), str(coco)]
    assert [f["lines"] for f in report["files"]] == [30, 21] and report["lines"] == 51
    assert all(len(f["sha256"]) == 64 for f in report["files"]) and "file" not in report
    assert report["dropped_dataset_photos"] == 1 and report["captions"] + report["held_out"] == 50
    pizza = vocab.encode(["pizza"])[0]
    assert sum(pizza in row for row in torch.cat([text.train, text.held_out]).tolist()) == 20
    # one file keeps the single-file report
    assert prepare_caption_text([str(flickr)], vocab, 20, [], [], seed=0).report["file"] == str(flickr)


def test_the_vocabulary_and_pretraining_read_the_text_through_one_filter(tmp_path: Path) -> None:
    text = tmp_path / "text.token.txt"
    text.write_text("own.jpg#0\ta cat sleeps\nx.jpg#0\ta dog runs\ny.jpg#0\tA dog runs.\nz.jpg#0\ta kite flies\n")
    usable = usable_caption_text([str(text)], ["own.jpg"], ["a dog runs"])
    assert usable.captions == [["a", "kite", "flies"]] and usable.lines == 4
    assert usable.dropped == {"dataset_photos": 1, "val_captions": 2, "empty": 0}
    vocab = Vocabulary.build(usable.captions, min_count=1)
    report = prepare_caption_text([str(text), str(text)], vocab, 8, ["own.jpg"], ["a dog runs"], seed=0).report
    assert report["captions"] + report["held_out"] == 2 and report["dropped_val_captions"] == 4


def test_the_terms_of_a_model_name_every_pretraining_text() -> None:
    pretrain = {"files": [{"file": "flickr30k.token.txt"}, {"file": "coco.token.txt"}]}
    sources = [s["source"] for s in model_terms({"training": {"data": "shapes", "pretrain": pretrain}})["sources"]]
    assert any(s.startswith("Flickr30k captions") for s in sources)
    assert any(s.startswith("MS-COCO captions") for s in sources)


def test_pretraining_learns_the_language_of_the_text(tmp_path: Path) -> None:
    torch.manual_seed(0)
    sentences = [
        f"a {c} {s} on the {side}"
        for c in ("red", "green", "blue")
        for s in ("circle", "square")
        for side in ("left", "right")
    ]
    path = tmp_path / "text.txt"
    path.write_text("\n".join(sentences * 40) + "\n")
    vocab = Vocabulary.build((normalize_caption(s) for s in sentences), min_count=1)
    text = prepare_caption_text(str(path), vocab, 8, [], [], seed=0)
    decoder = CaptionDecoder(
        DecoderConfig(
            vocab_size=len(vocab),
            feature_dim=16,
            embed_dim=16,
            hidden_dim=32,
            attention=True,
            attention_dim=16,
            dropout=0.0,
        )
    )
    before = perplexity(decoder, text.held_out, CPU)
    report = pretrain_language_model(
        decoder,
        text,
        CPU,
        epochs=3,
        batch_size=32,
        lr=1e-2,
        warmup_steps=5,
        weight_decay=0.0,
        grad_clip=5.0,
        seed=0,
        log=lambda m: None,
    )
    after = report["held_out_perplexity"]["after"]
    assert report["held_out_perplexity"]["before"] == pytest.approx(before, rel=1e-3)
    # 12 equally likely sentences with 3 free choices: the best per-word perplexity is 12 ** (1/7) ~ 1.43
    assert before > len(vocab) / 2 and after < 1.7, report
    assert report["steps"] == 3 * math.ceil(text.train.shape[0] / 32)


@pytest.mark.slow
def test_train_pretrains_records_it_and_resumes_without_repeating_it(tmp_path: Path) -> None:
    data = tmp_path / "shapes"
    write_shapes_dataset(data, n_train=32, n_val=8)
    text = tmp_path / "text.txt"
    text.write_text(
        "train0000.jpg#0\ta red circle on the left\n"
        + "\n".join(
            f"x{i}.jpg#0\tthe {c} square is on the right" for i, c in enumerate(["red", "green", "blue", "yellow"] * 30)
        )
    )
    weights = tmp_path / "encoder.safetensors"
    save_file(timm.create_model("resnet10t", num_classes=0).state_dict(), weights)
    out = tmp_path / "m.safetensors"
    common = [
        "train",
        str(data),
        "--out",
        str(out),
        "--encoder",
        "resnet10t",
        "--encoder-weights",
        str(weights),
        "--input-size",
        "64",
        "--batch-size",
        "8",
        "--lr",
        "5e-3",
        "--warmup-steps",
        "5",
        "--embed-dim",
        "16",
        "--hidden-dim",
        "32",
        "--attention-dim",
        "16",
        "--min-word-count",
        "1",
        "--max-caption-len",
        "8",
        "--attention-penalty",
        "0",
        "--precision",
        "fp32",
        "--workers",
        "0",
        "--device",
        "cpu",
        "--cache-dir",
        str(tmp_path / "cache"),
        "--pretrain-captions",
        str(text),
        "--pretrain-epochs",
        "2",
        "--patience",
        "5",
    ]
    first = CliRunner().invoke(cli, [*common, "--epochs", "1"])
    assert first.exit_code == 0, first.output
    assert "language-model pretraining on 119 captions" in first.output
    pretrain = load_model(out).training["pretrain"]
    assert pretrain["dropped_dataset_photos"] == 1 and pretrain["epochs"] == 2 and pretrain["held_out"] == 1
    assert pretrain["held_out_perplexity"]["after"] < pretrain["held_out_perplexity"]["before"]
    again = CliRunner().invoke(cli, [*common, "--epochs", "2", "--resume"])
    assert again.exit_code == 0, again.output
    assert "resumed from" in again.output and "language-model pretraining" not in again.output
    model = load_model(out)
    assert model.training["pretrain"] == pretrain and len(model.training["history"]) >= 1


@pytest.mark.slow
def test_the_text_can_widen_the_vocabulary_and_each_pretraining_epoch_is_scored(tmp_path: Path) -> None:
    data = tmp_path / "shapes"
    write_shapes_dataset(data, n_train=16, n_val=4)
    first, second = tmp_path / "first.txt", tmp_path / "second.txt"
    first.write_text("".join(f"a purple triangle on the {side}\n" for side in ("left", "right") * 3))
    second.write_text("".join(f"x{i}.jpg#0\ta purple kite in the sky\n" for i in range(6)) + "y.jpg#0\ta lonely word\n")
    weights = tmp_path / "encoder.safetensors"
    save_file(timm.create_model("resnet10t", num_classes=0).state_dict(), weights)
    out = tmp_path / "m.safetensors"
    args = ["train", str(data), "--out", str(out), "--encoder", "resnet10t", "--encoder-weights", str(weights)]
    args += ["--input-size", "64", "--batch-size", "8", "--embed-dim", "16", "--hidden-dim", "32"]
    args += ["--attention-dim", "16", "--min-word-count", "3", "--max-caption-len", "8", "--precision", "fp32"]
    args += ["--workers", "0", "--device", "cpu", "--cache-dir", str(tmp_path / "cache"), "--epochs", "1"]
    args += ["--pretrain-captions", str(first), "--pretrain-captions", str(second), "--pretrain-epochs", "2"]
    result = CliRunner().invoke(cli, [*args, "--vocabulary-from-text"])
    assert result.exit_code == 0, result.output
    assert f"({first} + {second})" in result.output and "held-out perplexity" in result.output
    model = load_model(out)
    words = set(model.vocab.words)
    # seen 3 times or more in the text only, and not at all in the photos' captions
    assert {"purple", "triangle", "kite", "sky"} <= words and not {"lonely", "word"} & words
    assert model.training["config"]["vocabulary_from_text"] is True
    by_epoch = model.training["pretrain"]["held_out_perplexity"]["by_epoch"]
    assert len(by_epoch) == 2 and by_epoch[-1] == model.training["pretrain"]["held_out_perplexity"]["after"]
    # without the flag the same text leaves the vocabulary to the photos' captions
    plain = CliRunner().invoke(cli, [*args, "--out", str(tmp_path / "plain.safetensors")])
    assert plain.exit_code == 0, plain.output
    assert "purple" not in load_model(tmp_path / "plain.safetensors").vocab.words


def test_widening_the_vocabulary_needs_the_text_and_a_fresh_decoder(tmp_path: Path) -> None:
    alone = CliRunner().invoke(cli, ["train", str(tmp_path), "--out", "m.safetensors", "--vocabulary-from-text"])
    assert alone.exit_code == 2 and "give that text too" in alone.output
    start = Path(__file__).parents[2] / "batchcap" / "assets" / "default-model.safetensors"
    text = tmp_path / "text.txt"
    text.write_text("a dog\n")
    args = ["train", str(tmp_path), "--out", "m.safetensors", "--init-model", str(start)]
    with_model = CliRunner().invoke(cli, [*args, "--vocabulary-from-text", "--pretrain-captions", str(text)])
    assert with_model.exit_code == 2


def test_pretraining_a_trained_decoder_is_refused(tmp_path: Path) -> None:
    text = tmp_path / "text.txt"
    text.write_text("a dog\n")
    start = Path(__file__).parents[2] / "batchcap" / "assets" / "default-model.safetensors"
    result = CliRunner().invoke(
        cli,
        [
            "train",
            str(tmp_path),
            "--out",
            str(tmp_path / "m.safetensors"),
            "--init-model",
            str(start),
            "--pretrain-captions",
            str(text),
        ],
    )
    assert result.exit_code == 2 and "give one of them" in result.output
