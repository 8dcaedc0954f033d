"""The model file: round trip, and each refusal with its message."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_model
from safetensors.torch import save_file

from batchcap.model.modelfile import FORMAT_VERSION, ModelFileError, check_encoder_weights, load_model, read_metadata


def test_round_trip_keeps_tensors_and_metadata(tmp_path: Path) -> None:
    saved = make_tiny_model(tmp_path / "m.safetensors", seed=3)
    loaded = load_model(tmp_path / "m.safetensors")
    assert loaded.metadata() == saved.metadata()
    assert set(loaded.decoder_state) == set(saved.decoder_state)
    for key, tensor in saved.decoder_state.items():
        assert torch.equal(loaded.decoder_state[key], tensor)
    assert loaded.encoder_state is not None and saved.encoder_state is not None
    for key, tensor in saved.encoder_state.items():
        assert torch.equal(loaded.encoder_state[key], tensor)
    assert loaded.identity.startswith("tiny@") and len(loaded.tensors_sha256) == 64
    decoder = loaded.build_decoder()
    assert not decoder.training


def test_save_is_atomic_and_leaves_no_temp_files(tmp_path: Path) -> None:
    make_tiny_model(tmp_path / "m.safetensors")
    make_tiny_model(tmp_path / "m.safetensors", seed=1)  # overwrite in place
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "m.safetensors").stat().st_mode & 0o777 == 0o666 & ~umask


def test_refuses_a_file_that_is_not_a_model(tmp_path: Path) -> None:
    plain = tmp_path / "weights.safetensors"
    save_file({"x": torch.zeros(3)}, plain)
    with pytest.raises(ModelFileError, match="not a batchcap model file"):
        load_model(plain)
    text = tmp_path / "notes.txt"
    text.write_text("hello, I am not a model at all")
    with pytest.raises(ModelFileError, match="not a batchcap model file"):
        load_model(text)


def test_refuses_a_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ModelFileError, match="no such model file"):
        load_model(tmp_path / "nope.safetensors")


def test_refuses_a_truncated_file(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    make_tiny_model(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 1000])
    with pytest.raises(ModelFileError, match="truncated"):
        load_model(path)


def test_refuses_flipped_bytes(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    make_tiny_model(path)
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ModelFileError, match="checksum"):
        load_model(path)


def _rewrite_metadata(path: Path, change) -> None:
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    change(header["__metadata__"])
    raw = json.dumps(header).encode()
    raw += b" " * ((8 - len(raw) % 8) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n :])


def test_refuses_a_newer_format_version(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    make_tiny_model(path)
    _rewrite_metadata(path, lambda m: m.update({"batchcap.format_version": str(FORMAT_VERSION + 1)}))
    with pytest.raises(ModelFileError, match="newer than this batchcap"):
        read_metadata(path)


def test_refuses_encoder_weights_with_another_hash(tmp_path: Path) -> None:
    model = make_tiny_model(tmp_path / "m.safetensors")
    weights = tmp_path / "enc.safetensors"
    save_file({"w": torch.ones(2)}, weights)
    model.encoder = type(model.encoder)(
        **{**model.encoder.__dict__, "weights_sha256": "0" * 64, "weights_file": "enc.safetensors"}
    )
    with pytest.raises(ModelFileError, match="not the ones this model was trained with"):
        check_encoder_weights(model, weights)


def test_package_never_unpickles() -> None:
    package = Path(__file__).resolve().parents[2] / "batchcap"
    for source in package.rglob("*.py"):
        text = source.read_text()
        assert "import pickle" not in text and "pickle.load" not in text, source
        for line in text.splitlines():
            if "torch.load(" in line:
                assert "weights_only=True" in line, f"{source}: {line.strip()}"


def test_files_from_before_a_new_decoder_field_still_load(tmp_path: Path) -> None:
    """New DecoderConfig fields default to the old behaviour, so older version-1 files keep working."""
    path = tmp_path / "m.safetensors"
    make_tiny_model(path)

    def drop_field(meta: dict) -> None:
        doc = json.loads(meta["batchcap.meta"])
        del doc["decoder"]["deep_output"]
        meta["batchcap.meta"] = json.dumps(doc)

    _rewrite_metadata(path, drop_field)
    model = load_model(path)
    assert model.decoder.deep_output is False
    model.build_decoder()  # the weights still fit


def test_trust_statistics_round_trip(tmp_path: Path) -> None:
    from batchcap.model.confidence import EVIDENCE, Calibrator, Neighbours, fit_familiarity

    model = make_tiny_model(tmp_path / "plain.safetensors", seed=2)
    dim = model.encoder.feature_dim
    pooled = torch.randn(40, dim, generator=torch.Generator().manual_seed(1))
    model.familiarity = fit_familiarity(pooled, components=6, note="40 random pictures")
    unendable = tuple(w for w in model.vocab.words[4:7])
    model.unendable_words, model.ending_rule = unendable, {"learnt_from": "a test", "max_end_rate": 0.03}
    model.neighbours = Neighbours(
        model.familiarity.whiten(pooled).float(), [[f"a dog runs {i % 3}", "a man"] for i in range(40)], k=3
    )
    n = len(EVIDENCE)
    model.calibration = Calibrator(
        EVIDENCE, (0.1,) * n, (2.0,) * n, (1.0, 0.5, 0.2, -0.1, -0.7, 0.3, 0.9), 0.25, {"auroc": {"confidence": 0.8}}
    )
    from batchcap.model.modelfile import save_model

    save_model(model, tmp_path / "trust.safetensors")
    loaded = load_model(tmp_path / "trust.safetensors")
    assert loaded.metadata() == model.metadata()
    assert loaded.unendable_words == unendable and loaded.ending_rule["learnt_from"] == "a test"
    assert loaded.unendable_ids == tuple(range(4, 7))
    assert loaded.calibration == model.calibration
    fam = loaded.familiarity
    assert fam is not None and fam.images == 40 and fam.components.shape == (6, dim)
    assert torch.equal(fam.score(pooled), model.familiarity.score(pooled))
    near = loaded.neighbours
    assert near is not None and near.k == 3 and torch.equal(near.vectors, model.neighbours.vectors)
    sim, consensus = near.query(fam.whiten(pooled[:4]), ["a dog runs 0", "a dog runs 1", "a cat", "a man"])
    assert sim.shape == (4,) and ((sim > 0) & (sim <= 1 + 1e-9)).all()  # each is among its own neighbours
    assert consensus[0] > consensus[2] and (consensus >= 0).all()
    # a training picture is more familiar than a picture far from all of them
    assert fam.score(pooled[:1]).item() < fam.score(pooled[:1] + 10.0).item()
    # the statistics are tensors of the file, covered by its checksum
    from safetensors.torch import load_file

    assert {"familiarity.mean", "familiarity.components", "familiarity.variances", "familiarity.neighbours"} <= set(
        load_file(str(tmp_path / "trust.safetensors"))
    )


def test_model_files_without_trust_statistics_still_load(tmp_path: Path) -> None:
    from batchcap.model.text import FALLBACK_UNENDABLE

    make_tiny_model(tmp_path / "old.safetensors")
    meta = read_metadata(tmp_path / "old.safetensors")
    assert not {"ending_rule", "familiarity", "calibration"} & set(meta)  # as older files
    old = load_model(tmp_path / "old.safetensors")
    assert old.unendable_words is None and old.familiarity is None and old.calibration is None
    # the ending rule falls back to closed-class words, of those the vocabulary has
    assert old.unendable_ids == old.vocab.ids_of(FALLBACK_UNENDABLE)
    # no pair may not end a caption, and no word may follow itself
    assert "repeat_rule" not in meta and old.unendable_pairs is None and old.repeatable_words is None
    assert old.unendable_pair_ids == () and old.repeatable_ids == ()


def test_word_rules_round_trip_and_an_ending_rule_without_pairs_still_loads(tmp_path: Path) -> None:
    from batchcap.model.modelfile import save_model

    model = make_tiny_model(tmp_path / "plain.safetensors", seed=3)
    first, second, third = model.vocab.words[4:7]
    model.unendable_words, model.ending_rule = (first,), {"learnt_from": "a test", "min_count": 20}
    save_model(model, tmp_path / "words-only.safetensors")  # as files written before the pair rule
    older = load_model(tmp_path / "words-only.safetensors")
    assert set(read_metadata(tmp_path / "words-only.safetensors")["ending_rule"]) == {
        "unendable_words",
        "learnt_from",
        "min_count",
    }
    assert older.unendable_ids == (4,) and older.unendable_pairs is None and older.unendable_pair_ids == ()

    model.unendable_pairs = ((first, second), (second, third), (first, "not-a-word"))
    model.ending_rule["determiners"] = [first, second]
    model.repeatable_words, model.repeat_rule = (third, "not-a-word"), {"learnt_from": "a test", "min_count": 5}
    save_model(model, tmp_path / "rules.safetensors")
    meta = read_metadata(tmp_path / "rules.safetensors")
    assert meta["ending_rule"]["unendable_pairs"] == [[first, second], [second, third], [first, "not-a-word"]]
    assert meta["repeat_rule"] == {"learnt_from": "a test", "min_count": 5, "repeatable_words": [third, "not-a-word"]}
    loaded = load_model(tmp_path / "rules.safetensors")
    assert loaded.metadata() == model.metadata()
    assert loaded.unendable_pairs == model.unendable_pairs and loaded.ending_rule["determiners"] == [first, second]
    assert loaded.unendable_pair_ids == ((4, 5), (5, 6))  # pairs of words the vocabulary lacks are left out
    assert loaded.repeatable_words == (third, "not-a-word") and loaded.repeatable_ids == (6,)
    assert loaded.repeat_rule == {"learnt_from": "a test", "min_count": 5}


def test_word_rules_follow_the_search_switches(tmp_path: Path) -> None:
    from batchcap.config import BeamConfig

    model = make_tiny_model(tmp_path / "m.safetensors")
    first, second = model.vocab.words[4:6]
    model.unendable_words, model.unendable_pairs, model.repeatable_words = (first,), ((first, second),), (second,)
    assert model.word_rules(BeamConfig()) == {
        "unendable_ids": (4,),
        "unendable_pairs": ((4, 5),),
        "block_repeats": True,
        "repeatable_ids": (5,),
    }
    loose = model.word_rules(BeamConfig(ending_rule=False, allow_repeated_words=True))
    assert loose["unendable_ids"] == () and loose["unendable_pairs"] == () and not loose["block_repeats"]
