"""Training, calibrating and scoring on several datasets at once: epoch draws by weight, one vocabulary,
validation and selection per dataset, the datasets recorded in the model file, exact resumes."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import timm
import torch
from click.testing import CliRunner
from conftest import COLOURS, SHAPES, SIDES, _draw, shared_path, write_shapes_dataset
from safetensors import safe_open
from safetensors.torch import save_file

import batchcap
from batchcap.cli import cli
from batchcap.config import DecoderConfig, OptionError, TrainConfig
from batchcap.data.captions.factory import load_caption_dataset
from batchcap.data.captions.mixture import dataset_name, mix_datasets
from batchcap.data.captions.records import DatasetError
from batchcap.model.decoder import CaptionDecoder
from batchcap.model.modelfile import load_model
from batchcap.model.terms import model_terms
from batchcap.model.text import Vocabulary
from batchcap.pipeline.api import decode_item
from batchcap.tools.info import lineage
from batchcap.training import driver
from batchcap.training.calibrate import format_report, selective_figure
from batchcap.training.checkpoints import save_checkpoint
from batchcap.training.mixing import combined_scores, draw_counts, epoch_order, selection_score


def write_everyday_json(root: Path, n_train: int = 16, n_val: int = 8, seed: int = 1) -> Path:
    """A Karpathy split JSON like the everyday set: one caption per train photo, five per val photo.

    Its captions use words the shapes dataset never does ("kitchen", "photo"), so a shared
    vocabulary must hold them.
    """
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    images = []
    for split, count, per in (("train", n_train, 1), ("val", n_val, 5)):
        for i in range(count):
            colour = list(COLOURS)[int(rng.integers(len(COLOURS)))]
            shape, side = SHAPES[int(rng.integers(2))], SIDES[int(rng.integers(2))]
            name = f"coco_{split}_{i:04d}.jpg"
            _draw(colour, shape, side, rng).save(root / "images" / name, quality=95)
            sentences = [{"raw": f"a photo of a {colour} {shape} in a kitchen on the {side}"}] * per
            images.append({"filename": name, "cocoid": i, "split": split, "sentences": sentences})
    path = root / "dataset_everyday.json"
    path.write_text(json.dumps({"dataset": "coco-everyday", "images": images}))
    return path


# -- epoch draws --------------------------------------------------------------------------------


def test_draw_counts_split_an_epoch_by_weight_and_leave_no_dataset_out() -> None:
    assert draw_counts(100, [3, 1]) == [75, 25]
    assert draw_counts(10, [1, 1, 1]) == [4, 3, 3] and sum(draw_counts(10, [1, 1, 1])) == 10
    assert draw_counts(50, [1000, 1]) == [49, 1]  # a tiny weight still gets a draw


def test_epoch_draws_follow_the_weights_reach_every_image_and_repeat_with_the_seed() -> None:
    owners = [0] * 600 + [1] * 100  # a large dataset and a small one, weights 1 : 1

    def epoch(number: int, seed: int = 7) -> list[int]:
        return epoch_order(owners, [1.0, 1.0], torch.Generator().manual_seed(seed + number), seed=seed, epoch=number)

    order = epoch(1)
    assert len(order) == 700
    share = Counter(owners[i] for i in order)
    assert share[0] == 350 and share[1] == 350
    small = Counter(i for i in order if owners[i] == 1)
    assert set(small) == set(range(600, 700))  # oversampled: every image, 3 or 4 times
    assert set(small.values()) == {3, 4}
    assert order == epoch(1) and order != epoch(1, seed=8)
    # undersampled: the next epoch carries on where this one stopped, so two epochs show every image
    first, second = ({i for i in epoch(n) if owners[i] == 0} for n in (1, 2))
    assert len(first) == 350 and first | second == set(range(600))
    # weights 6 : 1 on these sizes: each image about once an epoch, the small one's too
    natural = epoch_order(owners, [6.0, 1.0], torch.Generator().manual_seed(1))
    assert sorted(natural) == list(range(700))
    # no weights: one permutation, as training on one dataset always did
    plain = epoch_order(owners, [], torch.Generator().manual_seed(3))
    assert plain == torch.randperm(700, generator=torch.Generator().manual_seed(3)).tolist()


def test_selection_combines_the_datasets_cider() -> None:
    per = {
        "flickr8k": {"BLEU-4": 0.2, "CIDEr": 0.6, "tokenizer": "batchcap", "examples": [["a", "x"]]},
        "everyday": {"BLEU-4": 0.1, "CIDEr": 0.2, "tokenizer": "batchcap", "examples": [["b", "y"]]},
    }
    assert selection_score(per, "mean") == pytest.approx(0.4)
    assert selection_score(per, "min") == pytest.approx(0.2)
    assert selection_score(per, "first") == pytest.approx(0.6)
    combined = combined_scores(per, "mean")
    assert combined["CIDEr"] == pytest.approx(0.4) and combined["BLEU-4"] == pytest.approx(0.15)
    assert combined["datasets"]["everyday"]["CIDEr"] == 0.2 and combined["examples"] == [["a", "x"], ["b", "y"]]
    with pytest.raises(ValueError, match="mean, min, first"):
        selection_score(per, "best")


# -- the merged dataset ----------------------------------------------------------------------------


def test_mixed_datasets_keep_every_record_and_refuse_an_id_naming_two_files(tmp_path: Path) -> None:
    write_shapes_dataset(tmp_path / "shapes", n_train=6, n_val=4)
    everyday = write_everyday_json(tmp_path / "everyday", n_train=5, n_val=3)
    shapes, coco = load_caption_dataset(tmp_path / "shapes"), load_caption_dataset(everyday)
    assert dataset_name(shapes) == "shapes" and dataset_name(coco) == "everyday"
    mix = mix_datasets([shapes, coco], [3, 1], val_images=2)
    assert len(mix.merged.splits["train"]) == 11 and len(mix.merged.splits["val"]) == 4  # 2 val of each
    assert mix.owner["train0000.jpg"] == 0 and mix.owner["coco_train_0000.jpg"] == 1
    assert [s["name"] for s in mix.summary()] == ["shapes", "everyday"]  # type: ignore[index]
    assert mix_datasets([shapes]).merged is shapes  # one dataset is used as it is
    with pytest.raises(DatasetError, match="2 dataset weights for 1 datasets"):
        mix_datasets([shapes], [1, 2])
    write_shapes_dataset(tmp_path / "other", n_train=6, n_val=4, seed=5)  # same file names, other photos
    with pytest.raises(DatasetError, match="'train0000.jpg'.*unique across the datasets"):
        mix_datasets([shapes, load_caption_dataset(tmp_path / "other")])


def test_flickr8k_and_the_everyday_photos_train_together() -> None:
    """The project's two captioned sets: no id names two photos, and 3 : 1 oversamples the everyday ones."""
    flickr8k = load_caption_dataset(shared_path("data", "flickr8k"))
    everyday = load_caption_dataset(shared_path("data", "everyday-captioned", "dataset_everyday.json"))
    mix = mix_datasets([flickr8k, everyday], [3, 1])
    assert mix.names == ["flickr8k", "everyday"] and everyday.label == "coco-everyday"
    train = mix.merged.splits["train"]
    assert len(train) == len(flickr8k.splits["train"]) + 1080 and len(mix.merged.splits["val"]) == 1000 + 230
    assert draw_counts(len(train), [3, 1])[1] > 1.5 * 1080  # each everyday photo more than once and a half an epoch
    terms = model_terms({"training": {"data": mix.summary()}})
    assert len(terms["sources"]) == 2 and terms["terms"].startswith("research use only")


