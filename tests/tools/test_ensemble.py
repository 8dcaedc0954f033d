"""Decoder ensembles: the combined step against a plain per-row reference, the search against
the per-image reference search, the model file, and the refusals."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from beam_reference import reference_beam_search
from click.testing import CliRunner
from conftest import make_tiny_model

from batchcap.cli import cli
from batchcap.config import BeamConfig, DecoderConfig
from batchcap.model.beam import beam_search
from batchcap.model.decoder import CaptionDecoder
from batchcap.model.ensemble import EnsembleDecoder, EnsembleError, combine_log_probs
from batchcap.model.modelfile import ModelFileError, load_model, read_header, save_model
from batchcap.model.text import SPECIAL_TOKENS, Vocabulary
from batchcap.tools.ensemble import ensemble_models

VOCAB = 12


def _members(seed: int = 0) -> list[CaptionDecoder]:
    """Three differently shaped decoders over the same 12 words and 6-d features."""
    torch.manual_seed(seed)
    shapes = [dict(hidden_dim=16), dict(hidden_dim=24, deep_output=True), dict(hidden_dim=8, num_layers=2)]
    members = []
    for shape in shapes:
        decoder = CaptionDecoder(
            DecoderConfig(vocab_size=VOCAB, feature_dim=6, embed_dim=8, attention_dim=8, dropout=0.0, **shape)
        ).eval()
        with torch.no_grad():
            decoder.out.bias[2] += 1.0  # <end> likely enough that searches finish
        members.append(decoder)
    return members


def _reference_step(members: list[CaptionDecoder], rule: str):
    """The ensemble step written out plainly: each row, each member, the formula by hand."""
    sizes = [len(m.per_image_state) for m in members]

    def step(tokens: torch.Tensor, state: tuple[torch.Tensor, ...]):
        parts, start = [], 0
        for size in sizes:
            parts.append(state[start : start + size])
            start += size
        rows, new_parts = [], [[] for _ in members]
        for n in range(tokens.shape[0]):
            probs = []
            for j, (member, part) in enumerate(zip(members, parts)):
                lp, new = member.step(tokens[n : n + 1], tuple(t[n : n + 1] for t in part))
                probs.append(lp[0].double())
                new_parts[j].append(new)
            if rule == "logprob":
                mean = sum(probs) / len(probs)
                rows.append(mean - torch.logsumexp(mean, 0))
            else:
                rows.append(torch.log(sum(p.exp() for p in probs) / len(probs)))
        new_state = tuple(
            torch.cat([new[i] for new in per_member]) for per_member in new_parts for i in range(len(per_member[0]))
        )
        return torch.stack(rows).float(), new_state

    return step


@pytest.mark.parametrize("rule", ["logprob", "prob"])
def test_combined_step_matches_the_formula_row_by_row(rule: str) -> None:
    members = _members()
    ensemble = EnsembleDecoder(members, rule)
    features = torch.randn(4, 5, 6)
    state = ensemble.init_state(features)
    tokens = torch.tensor([1, 4, 7, 9])
    with torch.inference_mode():
        got, _ = ensemble.step(tokens, state)
        want, _ = _reference_step(members, rule)(tokens, state)
    assert torch.allclose(got, want, atol=1e-5)
    assert torch.allclose(got.exp().sum(1), torch.ones(4), atol=1e-5)  # a distribution either way


def test_combining_one_member_changes_nothing() -> None:
    lp = torch.log_softmax(torch.randn(3, VOCAB), -1)
    assert combine_log_probs([lp]) is lp
    for rule in ("logprob", "prob"):  # and identical members give the member's distribution
        assert torch.allclose(combine_log_probs([lp, lp, lp], rule), lp, atol=1e-6)


@pytest.mark.parametrize("rule,beam", [("logprob", 3), ("prob", 4), ("logprob", 1)])
def test_vectorised_search_over_an_ensemble_equals_the_reference(rule: str, beam: int) -> None:
    members = _members(seed=3)
    ensemble = EnsembleDecoder(members, rule)
    state = ensemble.init_state(torch.randn(5, 5, 6))
    cfg = BeamConfig(beam_size=beam, max_len=9, n_best=min(2, beam))
    kw = dict(start_id=1, end_id=2, pad_id=0, banned_ids=(0, 1, 3), unendable_ids=(5,))
    fast = beam_search(ensemble.step, state, cfg, per_image=ensemble.per_image_state, **kw)
    slow = reference_beam_search(_reference_step(members, rule), state, cfg, **kw)
    assert torch.equal(fast.tokens, slow.tokens)
    assert torch.equal(fast.lengths, slow.lengths)
    assert torch.allclose(fast.scores, slow.scores, atol=1e-4)
    # the shared memory and keys of every member stay one copy per image
    assert ensemble.per_image_state == (False, False, True, True) * 3


@pytest.fixture
def three_models(tmp_path: Path) -> list[Path]:
    """Three tiny models with one encoder and vocabulary, different decoder weights ("seeds")."""
    paths = [tmp_path / f"m{i}.safetensors" for i in range(3)]
    base = make_tiny_model(paths[0])
    generator = torch.Generator().manual_seed(7)
    for i, path in enumerate(paths[1:], 1):
        moved = {
            k: v + 0.5 * torch.randn(v.shape, generator=generator) if v.is_floating_point() else v
            for k, v in base.decoder_state.items()
        }
        save_model(replace(base, name=f"m{i}", decoder_state=moved), path)
    return paths


def test_model_file_round_trip_and_format_version(three_models: list[Path], tmp_path: Path) -> None:
    models = [load_model(p) for p in three_models]
    out = tmp_path / "ens.safetensors"
    saved = save_model(ensemble_models(models, "prob", name="ens"), out, half=True)
    loaded = load_model(out)
    assert loaded.identity == saved.identity and loaded.combine == "prob"
    assert [m.identity for m in loaded.decoders()] == [m.identity for m in models]
    for member, model in zip(loaded.decoders(), models):
        for key, value in model.decoder_state.items():
            assert torch.equal(member.state[key].float(), value.half().float()), key
    assert read_header(out)["__metadata__"]["batchcap.format_version"] == "2"
    assert read_header(three_models[0])["__metadata__"]["batchcap.format_version"] == "1"  # singles stay 1
    decoder = loaded.build_decoder()
    assert isinstance(decoder, EnsembleDecoder) and len(decoder.members) == 3
    # an ensemble of ensembles is flattened
    again = ensemble_models([loaded, models[0]])
    assert len(again.decoders()) == 4


def test_a_batchcap_that_reads_only_version_1_refuses_an_ensemble(
    three_models: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "ens.safetensors"
    save_model(ensemble_models([load_model(p) for p in three_models]), out)
    import batchcap.model.modelfile as modelfile

    monkeypatch.setattr(modelfile, "FORMAT_VERSION", 1)
    with pytest.raises(ModelFileError, match="version 2 is newer"):
        load_model(out)


def test_identical_members_caption_like_the_single_model(
    three_models: list[Path], tmp_path: Path, image_folder: Path
) -> None:
    out = tmp_path / "twice.safetensors"
    single = load_model(three_models[0])
    save_model(ensemble_models([single, single]), out)
    runner = CliRunner()
    rows = {}
    for name, model in (("single", three_models[0]), ("twice", out)):
        result = runner.invoke(
            cli,
            [
                "run",
                str(image_folder),
                "--out",
                str(tmp_path / f"{name}.jsonl"),
                "--model",
                str(model),
                "--precision",
                "fp32",
                "--workers",
                "0",
                "--n-best",
                "2",
            ],
        )
        assert result.exit_code == 0, result.output
        rows[name] = sorted(
            (json.loads(line) for line in (tmp_path / f"{name}.jsonl").read_text().splitlines()), key=lambda r: r["id"]
        )
    assert len(rows["twice"]) == 20 and all(r["status"] == "ok" for r in rows["twice"])
    assert [r["caption"] for r in rows["twice"]] == [r["caption"] for r in rows["single"]]
    assert all(math.isclose(a["logprob"], b["logprob"], abs_tol=1e-4) for a, b in zip(rows["twice"], rows["single"]))


def test_cli_writes_an_ensemble_that_info_describes(
    three_models: list[Path], tmp_path: Path, image_folder: Path
) -> None:
    out = tmp_path / "ens.safetensors"
    runner = CliRunner()
    result = runner.invoke(cli, ["ensemble", *map(str, three_models), "--out", str(out), "--half"])
    assert result.exit_code == 0, result.output
    assert len(json.loads(result.output)["members"]) == 3
    info = runner.invoke(cli, ["info", str(out)], env={"COLUMNS": "200"})
    assert info.exit_code == 0, info.output
    assert "3 decoders in one beam search" in info.output and "decoder 3" in info.output
    captions = runner.invoke(
        cli, ["run", str(image_folder), "--out", str(tmp_path / "c.parquet"), "--model", str(out), "--workers", "0"]
    )
    assert captions.exit_code == 0, captions.output
    import pyarrow.parquet as pq

    table = pq.read_table(tmp_path / "c.parquet")
    assert table.num_rows == 20 and set(table.column("status").to_pylist()) == {"ok"}
    assert set(table.column("model").to_pylist()) == {load_model(out).identity}


def test_refusals(three_models: list[Path], tmp_path: Path) -> None:
    models = [load_model(p) for p in three_models]
    other_words = replace(models[1], vocab=Vocabulary(SPECIAL_TOKENS + tuple(f"w{i}" for i in range(13))))
    with pytest.raises(EnsembleError, match="vocabulary"):
        ensemble_models([models[0], other_words])
    other_encoder = load_model(make_tiny_model(tmp_path / "c.safetensors", seed=5).path or tmp_path / "c.safetensors")
    with pytest.raises(EnsembleError, match="embedded encoder weights"):
        ensemble_models([models[0], other_encoder])
    with pytest.raises(EnsembleError, match="at least two"):
        ensemble_models(models[:1])
    out = tmp_path / "ens.safetensors"
    save_model(ensemble_models(models), out)
    runner = CliRunner()
    averaged = runner.invoke(cli, ["average", str(out), str(three_models[0]), "--out", str(tmp_path / "a.safetensors")])
    assert averaged.exit_code == 2 and "is an ensemble of 3 decoders" in averaged.output, averaged.output
    bad = runner.invoke(cli, ["ensemble", str(three_models[0]), "--out", str(tmp_path / "x.safetensors")])
    assert bad.exit_code == 2 and "at least two" in bad.output, bad.output


def test_members_with_their_own_features_each_read_their_own_slice() -> None:
    """Members fine-tuned with their own exit flows get the features side by side; each must see only its own."""
    members = _members(seed=5)
    own = [torch.randn(3, 5, 6) for _ in members]
    ensemble = EnsembleDecoder(members, "logprob", split_features=True)
    state = ensemble.init_state(torch.cat(own, dim=-1))
    want = tuple(t for member, features in zip(members, own) for t in member.init_state(features))
    assert len(state) == len(want) and all(torch.allclose(a, b, atol=1e-6) for a, b in zip(state, want))
    tokens = torch.tensor([1, 4, 7])
    with torch.inference_mode():
        got, _ = ensemble.step(tokens, state)
        reference, _ = _reference_step(members, "logprob")(tokens, want)
    assert torch.allclose(got, reference, atol=1e-5)
    # the same features for every member is the shared-encoder ensemble
    shared = torch.randn(3, 5, 6)
    same = EnsembleDecoder(members, "prob", split_features=True).init_state(torch.cat([shared] * 3, dim=-1))
    product = EnsembleDecoder(members, "prob").init_state(shared)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(same, product))
    with pytest.raises(EnsembleError, match="features of 6 dimensions, but the members' exit flows give 18"):
        ensemble.init_state(shared)


def test_the_exit_flow_sweep_reads_ensembles(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from sweep_exit_flow_ensembles import parse_ensemble

    assert parse_ensemble("a+b+b:prob") == (["a", "b", "b"], "prob") and parse_ensemble("a") == (["a"], "logprob")


def test_caption_words_counts_distinct_words_and_referenced_content_words(monkeypatch: pytest.MonkeyPatch) -> None:
    """The script that compares how specific the pair's captions are against a single model's."""
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from caption_words import datasets_of, word_figures

    rows = [
        # content words: plate, broccoli -> both in the references
        {"caption": "A plate of broccoli.", "references": ["broccoli on a white plate"]},
        # content words: dog, running, snow -> dog only
        {"caption": "a dog running in the snow", "references": ["a dog sleeps", "the dog is brown"]},
        {"caption": "a the of", "references": ["a cat"]},  # no content word: not counted in the share
    ]
    figures = word_figures(rows)
    assert figures["distinct_words"] == 9  # a plate of broccoli dog running in the snow
    assert figures["content_words_in_references"] == pytest.approx(round((1.0 + 1 / 3) / 2, 3))
    assert set(datasets_of({"datasets": {"x": {}, "y": {}}})) == {"x", "y"}
    assert list(datasets_of({"data": "/d/flickr8k", "captions": []})) == ["flickr8k"]
