"""Consensus reranking: the reordering against a per-image reference, and the captioner's use of it."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from batchcap.cli import cli
from batchcap.config import BeamConfig, ImagePolicy, OptionError, RuntimeConfig
from batchcap.data.image_decode import decode_file
from batchcap.model.beam import BeamResult, beam_search
from batchcap.model.confidence import Neighbours, fit_familiarity
from batchcap.model.modelfile import CaptionModel, load_model, save_model
from batchcap.model.rerank import rerank_by_consensus
from batchcap.pipeline.captioner import Captioner
from batchcap.pipeline.settings import beam_config


def _random_result(batch: int, n_best: int, max_len: int, seed: int) -> BeamResult:
    """A search result with ``n_best`` hypotheses per image, some images missing their last slots."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, max_len + 1, (batch, n_best), generator=gen)
    ended = torch.rand(batch, n_best, generator=gen) < 0.8
    lengths = torch.where(ended, lengths.clamp(max=max_len - 1), lengths)
    token_logprobs = torch.zeros(batch, n_best, max_len + 1)
    for b in range(batch):
        for j in range(n_best):
            shown = int(lengths[b, j]) + int(ended[b, j])
            token_logprobs[b, j, :shown] = -torch.rand(shown, generator=gen) * 3
    scores = token_logprobs.sum(2)
    scores = torch.sort(scores, dim=1, descending=True).values  # the search's order (not what reranks)
    empty = torch.zeros(batch, n_best, dtype=torch.bool)
    empty[0, n_best - 1] = True  # an image whose search found fewer hypotheses
    empty[1, n_best - 2 :] = True
    scores = scores.masked_fill(empty, -math.inf)
    tokens = torch.randint(4, 30, (batch, n_best, max_len), generator=gen)
    return BeamResult(tokens, lengths, scores, ended, token_logprobs)


def _reference_order(result: BeamResult, consensus: np.ndarray, weight: float) -> list[list[int]]:
    """Per image, the slots ordered by mean log-prob + weight * consensus, ties to the earlier slot."""
    orders = []
    for b in range(result.scores.shape[0]):
        keyed = []
        for j in range(result.scores.shape[1]):
            if not math.isfinite(float(result.scores[b, j])):
                keyed.append((-math.inf, j))
                continue
            shown = max(1, int(result.lengths[b, j]) + int(result.ended[b, j]))
            mean = float(result.token_logprobs[b, j].double().sum()) / shown
            agreement = 0.0 if j >= consensus.shape[1] or np.isnan(consensus[b, j]) else float(consensus[b, j])
            keyed.append((mean + weight * agreement, j))
        orders.append([j for _, j in sorted(keyed, key=lambda kv: (-kv[0], kv[1]))])
    return orders


@pytest.mark.parametrize("weight", [0.0, 0.7, 5.0])
def test_reranking_orders_every_image_as_the_per_image_reference_does(weight: float) -> None:
    result = _random_result(batch=6, n_best=4, max_len=7, seed=1)
    rng = np.random.default_rng(2)
    consensus = rng.random((6, 4))
    consensus[0, 3] = np.nan  # no hypothesis there
    consensus[1, 2:] = np.nan
    consensus[3, 1] = consensus[3, 2] = 0.5  # ties keep the search's order only by exact score
    reranked, reordered = rerank_by_consensus(result, consensus, weight)
    for b, order in enumerate(_reference_order(result, consensus, weight)):
        assert torch.equal(reranked.tokens[b], result.tokens[b, order])
        assert torch.equal(reranked.lengths[b], result.lengths[b, order])
        assert torch.equal(reranked.ended[b], result.ended[b, order])
        assert torch.equal(reranked.token_logprobs[b], result.token_logprobs[b, order])
        np.testing.assert_array_equal(reordered[b], consensus[b, order])
        finite = reranked.scores[b][torch.isfinite(reranked.scores[b])]
        assert torch.all(finite[:-1] >= finite[1:])  # the scores read in order
    assert reranked.scores[0, 3] == -math.inf and torch.all(reranked.scores[1, 2:] == -math.inf)