def test_selective_figure_keeps_four_fifths_of_the_good_captions() -> None:
    confidence = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.85, 0.55, 0.3, 0.2, 0.1])
    labels = np.array([1, 1, 1, 1, 1, 0, 0, 0, 0, 0])
    figure = selective_figure(confidence, labels)
    assert figure == {"threshold": 0.6, "acceptable_kept": 0.8, "unacceptable_kept": 0.2}
    assert selective_figure(confidence, np.ones(10, dtype=np.int64))["unacceptable_kept"] is None
    report = {
        "label": "x",
        "acceptable_share": 0.5,
        "auroc": {},
        "reliability": [],
        "recommended_min_confidence": 0.3,
        "dev": {"set_aside_share": 0.3, "mean_confidence": 0.4},
        "pooled": {"pictures": 10, "acceptable_share": 0.5, "auroc": 0.9, "selective": figure},
    }
    assert "    dev: 10 / 50.0% / 0.9 / 20.0% (confidence >= 0.6)" in format_report(report).splitlines()


def test_terms_of_a_model_trained_on_flickr8k_and_everyday_photos_name_both() -> None:
    meta = {
        "training": {
            "data": [
                {"name": "flickr8k", "format": "flickr8k", "root": "/data/f8k"},
                {"name": "everyday", "format": "karpathy", "root": "/d/dataset_x.json", "label": "coco-everyday"},
            ]
        }
    }
    sources = {s["source"] for s in model_terms(meta)["sources"]}
    assert any(s.startswith("Flickr8k") for s in sources)
    assert any("COCO captions (annotations CC BY 4.0" in s for s in sources)
    assert model_terms(meta)["terms"].startswith("research use only")


