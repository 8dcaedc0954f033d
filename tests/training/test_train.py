"""Training learns: captions of generated shape pictures beat a baseline that ignores the image."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import timm
import torch
from click.testing import CliRunner
from conftest import write_shapes_dataset
from safetensors.torch import save_file

from batchcap.cli import cli
from batchcap.model.modelfile import load_model
from batchcap.training.metrics import score_captions


@pytest.mark.slow
def test_training_learns_from_pictures(tmp_path: Path) -> None:
    data = tmp_path / "shapes"
    write_shapes_dataset(data)
    torch.manual_seed(0)
    # A random-weight encoder: its features still separate colours and sides, which is all
    # the decoder needs to beat a caption that ignores the picture.
    encoder = timm.create_model("resnet10t", num_classes=0)
    weights = tmp_path / "encoder.safetensors"
    save_file(encoder.state_dict(), weights)
    out = tmp_path / "shapes.safetensors"
    result = CliRunner().invoke(
        cli,
        [
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
            "--epochs",
            "20",
            "--batch-size",
            "16",
            "--lr",
            "5e-3",
            "--warmup-steps",
            "10",
            "--embed-dim",
            "32",
            "--hidden-dim",
            "64",
            "--attention-dim",
            "32",
            "--dropout",
            "0.1",
            "--min-word-count",
            "1",
            "--max-caption-len",
            "8",
            "--patience",
            "20",
            "--precision",
            "fp32",
            # SAT's penalty wants more regions than words; this encoder's map has only 2x2.
            "--attention-penalty",
            "0",
            "--workers",
            "0",
            "--device",
            "cpu",
            "--cache-dir",
            str(tmp_path / "cache"),
        ],
    )
    assert result.exit_code == 0, result.output
    model = load_model(out)
    assert model.training["data"]["splits"]["train"]["images"] == 240
    assert model.preprocess.width == 64 and model.encoder.name == "resnet10t"
    # what trusting captions needs is computed at train time: the ending rule and familiarity
    assert {"on", "the"} <= set(model.unendable_words) and not {"side", "left", "right"} & set(model.unendable_words)
    # "the left" ends half the captions ("on the left"): no pair; and no caption doubles a word
    assert model.unendable_pairs == () and model.repeatable_words == ()
    assert model.ending_rule["determiners"][:3] == ["a", "an", "the"] and model.repeat_rule["min_count"] == 5
    assert model.familiarity is not None and model.familiarity.images == 240
    assert model.familiarity.mean.shape == (model.encoder.feature_dim,)
    log = [json.loads(line) for line in (tmp_path / "shapes.safetensors.log.jsonl").read_text().splitlines()]
    assert len(log) == 20 and log[-1]["train_loss"] < log[0]["train_loss"]

    evaluated = CliRunner().invoke(
        cli,
        [
            "eval",
            str(data),
            "--split",
            "val",
            "--model",
            str(out),
            "--encoder-weights",
            str(weights),
            "--beam",
            "3",
            "--precision",
            "fp32",
            "--workers",
            "0",
            "--device",
            "cpu",
            "--json",
            str(tmp_path / "s.json"),
        ],
    )
    assert evaluated.exit_code == 0, evaluated.output
    scores = json.loads((tmp_path / "s.json").read_text())
    references = {c["image_id"]: c["references"] for c in scores["captions"]}
    # The best a model that ignores the picture can do: one caption for every image.
    train_refs = [
        line.split("\t")[1].strip(" .\r\n")
        for line in (data / "Flickr8k_text" / "Flickr8k.token.txt").read_text().splitlines()
        if "train" in line
    ]
    constant = Counter(train_refs).most_common(1)[0][0]
    baseline = score_captions({k: constant for k in references}, references, full=False)
    learned = scores["scores"]
    assert learned["BLEU-4"] > baseline["BLEU-4"] + 0.2, (learned, baseline)
    assert learned["CIDEr"] > baseline["CIDEr"] + 1.0, (learned, baseline)


def test_finetuning_the_encoder_embeds_it_and_captions_run(tmp_path: Path, image_folder: Path) -> None:
    data = tmp_path / "shapes"
    write_shapes_dataset(data, n_train=16, n_val=8)
    torch.manual_seed(0)
    weights = tmp_path / "encoder.safetensors"
    original = timm.create_model("test_efficientnet", num_classes=0).state_dict()
    save_file(original, weights)
    out = tmp_path / "tuned.safetensors"
    runner = CliRunner()
    result = runner.invoke(
        cli,
        [
            "train",
            str(data),
            "--out",
            str(out),
            "--encoder",
            "test_efficientnet",
            "--encoder-weights",
            str(weights),
            "--input-size",
            "64",
            "--epochs",
            "2",
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
            "8",
            "--finetune-encoder",
            "--encoder-lr",
            "1e-2",
            "--augment",
            "--precision",
            "fp32",
            "--workers",
            "0",
            "--device",
            "cpu",
        ],
    )
    assert result.exit_code == 0, result.output
    model = load_model(out)
    assert model.encoder_state is not None and model.encoder.weights_sha256 is None
    changed = [k for k, v in model.encoder_state.items() if v.is_floating_point() and not torch.equal(v, original[k])]
    assert changed, "the encoder's weights did not train"
    assert not (tmp_path / ".batchcap-features").exists()  # no feature cache when fine-tuning
    captions = runner.invoke(
        cli,
        [
            "run",
            str(image_folder),
            "--out",
            str(tmp_path / "c.jsonl"),
            "--model",
            str(out),
            "--precision",
            "fp32",
            "--workers",
            "0",
        ],
    )
    assert captions.exit_code == 0, captions.output
    rows = [json.loads(line) for line in (tmp_path / "c.jsonl").read_text().splitlines()]
    assert len(rows) == 20 and all(r["status"] == "ok" and r["caption"] for r in rows)


def test_a_finetuned_encoder_trains_and_validates_under_the_same_autocast(image_folder: Path) -> None:
    from batchcap.config import Preprocess, RuntimeConfig
    from batchcap.data.captions.records import CaptionRecord
    from batchcap.training.feature_sources import FinetunedEncoder
    from batchcap.training.steps import Split

    records = [CaptionRecord(p.stem, ("a picture",), path=str(p)) for p in sorted(image_folder.glob("*.jpg"))[:6]]
    backbone = timm.create_model("test_efficientnet", num_classes=0)
    seen: dict[str, torch.dtype] = {}
    real_forward_features = backbone.forward_features

    def recording(x: torch.Tensor) -> torch.Tensor:
        out = real_forward_features(x)
        seen["validation" if torch.is_inference_mode_enabled() else "training"] = out.dtype
        return out

    backbone.forward_features = recording
    runtime = RuntimeConfig(device="cpu", precision="bf16", batch_size=3, workers=0)
    source = FinetunedEncoder(backbone, Preprocess(input_size=(3, 64, 64)), records, runtime, augment=False)
    for _, feats in source.epoch([[0, 1, 2]], torch.Generator()):
        assert feats.dtype == torch.float32 and feats.requires_grad
    split = Split([r.image_id for r in records], torch.empty(0), records, torch.empty(0), torch.empty(0), {})
    assert source.val_features(split).shape[0] == 6
    assert seen == {"training": torch.bfloat16, "validation": torch.bfloat16}


def test_tf32_and_the_device_feature_cache_follow_the_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    from batchcap.training.feature_sources import fits_on_device
    from batchcap.training.steps import use_tf32

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (70 * 2**30, 80 * 2**30))
    before = torch.get_float32_matmul_precision()
    try:
        assert not use_tf32("cpu") and torch.get_float32_matmul_precision() == before
        assert use_tf32("cuda:0") and torch.get_float32_matmul_precision() == "high"
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 0))
        torch.set_float32_matmul_precision(before)
        assert not use_tf32("cuda:0") and torch.get_float32_matmul_precision() == before
    finally:
        torch.set_float32_matmul_precision(before)
    flickr8k_cache = 6000 * 100 * 2048 * 2  # fp16 (images, regions, features): about 2.5 GB
    assert fits_on_device(flickr8k_cache, "cuda:0") and not fits_on_device(flickr8k_cache, "cpu")
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (4 * 2**30, 16 * 2**30))
    assert not fits_on_device(flickr8k_cache, "cuda:0")


@pytest.mark.cuda
@pytest.mark.slow
def test_training_and_resuming_on_a_real_gpu(tmp_path: Path) -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    data = tmp_path / "shapes"
    write_shapes_dataset(data, n_train=32, n_val=8)
    weights = tmp_path / "encoder.safetensors"
    save_file(timm.create_model("test_efficientnet", num_classes=0).state_dict(), weights)
    out = tmp_path / "gpu.safetensors"
    args = [
        "train",
        str(data),
        "--out",
        str(out),
        "--encoder",
        "test_efficientnet",
        "--encoder-weights",
        str(weights),
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
        "8",
        "--workers",
        "0",
        "--device",
        "cuda",
        "--cache-dir",
        str(tmp_path / "cache"),
        "--patience",
        "10",
    ]
    first = CliRunner().invoke(cli, args + ["--epochs", "1"])
    assert first.exit_code == 0, first.output  # a training epoch and a validation on the GPU
    resumed = CliRunner().invoke(cli, args + ["--epochs", "2", "--resume"])
    assert resumed.exit_code == 0 and "resumed from" in resumed.output, resumed.output
    log = [json.loads(line) for line in (tmp_path / "gpu.safetensors.log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2]


def test_features_mapped_from_disk_train_the_same_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """BATCHCAP_FEATURE_MEMORY_GIB=0 (what a cache larger than memory gets) changes where the
    features live, not one weight of what trains on them, with both --augment views mapped; and
    the same --seed gives the same model whether the run filled the feature cache or found it."""
    data = tmp_path / "shapes"
    write_shapes_dataset(data, n_train=24, n_val=8)
    torch.manual_seed(0)
    weights = tmp_path / "encoder.safetensors"
    save_file(timm.create_model("resnet10t", num_classes=0).state_dict(), weights)
    models = {}
    for budget in ("100", "0"):  # the first run fills the feature cache, the second finds it
        monkeypatch.setenv("BATCHCAP_FEATURE_MEMORY_GIB", budget)
        out = tmp_path / f"budget-{budget}.safetensors"
        result = CliRunner().invoke(
            cli,
            [
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
                "--epochs",
                "2",
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
                "8",
                "--augment",
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
            ],
        )
        assert result.exit_code == 0, result.output
        mapped = "memory-mapped from a file beside the cache" in result.output
        assert mapped == (budget == "0"), result.output
        models[budget] = load_model(out).decoder_state
    assert models["0"].keys() == models["100"].keys()
    assert all(torch.equal(models["0"][k], models["100"][k]) for k in models["0"])
    assert not list((tmp_path / "cache").glob("*/.split-*"))

    monkeypatch.setenv("BATCHCAP_FEATURE_MEMORY_GIB", "plenty")
    refused = CliRunner().invoke(
        cli,
        [
            "train",
            str(data),
            "--out",
            str(tmp_path / "x.safetensors"),
            "--encoder",
            "resnet10t",
            "--encoder-weights",
            str(weights),
            "--input-size",
            "64",
            "--workers",
            "0",
            "--device",
            "cpu",
            "--cache-dir",
            str(tmp_path / "cache"),
        ],
    )
    assert refused.exit_code != 0 and "BATCHCAP_FEATURE_MEMORY_GIB='plenty'" in refused.output, refused.output
    assert "Traceback" not in refused.output
