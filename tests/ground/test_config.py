"""batchcap.config: dict round trips, the frozen dataclasses' checks, option names, OptionError."""

from __future__ import annotations

import dataclasses
import json

import pytest

from batchcap.config import (
    BeamConfig,
    DecoderConfig,
    EncoderConfig,
    ImagePolicy,
    OptionError,
    Preprocess,
    RunConfig,
    RuntimeConfig,
    TrainConfig,
    from_dict,
    option_name,
    to_dict,
)

EXAMPLES = [
    Preprocess(input_size=(3, 64, 80), resize="crop", interpolation="bilinear", crop_pct=0.875),
    EncoderConfig(name="test_efficientnet", weights="/w.safetensors", pretrained=True, spatial=False),
    DecoderConfig(vocab_size=17, num_layers=2, attention=False, deep_output=True),
    BeamConfig(beam_size=4, max_len=9, min_len=2, length_penalty=0.7, no_repeat_ngram=3, n_best=2),
    RuntimeConfig(device="cuda:1", precision="bf16", batch_size=8, backend="openvino", encoder_cache="/c"),
    ImagePolicy(max_pixels=1000, background=(0, 1, 2), draft=False, image_keys=("png",)),
    RunConfig(sources=("a", "b"), out="o.parquet", shard_index=1, shard_count=3, min_confidence=0.4),
    TrainConfig(data="d", out="m.safetensors", epochs=3, extra={"note": "x"}),
]


@pytest.mark.parametrize("obj", EXAMPLES, ids=lambda o: type(o).__name__)
def test_round_trip_through_json_restores_an_equal_object(obj: object) -> None:
    data = json.loads(json.dumps(to_dict(obj)))  # what is written beside outputs and into model files
    back = from_dict(type(obj), data)
    assert back == obj
    for f in dataclasses.fields(obj):  # lists came back as tuples: equality and hashing need that
        assert type(getattr(back, f.name)) is type(getattr(obj, f.name)), f.name


def test_to_dict_is_plain_data_with_every_field() -> None:
    data = to_dict(Preprocess())
    assert data == {
        "input_size": (3, 299, 299),
        "resize": "squash",
        "interpolation": "bicubic",
        "crop_pct": 1.0,
        "mean": (0.5, 0.5, 0.5),
        "std": (0.5, 0.5, 0.5),
    }
    json.dumps(data)


def test_from_dict_ignores_unknown_keys() -> None:
    beam = from_dict(BeamConfig, {"beam_size": 2, "written_by_a_newer_version": True})
    assert beam == BeamConfig(beam_size=2)


def test_from_dict_takes_defaults_for_missing_keys_but_needs_required_ones() -> None:
    assert from_dict(BeamConfig, {}) == BeamConfig()
    assert from_dict(DecoderConfig, {"vocab_size": 9}).hidden_dim == DecoderConfig(vocab_size=9).hidden_dim
    with pytest.raises(TypeError):
        from_dict(DecoderConfig, {"hidden_dim": 8})  # vocab_size has no default


def test_from_dict_runs_the_dataclass_checks() -> None:
    with pytest.raises(ValueError, match="resize"):
        from_dict(Preprocess, {"resize": "stretch"})


def test_dataclasses_are_frozen() -> None:
    beam = BeamConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        beam.beam_size = 3  # type: ignore[misc]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"beam_size": 0},
        {"max_len": 0, "min_len": 0},
        {"min_len": -1},
        {"min_len": 21, "max_len": 20},
        {"n_best": 0},
        {"beam_size": 3, "n_best": 4},
        {"no_repeat_ngram": -1},
    ],
)
def test_beam_config_refuses_impossible_settings(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        BeamConfig(**kwargs)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"beam_size": 1},
        {"min_len": 0},
        {"min_len": 20, "max_len": 20},
        {"max_len": 1, "min_len": 1},
        {"beam_size": 3, "n_best": 3},
        {"no_repeat_ngram": 0},
    ],
)
def test_beam_config_accepts_the_edges(kwargs: dict) -> None:
    BeamConfig(**kwargs)


def test_preprocess_checks_input_size_and_names_height_width() -> None:
    for bad in [(64, 64), (1, 64, 64), (3, 64, 64, 1)]:
        with pytest.raises(ValueError, match="input_size"):
            Preprocess(input_size=bad)  # type: ignore[arg-type]
    p = Preprocess(input_size=(3, 40, 70))
    assert (p.height, p.width) == (40, 70)
    assert isinstance(p.height, int) and isinstance(p.width, int)


def test_train_config_extra_is_not_shared_between_instances() -> None:
    a, b = TrainConfig(data="d", out="o"), TrainConfig(data="d", out="o")
    a.extra["k"] = 1
    assert b.extra == {}


@pytest.mark.parametrize(
    ("setting", "option"),
    [
        ("beam.beam_size", "--beam"),
        ("resume_settings.beam.beam_size", "--beam"),
        ("beam.max_len", "--max-len"),
        ("beam.min_len", "--min-len"),
        ("beam.length_penalty", "--length-penalty"),
        ("beam.no_repeat_ngram", "--no-repeat-ngram"),
        ("beam.n_best", "--n-best"),
        ("model", "--model"),
        ("format", "--format"),
        ("preprocess.resize", "the model's preprocessing (resize)"),
        ("resume_settings.preprocess.input_size", "the model's preprocessing (input size)"),
        ("min_confidence", "--min-confidence"),
    ],
)
def test_option_name_maps_settings_to_the_flags_users_type(setting: str, option: str) -> None:
    assert option_name(setting) == option


def test_option_error_message_names_the_option() -> None:
    err = OptionError("--beam", "must be at least 1")
    assert str(err) == "--beam: must be at least 1"
    assert (err.option, err.message) == ("--beam", "must be at least 1")
    assert isinstance(err, ValueError)