def test_lineage_names_each_dataset_score_of_the_selected_epoch() -> None:
    val = {"CIDEr": 0.4, "selected_by": "mean of the datasets' CIDEr-D", "datasets": {"a": {"CIDEr": 0.6}}}
    val["datasets"]["b"] = {"CIDEr": 0.2}
    training = {"config": {"lr": 1e-4}, "epoch": 2, "history": [{"epoch": 1, "val": {}}, {"epoch": 2, "val": val}]}
    start = {"identity": "start@1", "training": {"config": {"lr": 4e-4}, "epoch": 1, "history": []}}
    stages = lineage("both@2", {**training, "init_model": start})
    assert stages[-1] == (
        "both@2: teacher forcing, lr 0.0001, epoch 2 selected, val CIDEr-D 0.400 (mean of the datasets' CIDEr-D: "
        "a 0.600; b 0.200)"
    )


# -- end to end ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def two_datasets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("multi")
    write_shapes_dataset(root / "shapes", n_train=24, n_val=8)
    everyday = write_everyday_json(root / "everyday")
    torch.manual_seed(0)
    weights = root / "encoder.safetensors"
    save_file(timm.create_model("resnet10t", num_classes=0).state_dict(), weights)
    return {"root": root, "shapes": root / "shapes", "everyday": everyday, "weights": weights}


