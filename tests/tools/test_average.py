"""Weight averaging: exact weighted means, provenance, refusals, and a model that captions."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import make_tiny_model

from batchcap.cli import cli
from batchcap.model.modelfile import load_model, save_model
from batchcap.model.text import SPECIAL_TOKENS, Vocabulary
from batchcap.tools.average import AverageError, average_models


@pytest.fixture
def two_models(tmp_path: Path) -> tuple[Path, Path]:
    """A tiny model and a copy whose decoder weights moved (as a fine-tune's would)."""
    first = tmp_path / "a.safetensors"
    model = make_tiny_model(first)
    generator = torch.Generator().manual_seed(1)
    moved = {
        k: v + torch.randn(v.shape, generator=generator) if v.is_floating_point() else v
        for k, v in model.decoder_state.items()
    }
    second = tmp_path / "b.safetensors"
    save_model(replace(model, decoder_state=moved, name="b"), second)
    return first, second


def test_weighted_mean_of_every_tensor(two_models: tuple[Path, Path]) -> None:
    a, b = (load_model(p) for p in two_models)
    mixed = average_models([a, b], [1.0, 3.0])  # normalised to 0.25 / 0.75
    for key, value in mixed.decoder_state.items():
        expected = 0.25 * a.decoder_state[key].float() + 0.75 * b.decoder_state[key].float()
        assert torch.allclose(value, expected, atol=1e-6), key
    assert [m["weight"] for m in mixed.training["averaged"]] == [0.25, 0.75]
    assert [m["identity"] for m in mixed.training["averaged"]] == [a.identity, b.identity]
    assert mixed.metrics == {} and mixed.vocab == a.vocab and mixed.encoder_state is a.encoder_state


def test_averaging_a_model_with_itself_changes_nothing(two_models: tuple[Path, Path]) -> None:
    a = load_model(two_models[0])
    same = average_models([a, a, a])
    assert all(torch.equal(v, a.decoder_state[k].float()) for k, v in same.decoder_state.items())


def test_refuses_models_that_differ_beyond_decoder_weights(two_models: tuple[Path, Path], tmp_path: Path) -> None:
    a = load_model(two_models[0])
    other_words = replace(a, vocab=Vocabulary(SPECIAL_TOKENS + tuple(f"w{i}" for i in range(13))))
    with pytest.raises(AverageError, match="vocabulary"):
        average_models([a, other_words])
    other_encoder = make_tiny_model(tmp_path / "c.safetensors", seed=5)  # another random encoder
    with pytest.raises(AverageError, match="embedded encoder weights"):
        average_models([a, other_encoder])
    with pytest.raises(AverageError, match="2 weights for 3 models"):
        average_models([a, a, a], [1, 2])
    with pytest.raises(AverageError, match="non-negative"):
        average_models([a, a], [1, -1])


def test_cli_writes_a_model_that_captions(two_models: tuple[Path, Path], tmp_path: Path, image_folder: Path) -> None:
    out = tmp_path / "soup.safetensors"
    runner = CliRunner()
    result = runner.invoke(cli, ["average", *map(str, two_models), "--weights", "0.25,0.75", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert [m["weight"] for m in json.loads(result.output)["members"]] == [0.25, 0.75]
    info = runner.invoke(cli, ["info", str(out)])
    assert info.exit_code == 0 and "averaged from" in info.output, info.output
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
    assert len(rows) == 20 and all(r["status"] == "ok" for r in rows)
    assert {r["model"] for r in rows} == {load_model(out).identity}


def test_cli_refuses_bad_weights(two_models: tuple[Path, Path], tmp_path: Path) -> None:
    result = CliRunner().invoke(
        cli, ["average", *map(str, two_models), "--weights", "a,b", "--out", str(tmp_path / "x.safetensors")]
    )
    assert result.exit_code == 2 and "expected numbers" in result.output
    result = CliRunner().invoke(
        cli, ["average", *map(str, two_models), "--weights", "1", "--out", str(tmp_path / "x.safetensors")]
    )
    assert result.exit_code == 2 and "1 weights for 2 models" in result.output
    assert not (tmp_path / "x.safetensors").exists()


def test_fine_tuned_exit_flows_are_averaged_with_the_decoders(two_models: tuple[Path, Path]) -> None:
    a, b = (load_model(p) for p in two_models)
    spec = replace(a.encoder, finetuned="exit_flow")
    flow_a = {"block12.skip.weight": torch.ones(4, 3), "conv4.bn.num_batches_tracked": torch.tensor(7)}
    flow_b = {"block12.skip.weight": torch.full((4, 3), 5.0), "conv4.bn.num_batches_tracked": torch.tensor(9)}
    a, b = replace(a, encoder=spec, encoder_state=flow_a), replace(b, encoder=spec, encoder_state=flow_b)
    mixed = average_models([a, b], [3.0, 1.0])
    assert mixed.encoder_state is not None
    assert torch.equal(mixed.encoder_state["block12.skip.weight"], torch.full((4, 3), 2.0))  # 0.75 * 1 + 0.25 * 5
    assert mixed.encoder_state["conv4.bn.num_batches_tracked"].item() == 7  # counters: the first model's
    # exit flows that do not line up, and an exit flow beside an untouched encoder, are refused
    other_shape = replace(b, encoder_state={**flow_b, "block12.skip.weight": torch.zeros(4, 4)})
    with pytest.raises(AverageError, match="embedded encoder weights"):
        average_models([a, other_shape])
    with pytest.raises(AverageError, match="in encoder, embedded encoder weights"):
        average_models([a, load_model(two_models[1])])