def test_fewer_consensus_columns_than_hypotheses_count_as_none() -> None:
    result = _random_result(batch=3, n_best=3, max_len=5, seed=3)
    padded = np.full((3, 3), np.nan)
    padded[:, :2] = 0.25
    short_answer = rerank_by_consensus(result, padded[:, :2], 2.0)
    full_answer = rerank_by_consensus(result, padded, 2.0)
    assert torch.equal(short_answer[0].tokens, full_answer[0].tokens)
    assert torch.equal(short_answer[0].scores, full_answer[0].scores)


def test_consensus_of_several_candidates_equals_asking_one_at_a_time() -> None:
    angles = torch.tensor([0.0, 0.6, 2.5])
    vectors = torch.stack([angles.cos(), angles.sin()], 1)
    captions = [["a dog runs on the grass", "a brown dog runs"], ["a dog swims", "a wet dog"], ["a red car", "a car"]]
    neighbours = Neighbours(vectors, captions, k=2)
    query = torch.nn.functional.normalize(torch.tensor([[1.0, 0.05], [-0.8, 0.5]]), dim=1).double()
    nearest = neighbours.nearest(query)
    candidates = [["a dog runs", "a red car", "a dog swims in water"], ["a car"]]
    table = neighbours.consensus(candidates, nearest)
    assert table.shape == (2, 3) and np.isnan(table[1, 1:]).all()
    for b, texts in enumerate(candidates):
        for n, text in enumerate(texts):
            _, one = neighbours.query(query[b : b + 1], [text])
            assert table[b, n] == pytest.approx(one[0], rel=1e-12)
    assert table[0, 0] > table[0, 1]  # the dog caption agrees with the dog pictures' captions


def _model_whose_neighbours_wrote(tiny_model_path: Path, image_folder: Path, runner_up: bool) -> tuple:
    """The tiny model with familiarity and neighbours: each picture of ``image_folder`` its own
    neighbour; every other one captioned with what the plain search ranked second (``runner_up``) or
    first, the rest with words the model never writes (random pictures all get the same hypotheses, and
    a word in every reference would carry no weight)."""
    model = load_model(tiny_model_path)
    images = torch.stack(
        [decode_file(str(p), model.preprocess, ImagePolicy()).tensor for p in sorted(image_folder.iterdir())]
    )
    runtime = RuntimeConfig(precision="fp32", channels_last=False)
    plain = Captioner(model, runtime, BeamConfig(beam_size=4, n_best=4, max_len=8))
    features = plain.encode(images)
    model.familiarity = fit_familiarity(features.mean(1), components=4)
    captions = plain.search(features)
    written = [
        [c.n_best[1 if runner_up and len(c.n_best) > 1 else 0][0] if i % 2 == 0 else "zebras under an umbrella"]
        for i, c in enumerate(captions)
    ]
    model.neighbours = Neighbours(model.familiarity.whiten(features.mean(1)), written, k=1)
    return model, features, captions, written


def _plain_search(captioner: Captioner, features: torch.Tensor, cfg: BeamConfig) -> BeamResult:
    """The beam search ``captioner`` runs, without reranking: every finished hypothesis."""
    model = captioner.model
    with torch.inference_mode():
        state = captioner.decoder.init_state(features)
    return beam_search(
        captioner.decoder.step,
        state,
        cfg,
        start_id=model.vocab.start_id,
        end_id=model.vocab.end_id,
        pad_id=model.vocab.pad_id,
        banned_ids=model.vocab.never_generated,
        per_image=captioner.decoder.per_image_state,
        **model.word_rules(cfg),
    )