def train_args(data: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return [
        "train",
        str(data["shapes"]),
        str(data["everyday"]),
        "--out",
        str(out),
        "--encoder",
        "resnet10t",
        "--encoder-weights",
        str(data["weights"]),
        "--input-size",
        "64",
        "--batch-size",
        "8",
        "--embed-dim",
        "16",
        "--hidden-dim",
        "32",
        "--attention-dim",
        "16",
        "--min-word-count",
        "1",
        "--max-caption-len",
        "12",
        "--attention-penalty",
        "0",
        "--warmup-steps",
        "2",
        "--lr",
        "3e-3",
        "--patience",
        "10",
        "--val-beam",
        "2",
        "--precision",
        "fp32",
        "--workers",
        "0",
        "--device",
        "cpu",
        "--cache-dir",
        str(data["root"] / "cache"),
        *extra,
    ]


SHAPE_OPTIONS = ("--encoder", "--input-size", "--embed-dim", "--hidden-dim", "--attention-dim", "--min-word-count")


def without_shape_options(args: list[str]) -> list[str]:
    """``args`` without the options an ``--init-model`` run refuses (the model file fixes them)."""
    args = list(args)
    for option in SHAPE_OPTIONS:
        at = args.index(option)
        del args[at : at + 2]
    return args


def test_training_on_two_datasets_records_them_and_validates_each(two_datasets: dict[str, Path]) -> None:
    out = two_datasets["root"] / "both.safetensors"
    result = CliRunner().invoke(
        cli, train_args(two_datasets, out, "--epochs", "3", "--dataset-weight", "1", "--dataset-weight", "1")
    )
    assert result.exit_code == 0, result.output
    assert "everyday: 16 train images (20 draws an epoch), 8 val images" in result.output
    model = load_model(out)
    assert {"kitchen", "photo", "circle", "left"} <= set(model.vocab.words)  # from both datasets' captions
    data = model.training["data"]
    assert [(d["name"], d["format"], d["weight"]) for d in data] == [
        ("shapes", "flickr8k", 1.0),
        ("everyday", "karpathy", 1.0),
    ]
    assert data[0]["splits"]["train"]["images"] == 24 and data[1]["splits"]["val"]["captions"] == 40
    assert data[1]["label"] == "coco-everyday"
    log = out.with_name(out.name + ".log.jsonl").read_text().splitlines()
    history = [json.loads(line) for line in log]
    assert len(history) == 3 and model.training["history"] == [
        {k: v for k, v in h.items() if k != "time"} for h in history[: model.training["epoch"]]
    ]
    for epoch in history:
        per = epoch["val"]["datasets"]
        assert set(per) == {"shapes", "everyday"} and per["everyday"]["images"] == 8
        assert epoch["val"]["CIDEr"] == pytest.approx((per["shapes"]["CIDEr"] + per["everyday"]["CIDEr"]) / 2)
    best = max(history, key=lambda h: h["val"]["CIDEr"])
    assert model.training["epoch"] == best["epoch"]
    assert model.metrics["CIDEr (everyday)"] == best["val"]["datasets"]["everyday"]["CIDEr"]
    assert model.training["config"]["datasets"] == [str(two_datasets["shapes"]), str(two_datasets["everyday"])]
    info = CliRunner().invoke(cli, ["info", str(out), "--json"])
    assert info.exit_code == 0 and '"everyday"' in info.output
    shown = CliRunner().invoke(cli, ["info", str(out)])
    assert "everyday: karpathy at" in shown.output and "MS-COCO captions" in shown.output, shown.output

    first_out = out.with_name("first.safetensors")
    first = CliRunner().invoke(
        cli, train_args(two_datasets, first_out, "--epochs", "2", "--select", "first", "--val-images", "3")
    )
    assert first.exit_code == 0, first.output
    # no weights: every training image once; --val-images: the first 3 of each dataset's val split
    assert "shapes: 24 train images (each once an epoch), 3 val images" in first.output
    assert "everyday: 16 train images (each once an epoch), 3 val images" in first.output
    for line in first_out.with_name(first_out.name + ".log.jsonl").read_text().splitlines():
        val = json.loads(line)["val"]
        assert val["CIDEr"] == val["datasets"]["shapes"]["CIDEr"] and val["selected_by"].startswith("first")


def test_a_resumed_run_on_two_datasets_equals_an_uninterrupted_one(
    two_datasets: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    options = (
        "--epochs",
        "3",
        "--dataset-weight",
        "2",
        "--dataset-weight",
        "1",
        "--dropout",
        "0.3",
        "--augment",
        "--dataset-styles",
    )
    whole = two_datasets["root"] / "whole.safetensors"
    assert CliRunner().invoke(cli, train_args(two_datasets, whole, *options)).exit_code == 0

    class Killed(Exception):
        pass

    def killed_after_epoch_1(path: Path, trained: torch.nn.Module, optimizer: object, loop: dict) -> None:
        save_checkpoint(path, trained, optimizer, loop)  # type: ignore[arg-type]
        if loop["epoch"] == 1:
            raise Killed  # the process dies right after the epoch's checkpoint is on disk

    cut = two_datasets["root"] / "cut.safetensors"
    with monkeypatch.context() as patch:
        patch.setattr(driver, "save_checkpoint", killed_after_epoch_1)
        first = CliRunner().invoke(cli, train_args(two_datasets, cut, *options))
    assert isinstance(first.exception, Killed)
    resumed = CliRunner().invoke(cli, train_args(two_datasets, cut, *options, "--resume"))
    assert resumed.exit_code == 0 and "resumed from" in resumed.output, resumed.output
    a, b = load_model(whole), load_model(cut)
    assert a.training["epoch"] == b.training["epoch"]
    assert a.decoder_state.keys() == b.decoder_state.keys()
    assert all(torch.equal(a.decoder_state[k], b.decoder_state[k]) for k in a.decoder_state)
    logs = [
        [json.loads(x)["val"] for x in p.with_name(p.name + ".log.jsonl").read_text().splitlines()]
        for p in (whole, cut)
    ]
    assert logs[0] == logs[1] and len(logs[0]) == 3


def test_init_model_keeps_its_vocabulary_with_several_datasets(two_datasets: dict[str, Path]) -> None:
    start = two_datasets["root"] / "shapes-only.safetensors"
    one = train_args(two_datasets, start, "--epochs", "1")
    one.remove(str(two_datasets["everyday"]))
    assert CliRunner().invoke(cli, one).exit_code == 0
    assert "kitchen" not in load_model(start).vocab.words
    out = two_datasets["root"] / "continued.safetensors"
    args = without_shape_options(train_args(two_datasets, out, "--epochs", "1"))
    result = CliRunner().invoke(cli, args + ["--init-model", str(start)])
    assert result.exit_code == 0, result.output
    assert "everyday: " in result.output and "are <unk> in the vocabulary trained with" in result.output
    continued = load_model(out)
    assert continued.vocab == load_model(start).vocab
    assert len(continued.training["data"]) == 2 and continued.training["init_model"]["identity"]


def test_vocabulary_from_grows_a_start_model_into_another_models_words(two_datasets: dict[str, Path]) -> None:
    root = two_datasets["root"]
    start, both = root / "grow-start.safetensors", root / "grow-both.safetensors"
    one = train_args(two_datasets, start, "--epochs", "1")
    one.remove(str(two_datasets["everyday"]))
    assert CliRunner().invoke(cli, one).exit_code == 0
    assert CliRunner().invoke(cli, train_args(two_datasets, both, "--epochs", "1")).exit_code == 0
    args = without_shape_options(train_args(two_datasets, root / "grown.safetensors", "--epochs", "1", "--lr", "1e-9"))
    refused = CliRunner().invoke(cli, train_args(two_datasets, root / "x.safetensors", "--vocabulary-from", str(both)))
    assert refused.exit_code == 2 and "--vocabulary-from changes the vocabulary of an --init-model" in refused.output
    result = CliRunner().invoke(cli, args + ["--init-model", str(start), "--vocabulary-from", str(both)])
    assert result.exit_code == 0, result.output
    old, new, grown = load_model(start), load_model(both), load_model(root / "grown.safetensors")
    assert "kitchen" not in old.vocab.words and grown.vocab == new.vocab
    shared = [w for w in new.vocab.words if w in old.vocab.words]
    assert f"({len(new.vocab)} words: {len(shared)} it knows, {len(new.vocab) - len(shared)} new)" in result.output
    # at a vanishing rate the known words keep their rows
    rows_old = old.decoder_state["embed.weight"][[old.vocab.words.index(w) for w in shared]]
    rows_new = grown.decoder_state["embed.weight"][[new.vocab.words.index(w) for w in shared]]
    torch.testing.assert_close(rows_new, rows_old, atol=1e-4, rtol=0)


def test_a_grown_vocabulary_keeps_known_rows_and_starts_new_words_unlikely() -> None:
    old = Vocabulary(("<pad>", "<start>", "<end>", "<unk>", "dog", "runs"))
    new = Vocabulary(("<pad>", "<start>", "<end>", "<unk>", "kitchen", "dog"))
    state = {
        "embed.weight": torch.arange(12.0).view(6, 2),
        "out.weight": torch.arange(18.0).view(6, 3) + 1,
        "out.bias": torch.tensor([0.5, -1.0, 0.0, -2.0, 1.0, -3.0]),
        "cells.0.weight_ih": torch.ones(2, 2),
    }
    grown = driver.grown_vocabulary(state, old, new)
    assert torch.equal(grown["embed.weight"][[0, 1, 2, 3, 5]], state["embed.weight"][[0, 1, 2, 3, 4]])
    assert torch.equal(grown["embed.weight"][4], state["embed.weight"].mean(0))  # an average word as input
    assert torch.equal(grown["out.weight"][4], torch.zeros(3)) and grown["out.bias"][4] == -3.0  # the rarest's
    assert (
        torch.equal(grown["out.bias"][5], torch.tensor(1.0))
        and grown["cells.0.weight_ih"] is state["cells.0.weight_ih"]
    )


def test_bad_multi_dataset_requests_are_refused_with_what_to_do(two_datasets: dict[str, Path]) -> None:
    out = two_datasets["root"] / "refused.safetensors"
    wrong = CliRunner().invoke(cli, train_args(two_datasets, out, "--dataset-weight", "1"))
    assert wrong.exit_code == 2 and "1 --dataset-weight for 2 DATA" in wrong.output
    images = CliRunner().invoke(cli, train_args(two_datasets, out, "--images", str(two_datasets["root"])))
    assert images.exit_code == 2 and "apply to one DATA" in images.output
    assert not out.exists()


def test_styles_new_to_a_trained_decoder_learn_faster_than_the_rest() -> None:
    decoder = CaptionDecoder(DecoderConfig(vocab_size=9, feature_dim=4, embed_dim=4, hidden_dim=4, styles=("a", "b")))
    cfg = TrainConfig(data="d", out="o", lr=2e-4)
    no_encoder = SimpleNamespace(trainable=None)
    _, optimizer = driver._optimizer(cfg, decoder, no_encoder, driver.STYLE_LR_SCALE)
    rates = [(group["lr"], len(group["params"])) for group in optimizer.param_groups]
    assert rates == [(2e-4, len(list(decoder.parameters())) - 1), (2e-4 * 50, 1)]
    _, fresh = driver._optimizer(cfg, decoder, no_encoder)
    assert [group["lr"] for group in fresh.param_groups] == [2e-4, 2e-4]


def calibrate_args(data: dict[str, Path], model: Path, out: Path, *extra: str) -> list[str]:
    return [
        "calibrate",
        str(data["shapes"]),
        str(data["everyday"]),
        "--model",
        str(model),
        "--out",
        str(out),
        "--encoder-weights",
        str(data["weights"]),
        "--cache-dir",
        str(data["root"] / "cache"),
        "--components",
        "4",
        "--refit-familiarity",
        "--folds",
        "2",
        "--label-threshold",
        "0.3",
        "--beam",
        "2",
        "--precision",
        "fp32",
        "--workers",
        "0",
        "--device",
        "cpu",
        *extra,
    ]


def test_dataset_styles_write_each_datasets_way_and_auto_follows_the_neighbours(
    two_datasets: dict[str, Path],
) -> None:
    styled = two_datasets["root"] / "styled.safetensors"
    trained = CliRunner().invoke(
        cli, train_args(two_datasets, styled, "--epochs", "20", "--lr", "1e-2", "--dataset-styles")
    )
    assert trained.exit_code == 0, trained.output
    model = load_model(styled)
    assert model.decoder.styles == ("shapes", "everyday")
    assert model.decoder_state["style_memory.weight"].abs().sum() > 0  # learnt, from zero
    with safe_open(styled, "pt") as header:  # an earlier batchcap refuses it: "upgrade batchcap"
        assert header.metadata()["batchcap.format_version"] == "3"
    calibrated = two_datasets["root"] / "styled-calibrated.safetensors"
    result = CliRunner().invoke(cli, calibrate_args(two_datasets, styled, calibrated))
    assert result.exit_code == 0, result.output
    near = load_model(calibrated).neighbours
    assert near is not None and near.datasets is not None
    assert Counter(near.datasets) == {"shapes": 24, "everyday": 16}  # every training picture, by its dataset
    shown = CliRunner().invoke(cli, ["info", str(calibrated)])
    assert "shapes, everyday (--style)" in shown.output, shown.output

    photos = sorted((two_datasets["shapes"] / "Flicker8k_Dataset").glob("*.jpg"))[:8]
    photos += sorted((two_datasets["everyday"].parent / "images").glob("coco_val_*.jpg"))[:8]

    def captions(style: str) -> list[str]:
        captioner = batchcap.load_model(
            calibrated,
            style=style,
            beam=2,
            device="cpu",
            precision="fp32",
            backend="torch",
            encoder_weights=two_datasets["weights"],
        )
        return [r.caption for r in captioner.caption(photos)]

    shapes_way, everyday_way, auto = captions("shapes"), captions("everyday"), captions("auto")
    # the everyday annotators' "a photo of" comes with their style, whatever the picture
    assert sum("photo" in c for c in everyday_way) >= sum("photo" in c for c in shapes_way) + 8, (
        shapes_way,
        everyday_way,
    )
    # auto: each picture in the style of most of its nearest training pictures
    captioner = batchcap.load_model(
        calibrated, beam=2, device="cpu", precision="fp32", backend="torch", encoder_weights=two_datasets["weights"]
    )
    pictures = torch.stack([decode_item(p, captioner.model.preprocess, captioner.policy).tensor for p in photos])
    features = captioner._captioner.encode(pictures)
    familiarity = captioner.model.familiarity
    assert familiarity is not None
    whitened = familiarity.whiten(features.float().mean(1) if features.dim() == 3 else features.float())
    votes = near.styles(near.nearest(whitened)[1], ("shapes", "everyday")).tolist()
    assert auto == [(shapes_way, everyday_way)[v][i] for i, v in enumerate(votes)]

    # refused, saying what to do: a style the model lacks, styles from one DATA, losing or reordering the styles
    with pytest.raises(OptionError, match="'coco' is not a caption style of styled; it writes shapes, everyday"):
        batchcap.load_model(calibrated, style="coco", device="cpu", encoder_weights=two_datasets["weights"])
    one = train_args(two_datasets, two_datasets["root"] / "x.safetensors", "--dataset-styles")
    one.remove(str(two_datasets["everyday"]))
    alone = CliRunner().invoke(cli, one)
    assert alone.exit_code == 2 and "give two or more DATA" in alone.output
    continued = without_shape_options(train_args(two_datasets, two_datasets["root"] / "y.safetensors", "--epochs", "1"))
    unstyled = CliRunner().invoke(cli, continued + ["--init-model", str(styled)])
    assert unstyled.exit_code != 0 and "continue with --dataset-styles" in unstyled.output
    swapped = continued[:]
    swapped[1], swapped[2] = swapped[2], swapped[1]
    reordered = CliRunner().invoke(cli, swapped + ["--init-model", str(styled), "--dataset-styles"])
    assert reordered.exit_code != 0 and "in the same order" in reordered.output
    assert not (two_datasets["root"] / "y.safetensors").exists()


def test_calibrate_on_two_dev_sets_reports_each_and_the_pool(two_datasets: dict[str, Path]) -> None:
    model = two_datasets["root"] / "for-calibration.safetensors"
    trained = CliRunner().invoke(cli, train_args(two_datasets, model, "--epochs", "2"))
    assert trained.exit_code == 0, trained.output
    out = two_datasets["root"] / "calibrated.safetensors"
    report_path = two_datasets["root"] / "calibration.json"
    result = CliRunner().invoke(cli, calibrate_args(two_datasets, model, out, "--json", str(report_path)))
    assert result.exit_code == 0, result.output
    report = json.loads(report_path.read_text())
    assert set(report["per_set"]) == {"shapes", "everyday"}
    assert report["per_set"]["shapes"]["pictures"] == 8 and report["per_set"]["everyday"]["pictures"] == 8
    assert report["pooled"]["pictures"] == 16
    for row in [*report["per_set"].values(), report["pooled"]]:
        assert set(row["selective"]) == {"threshold", "acceptable_kept", "unacceptable_kept"}
    assert "everyday: 8 /" in result.output and "pooled: 16 /" in result.output
    calibrated = load_model(out)
    assert calibrated.calibration is not None and calibrated.calibration.report["per_set"]
    assert calibrated.familiarity is not None and calibrated.familiarity.images == 40  # both train splits
    # the neighbours are every training picture of both sets, weighted towards the closest
    near = calibrated.neighbours
    assert near is not None and len(near.captions) == 40 and near.k == 10 and near.temperature == 10.0


def test_eval_scores_each_dataset(two_datasets: dict[str, Path]) -> None:
    model = two_datasets["root"] / "both.safetensors"
    if not model.exists():
        assert CliRunner().invoke(cli, train_args(two_datasets, model, "--epochs", "1")).exit_code == 0
    scores = two_datasets["root"] / "scores.json"
    result = CliRunner().invoke(
        cli,
        [
            "eval",
            str(two_datasets["shapes"]),
            str(two_datasets["everyday"]),
            "--split",
            "val",
            "--model",
            str(model),
            "--encoder-weights",
            str(two_datasets["weights"]),
            "--beam",
            "2",
            "--precision",
            "fp32",
            "--workers",
            "0",
            "--device",
            "cpu",
            "--json",
            str(scores),
        ],
    )
    assert result.exit_code == 0, result.output
    written = json.loads(scores.read_text())["datasets"]
    assert written["everyday"]["images"] == 8 and written["shapes"]["images"] == 8
    assert "everyday: " in result.output and "CIDEr" in result.output
