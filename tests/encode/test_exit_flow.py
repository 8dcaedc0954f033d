"""Exit-flow fine-tuning: the split network equals the whole, and what trains is what captions."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import timm
import torch
from click.testing import CliRunner
from conftest import TINY_WORDS, write_shapes_dataset
from safetensors.torch import save_file

from batchcap.cli import cli
from batchcap.config import DecoderConfig, EncoderConfig, Preprocess, RuntimeConfig
from batchcap.encode.exit_flow import (
    EXIT_MODULES,
    ExitFlowError,
    XceptionExitFlow,
    XceptionTrunk,
    apply_exit_flow,
    check_supported,
    exit_flow_state,
    trunk_to_map,
)
from batchcap.encode.torch_backend import build_backbone
from batchcap.encode.weights import EncoderError, WeightsSource, resolve_encoder_weights, stored_identity
from batchcap.fileio import file_sha256
from batchcap.model.decoder import CaptionDecoder
from batchcap.model.ensemble import EnsembleError
from batchcap.model.modelfile import EXIT_FLOW, CaptionModel, EncoderSpec, load_model, read_header, save_model
from batchcap.model.text import SPECIAL_TOKENS, Vocabulary
from batchcap.tools.ensemble import ensemble_models


@pytest.fixture(scope="module")
def xception() -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("legacy_xception", num_classes=0).eval()


def test_trunk_then_exit_flow_is_the_whole_network(xception: torch.nn.Module) -> None:
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        whole = xception.forward_features(x)
        trunk = XceptionTrunk(xception).forward_features(x)
        rows = trunk.flatten(2).transpose(1, 2)  # what the cache stores: (B, regions, channels)
        split = XceptionExitFlow(xception)(trunk_to_map(rows))
    assert trunk.shape[1] == 728
    torch.testing.assert_close(split, whole)


def test_the_exit_flow_state_uses_the_backbones_names(xception: torch.nn.Module) -> None:
    state = exit_flow_state(XceptionExitFlow(xception))
    assert {k.split(".")[0] for k in state} == {"block12", "conv3", "bn3", "conv4", "bn4"}
    full = xception.state_dict()
    assert all(torch.equal(v, full[k]) for k, v in state.items())
    assert 6.7e6 < sum(v.numel() for v in state.values()) < 6.9e6


def test_apply_exit_flow_loads_and_refuses_what_does_not_fit(xception: torch.nn.Module) -> None:
    other = timm.create_model("legacy_xception", num_classes=0).eval()
    tuned = {k: v + 1.0 if v.is_floating_point() else v for k, v in exit_flow_state(XceptionExitFlow(other)).items()}
    apply_exit_flow(other, tuned, "test")
    after = other.state_dict()
    assert all(torch.equal(after[k], v) for k, v in tuned.items())
    with pytest.raises(ExitFlowError, match="1 missing"):
        apply_exit_flow(other, dict(list(tuned.items())[1:]), "test")
    with pytest.raises(ExitFlowError, match="1 unexpected"):
        apply_exit_flow(other, {**tuned, "block1.rep.0.weight": torch.zeros(1)}, "test")
    with pytest.raises(ExitFlowError, match="legacy_xception"):
        check_supported("resnet50", True)
    with pytest.raises(ExitFlowError, match="spatial"):
        check_supported("legacy_xception", False)


def test_train_with_exit_flow_stores_it_and_run_uses_it(tmp_path: Path, xception: torch.nn.Module) -> None:
    """Train 2 epochs; the file holds only the exit flow, and captioning rebuilds the trained network."""
    data = tmp_path / "shapes"
    write_shapes_dataset(data, n_train=16, n_val=8)
    models = tmp_path / "models"
    models.mkdir()
    weights = models / "xception.safetensors"
    original = xception.state_dict()
    save_file(original, weights)
    out = models / "tuned.safetensors"
    runner = CliRunner()
    result = runner.invoke(
        cli,
        [
            "train",
            str(data),
            "--out",
            str(out),
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
            "--finetune-exit-flow",
            "--encoder-lr",
            "1e-3",
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
    model = load_model(out)
    assert model.encoder.finetuned == "exit_flow" and model.encoder.weights_file == "xception.safetensors"
    assert model.encoder_state is not None
    assert {k.split(".")[0] for k in model.encoder_state} <= set(EXIT_MODULES)
    assert any(not torch.equal(v, original[k]) for k, v in model.encoder_state.items() if v.is_floating_point())
    # The trunk cache is keyed apart from ordinary features.
    keys = [json.loads(p.read_text()) for p in (tmp_path / "cache").glob("*/key.json")]
    assert keys and all(k["layer"] == "block11" for k in keys)

    source = resolve_encoder_weights(model)  # the base file beside the model, plus the stored exit flow
    assert source.kind == "file" and source.exit_flow is not None
    built = build_backbone(EncoderConfig(name=model.encoder.name), source).state_dict()
    assert all(torch.equal(built[k], v.float()) for k, v in model.encoder_state.items())
    assert all(torch.equal(built[k], v) for k, v in original.items() if k.startswith("block1."))
    # --half stores the exit flow as fp16, like the decoder (the packaged base weights are fp16 too).
    save_model(model, models / "half.safetensors", half=True)
    halved = load_model(models / "half.safetensors")
    assert halved.encoder_state is not None
    assert all(v.dtype == torch.float16 for v in halved.encoder_state.values() if v.is_floating_point())
    # Feature caches keyed by the model (calibrate's) tell the tuned encoder from the stock one.
    assert model.encoder_weights_id().startswith(model.encoder.weights_sha256 + "+exit_flow:")
    plain = WeightsSource("file", path=str(weights))
    assert stored_identity(EncoderConfig(), source) != stored_identity(EncoderConfig(), plain)

    captions = runner.invoke(
        cli,
        [
            "run",
            str(data / "Flicker8k_Dataset"),
            "--out",
            str(tmp_path / "c.jsonl"),
            "--model",
            str(out),
            "--precision",
            "fp32",
            "--workers",
            "0",
            "--backend",
            "torch",
        ],
    )
    assert captions.exit_code == 0, captions.output
    rows = [json.loads(line) for line in (tmp_path / "c.jsonl").read_text().splitlines()]
    assert rows and all(r["status"] == "ok" and r["caption"] for r in rows)

    # Continuing needs --finetune-exit-flow: cached features of the stock encoder would not match.
    again = runner.invoke(
        cli,
        [
            "train",
            str(data),
            "--out",
            str(models / "next.safetensors"),
            "--init-model",
            str(out),
            "--epochs",
            "1",
            "--precision",
            "fp32",
            "--workers",
            "0",
            "--cache-dir",
            str(tmp_path / "cache"),
        ],
    )
    assert again.exit_code != 0 and "--finetune-exit-flow" in again.output


def test_a_model_whose_exit_flow_does_not_fit_is_refused(tmp_path: Path, xception: torch.nn.Module) -> None:
    weights = tmp_path / "xception.safetensors"
    save_file(xception.state_dict(), weights)
    state = exit_flow_state(XceptionExitFlow(xception))
    state.pop(next(iter(state)))
    source = WeightsSource("file", path=str(weights), exit_flow=state)
    with pytest.raises(EncoderError, match="missing"):
        build_backbone(EncoderConfig(name="legacy_xception"), source)


def test_training_features_match_captioning_features(tmp_path: Path, xception: torch.nn.Module) -> None:
    """The trunk cache through the exit flow gives the features `run` computes from the picture."""
    from batchcap.encode.torch_backend import Encoder
    from batchcap.training.feature_sources import CachedTrunk

    runtime = RuntimeConfig(device="cpu", precision="fp32", batch_size=2, workers=0)
    images = torch.randint(0, 256, (2, 3, 96, 96), dtype=torch.uint8)
    pre = Preprocess(input_size=(3, 96, 96))
    trunk_rows = Encoder(XceptionTrunk(xception), pre, runtime)(images)  # (B, R, 728), as cached
    source = CachedTrunk([trunk_rows.half()], XceptionExitFlow(xception), runtime, trunk_rows.half())
    trained_view = source.val_features(None).float()  # type: ignore[arg-type]
    captioning = Encoder(xception, pre, runtime)(images)
    cos = torch.nn.functional.cosine_similarity(trained_view.flatten(1), captioning.flatten(1))
    assert cos.min() > 0.999, cos


def _tuned_model(models: Path, xception: torch.nn.Module, seed: int) -> CaptionModel:
    """A model over ``models/xception.safetensors`` with its own (perturbed) exit flow and a random decoder."""
    generator = torch.Generator().manual_seed(seed)
    exit_flow = {
        k: v + 0.05 * torch.randn(v.shape, generator=generator) if v.is_floating_point() else v
        for k, v in exit_flow_state(XceptionExitFlow(xception)).items()
    }
    vocab = Vocabulary(SPECIAL_TOKENS + TINY_WORDS)
    cfg = DecoderConfig(vocab_size=len(vocab), embed_dim=16, hidden_dim=32, attention_dim=16, dropout=0.0)
    torch.manual_seed(seed)
    decoder = CaptionDecoder(cfg)
    with torch.no_grad():
        decoder.out.bias[vocab.end_id] += 1.5
    model = CaptionModel(
        name=f"tuned{seed}",
        encoder=EncoderSpec(
            weights_sha256=file_sha256(models / "xception.safetensors"),
            weights_file="xception.safetensors",
            finetuned=EXIT_FLOW,
        ),
        preprocess=Preprocess(input_size=(3, 64, 64), resize="squash", mean=(0.5,) * 3, std=(0.5,) * 3),
        decoder=cfg,
        vocab=vocab,
        max_caption_len=8,
        decoder_state=decoder.state_dict(),
        encoder_state=exit_flow,
    )
    save_model(model, models / f"tuned{seed}.safetensors")
    return load_model(models / f"tuned{seed}.safetensors")


def test_an_ensemble_keeps_each_members_exit_flow(
    tmp_path: Path, xception: torch.nn.Module, image_folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Members with their own exit flows: one trunk, each exit flow on it, each decoder on its own features."""
    models = tmp_path / "models"
    models.mkdir()
    save_file({k: v.contiguous() for k, v in xception.state_dict().items()}, models / "xception.safetensors")
    first, second = _tuned_model(models, xception, 1), _tuned_model(models, xception, 2)
    out = models / "pair.safetensors"
    runner = CliRunner()
    made = runner.invoke(cli, ["ensemble", str(first.path), str(second.path), "--out", str(out), "--half"])
    assert made.exit_code == 0, made.output
    pair = load_model(out)
    assert read_header(out)["__metadata__"]["batchcap.format_version"] == "4"
    assert pair.exit_flow_per_member and len(pair.member_exit_flows()) == 1
    for member, single in zip(pair.decoders(), (first, second)):
        assert member.exit_flow is not None and single.encoder_state is not None
        assert all(torch.equal(member.exit_flow[k].float(), v.half().float()) for k, v in single.encoder_state.items())

    # The encoder: the trunk once, then each member's exit flow, their maps side by side, member 0 first.
    cfg = EncoderConfig(name="legacy_xception")
    source = resolve_encoder_weights(pair)
    joined = build_backbone(cfg, source)
    alone = [build_backbone(cfg, resolve_encoder_weights(load_model(m.path or ""))) for m in (first, second)]
    halved = [
        replace(m, encoder_state={k: v.half() for k, v in (m.encoder_state or {}).items()}) for m in (first, second)
    ]
    alone = [build_backbone(cfg, resolve_encoder_weights(m)) for m in halved]
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        want = torch.cat([net.forward_features(x) for net in alone], dim=1)
        torch.testing.assert_close(joined.forward_features(x), want)
    # Feature and graph caches tell the pair from either member.
    assert stored_identity(cfg, source) != stored_identity(cfg, resolve_encoder_weights(halved[0]))
    assert pair.encoder_weights_id() != halved[0].encoder_weights_id()

    # Captioning: both backends run the pair; the decoders see the right features, so captions agree.
    captions = {}
    for backend in ("torch", "openvino"):
        result = runner.invoke(
            cli,
            [
                "run",
                str(image_folder),
                "--out",
                str(tmp_path / f"{backend}.jsonl"),
                "--model",
                str(out),
                "--backend",
                backend,
                "--precision",
                "fp32",
                "--workers",
                "0",
            ],
        )
        assert result.exit_code == 0, result.output
        rows = [json.loads(line) for line in (tmp_path / f"{backend}.jsonl").read_text().splitlines()]
        assert len(rows) == 20 and {r["status"] for r in rows} == {"ok"}
        assert {r["model"] for r in rows} == {pair.identity}
        captions[backend] = {r["id"]: r["caption"] for r in rows}
    same = sum(captions["torch"][k] == captions["openvino"][k] for k in captions["torch"])
    assert same >= 18, captions

    # A member whose whole encoder is embedded cannot join: there is no exit flow to run beside the others.
    whole = replace(first, encoder=replace(first.encoder, finetuned=""), encoder_state=xception.state_dict())
    with pytest.raises(EnsembleError, match="embedded encoder weights"):
        ensemble_models([first, whole])
    # A batchcap that would feed member 0's features to every decoder refuses the file.
    import batchcap.model.modelfile as modelfile

    monkeypatch.setattr(modelfile, "FORMAT_VERSION", 3)
    with pytest.raises(modelfile.ModelFileError, match="version 4 is newer"):
        load_model(out)