def test_the_captioner_picks_what_the_reference_rule_picks_among_the_searchs_hypotheses(
    tiny_model_path: Path, image_folder: Path
) -> None:
    model, features, plain, written = _model_whose_neighbours_wrote(tiny_model_path, image_folder, runner_up=True)
    runtime = RuntimeConfig(precision="fp32", channels_last=False)
    cfg = BeamConfig(beam_size=4, n_best=4, max_len=8)
    unranked = Captioner(model, runtime, cfg)
    assert [c.text for c in unranked.search(features)] == [c.text for c in plain]  # weight 0 changes nothing
    searched = _plain_search(unranked, features, cfg)
    whitened = model.familiarity.whiten(features.mean(1))
    for weight in (0.3, 50.0):
        captioner = Captioner(model, runtime, dataclasses.replace(cfg, consensus_weight=weight))
        reranked, evidence = captioner.search_with_evidence(features)
        for b, caption in enumerate(reranked):
            expected = []  # the reference: every finite hypothesis scored one at a time
            for j in range(cfg.n_best):
                if not math.isfinite(float(searched.scores[b, j])):
                    continue
                text = model.vocab.decode(searched.tokens[b, j].tolist())
                shown = max(1, int(searched.lengths[b, j]) + int(searched.ended[b, j]))
                mean = float(searched.token_logprobs[b, j].float().sum()) / shown
                _, agreement = model.neighbours.query(whitened[b : b + 1], [text])
                expected.append((mean + weight * float(agreement[0]), text))
            ranked = [text for _, text in sorted(expected, key=lambda vt: -vt[0])]
            assert [t for t, _ in caption.n_best] == ranked
            assert caption.score == pytest.approx(max(v for v, _ in expected), abs=1e-5)
            _, agreement = model.neighbours.query(whitened[b : b + 1], [caption.text])
            assert evidence[b, -1] == pytest.approx(agreement[0])  # the evidence describes the chosen caption
    # with a large weight a picture gets the caption its neighbour (itself) was written with, where it can
    expected = [w[0] if i % 2 == 0 else c.text for i, (w, c) in enumerate(zip(written, plain))]
    assert [c.text for c in reranked] == expected
    assert [c.text for c in reranked] != [c.text for c in plain]


def test_the_default_weight_reranks_only_models_with_neighbours() -> None:
    assert beam_config(3, None, 1, 0.0, 0, 1, 20, has_neighbours=True).consensus_weight == 1.0
    assert beam_config(3, None, 1, 0.0, 0, 1, 20, has_neighbours=False).consensus_weight == 0.0
    assert beam_config(3, None, 1, 0.0, 0, 1, 20, consensus_weight=0, has_neighbours=False).consensus_weight == 0.0
    with pytest.raises(OptionError, match="--consensus-weight.*no neighbour statistics.*batchcap calibrate"):
        beam_config(3, None, 1, 0.0, 0, 1, 20, consensus_weight=0.5, has_neighbours=False)
    for bad in (-1.0, float("nan")):
        with pytest.raises(OptionError, match="--consensus-weight.*must be 0 .no reranking. or more"):
            beam_config(3, None, 1, 0.0, 0, 1, 20, consensus_weight=bad, has_neighbours=True)


def test_run_refuses_a_weight_a_model_without_neighbours_cannot_honour(
    tiny_model_path: Path, image_folder: Path, tmp_path: Path
) -> None:
    out = tmp_path / "captions.jsonl"
    args = ["run", str(image_folder), "--out", str(out), "--model", str(tiny_model_path), "--workers", "0"]
    refused = CliRunner().invoke(cli, [*args, "--consensus-weight", "1"])
    assert refused.exit_code == 2, refused.output
    assert "--consensus-weight" in refused.output and "batchcap calibrate" in refused.output
    assert not out.exists()
    assert CliRunner().invoke(cli, args).exit_code == 0  # the default leaves such a model's search alone


def test_a_saved_model_with_neighbours_reranks_by_default(
    tiny_model_path: Path, image_folder: Path, tmp_path: Path
) -> None:
    model, *_ = _model_whose_neighbours_wrote(tiny_model_path, image_folder, runner_up=True)
    path = tmp_path / "with-neighbours.safetensors"
    save_model(model, path)
    reloaded: CaptionModel = load_model(path)
    assert reloaded.neighbours is not None
    out = tmp_path / "captions.jsonl"
    base = ["run", str(image_folder), "--model", str(path), "--workers", "0", "--beam", "4", "--max-len", "8"]
    assert CliRunner().invoke(cli, [*base, "--out", str(out)]).exit_code == 0
    plain = tmp_path / "plain.jsonl"
    assert CliRunner().invoke(cli, [*base, "--out", str(plain), "--consensus-weight", "0"]).exit_code == 0
    reranked = {r["id"]: r["caption"] for r in map(json.loads, out.read_text().splitlines())}
    searched = {r["id"]: r["caption"] for r in map(json.loads, plain.read_text().splitlines())}
    assert reranked != searched  # the neighbours wrote the runner-up: reranking moves some captions
