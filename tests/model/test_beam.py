"""The vectorised beam search against the per-image reference, on random-weight decoders.

Exact comparisons drive the decoder one row at a time (``rowwise``): BLAS kernels round a
row differently depending on how many rows share the call, and the reference calls ``step``
with far fewer rows than the batched search. Row by row, both searches see bit-identical
log-probabilities, so any difference is the search's own.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from beam_reference import reference_beam_search

from batchcap.config import BeamConfig, DecoderConfig
from batchcap.model.beam import BeamResult, State, StepFn, beam_search
from batchcap.model.decoder import CaptionDecoder

PAD, START, END, UNK = 0, 1, 2, 3
BANNED = (PAD, START, UNK)
FEATURE_DIM, REGIONS = 24, 6


def make_decoder(
    seed: int, attention: bool = True, vocab: int = 40, end_bias: float = 0.0, unk_bias: float = 0.0
) -> CaptionDecoder:
    """A small random decoder whose captions depend on the image, diverge across beams and end.

    Features, initial state and recurrent weights are scaled up so images and histories
    matter; output weights are scaled so distributions are peaked enough for beams to differ.
    """
    torch.manual_seed(seed)
    cfg = DecoderConfig(
        vocab_size=vocab,
        feature_dim=FEATURE_DIM,
        embed_dim=16,
        hidden_dim=32,
        attention=attention,
        attention_dim=16,
        dropout=0.0,
    )
    decoder = CaptionDecoder(cfg).eval()
    with torch.no_grad():
        for layer in (decoder.feature_proj, decoder.init_h, decoder.init_c):
            layer.weight.mul_(4.0)
        for cell in decoder.cells:
            cell.weight_hh.mul_(2.0)
        decoder.embed.weight.mul_(2.0)
        decoder.out.weight.mul_(3.0)
        decoder.out.bias[END] += end_bias
        decoder.out.bias[UNK] += unk_bias
    return decoder


def features(seed: int, batch: int) -> torch.Tensor:
    return torch.randn(batch, REGIONS, FEATURE_DIM, generator=torch.Generator().manual_seed(seed))


def rowwise(decoder: CaptionDecoder) -> StepFn:
    """``decoder.step`` one row at a time; state tensors it passes through stay the same objects."""

    def step(tokens: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        outs = []
        for i in range(tokens.shape[0]):
            rows = tuple(s[i : i + 1] for s in state)
            log_probs, new = decoder.step(tokens[i : i + 1], rows)
            outs.append((log_probs, new, rows))
        new_state = tuple(
            state[j] if all(new[j] is rows[j] for _, new, rows in outs) else torch.cat([o[1][j] for o in outs])
            for j in range(len(state))
        )
        return torch.cat([o[0] for o in outs]), new_state

    return step


def run_both(
    decoder: CaptionDecoder,
    feats: torch.Tensor,
    cfg: BeamConfig,
    banned: tuple[int, ...] = BANNED,
    unendable: tuple[int, ...] = (),
    pairs: tuple[tuple[int, int], ...] = (),
    repeats: tuple[int, ...] | None = None,
) -> tuple[BeamResult, BeamResult]:
    """Both searches on the same rows; ``repeats`` None lets words follow themselves, else only these."""
    with torch.inference_mode():
        state = decoder.init_state(feats)
    step = rowwise(decoder)
    kw = dict(
        start_id=START,
        end_id=END,
        pad_id=PAD,
        banned_ids=banned,
        unendable_ids=unendable,
        unendable_pairs=pairs,
        block_repeats=repeats is not None,
        repeatable_ids=repeats or (),
    )
    return beam_search(step, state, cfg, **kw), reference_beam_search(step, state, cfg, **kw)


@pytest.mark.parametrize("seed", range(8))
def test_shared_memory_and_sparse_syncs_change_nothing(seed: int) -> None:
    # The decoder's memory and keys kept once per image (not K times), and the "all finished?"
    # check made every 3rd word instead of every word: the same captions. (One bmm over an image's
    # K beams sums in another order than K bmms of one, so log-probabilities agree to rounding.)
    rng = np.random.default_rng(100 + seed)
    k = (1, 3, 5)[seed % 3]
    cfg = BeamConfig(
        beam_size=k,
        max_len=int(rng.integers(4, 13)),
        min_len=int(rng.integers(0, 3)),
        length_penalty=float(rng.choice([0.0, 0.7])),
        n_best=int(rng.integers(1, k + 1)),
    )
    decoder = make_decoder(seed, attention=bool(seed % 2), end_bias=float(rng.uniform(-1.0, 1.0)))
    with torch.inference_mode():
        state = decoder.init_state(features(seed, int(rng.integers(1, 20))))
        kw = dict(start_id=START, end_id=END, pad_id=PAD, banned_ids=BANNED, unendable_ids=(7, 8, 9))
        plain = beam_search(decoder.step, state, cfg, **kw)
        lean = beam_search(decoder.step, state, cfg, per_image=decoder.per_image_state, sync_every=3, **kw)
        sparse = beam_search(decoder.step, state, cfg, sync_every=3, **kw)
    assert_same(sparse, plain)  # the syncs alone: exactly equal
    assert torch.equal(lean.tokens, plain.tokens) and torch.equal(lean.lengths, plain.lengths)
    assert torch.equal(lean.ended, plain.ended)
    torch.testing.assert_close(lean.scores, plain.scores, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lean.token_logprobs, plain.token_logprobs, rtol=1e-5, atol=1e-5)


def test_a_step_that_changes_per_image_state_is_refused() -> None:
    decoder = make_decoder(3)
    with torch.inference_mode():
        state = decoder.init_state(features(3, 2))

        def step(tokens: torch.Tensor, st: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
            log_probs, new = decoder.step(tokens, st)
            return log_probs, (new[0], new[1], new[2].clone(), new[3])

        with pytest.raises(ValueError, match="per_image"):
            beam_search(
                step,
                state,
                BeamConfig(beam_size=3, max_len=5),
                start_id=START,
                end_id=END,
                per_image=decoder.per_image_state,
            )


def assert_same(got: BeamResult, want: BeamResult) -> None:
    assert torch.equal(got.tokens, want.tokens)
    assert torch.equal(got.lengths, want.lengths)
    assert torch.equal(got.ended, want.ended)
    torch.testing.assert_close(got.scores, want.scores, rtol=1e-6, atol=1e-6)
    assert got.scores.dtype == torch.float32
    assert torch.equal(got.token_logprobs, want.token_logprobs)


def captions(result: BeamResult, b: int) -> list[list[int]]:
    return [result.tokens[b, j, : result.lengths[b, j]].tolist() for j in range(result.lengths.shape[1])]


@pytest.mark.parametrize("seed", range(24))
def test_batched_equals_reference(seed: int) -> None:
    rng = np.random.default_rng(seed)
    k = (1, 3, 5)[seed % 3]
    batch = 33 if seed < 3 else int(rng.integers(1, 34))
    cfg = BeamConfig(
        beam_size=k,
        max_len=int(rng.integers(4, 13)),
        min_len=int(rng.integers(0, 3)),
        length_penalty=float(rng.choice([0.0, 0.0, 0.7, 1.0])),
        no_repeat_ngram=int(rng.choice([0, 0, 1, 2, 3])),
        n_best=int(rng.integers(1, k + 1)),
    )
    decoder = make_decoder(seed, attention=bool(seed % 2), end_bias=float(rng.uniform(-1.0, 1.0)))
    # half the seeds with an ending rule: a random tenth to half of the words may not end a caption
    unendable = (
        tuple(int(w) for w in rng.choice(np.arange(4, 40), size=int(rng.integers(4, 18)), replace=False))
        if seed % 2 == 0
        else ()
    )
    # a third of the seeds with the pair rule (pairs of frequent words, so that it bites) and the
    # repetition rule with a few exceptions; some seeds with both ending rules
    words = np.arange(4, 40)
    pairs = (
        tuple((int(a), int(w)) for a, w in rng.choice(words, size=(int(rng.integers(20, 200)), 2)))
        if seed % 3 != 1
        else ()
    )
    repeats = tuple(int(w) for w in rng.choice(words, size=int(rng.integers(0, 6)), replace=False))
    got, want = run_both(
        decoder, features(seed, batch), cfg, unendable=unendable, pairs=pairs, repeats=repeats if seed % 4 else None
    )
    assert_same(got, want)
    assert got.tokens.shape == (batch, cfg.n_best, cfg.max_len)
    assert got.token_logprobs.shape == (batch, cfg.n_best, cfg.max_len + 1)


def last_words(result: BeamResult) -> torch.Tensor:
    """``(B, n_best)`` the last word of each caption (``PAD`` for an empty one)."""
    index = (result.lengths - 1).clamp(min=0)[:, :, None]
    return torch.where(result.lengths > 0, result.tokens.gather(2, index)[:, :, 0], PAD)


def test_end_mask_no_caption_ends_on_an_unendable_word() -> None:
    decoder = make_decoder(21, end_bias=1.0)
    feats = features(21, 30)
    cfg = BeamConfig(beam_size=3, max_len=10, n_best=3)
    free, _ = run_both(decoder, feats, cfg)
    ends = last_words(free)[free.ended]
    unendable = tuple(sorted(set(ends.tolist()))[: max(1, len(set(ends.tolist())) // 2)])
    assert torch.isin(ends, torch.tensor(unendable)).any()  # without the rule, some end there
    got, want = run_both(decoder, feats, cfg, unendable=unendable)
    assert_same(got, want)
    assert not torch.isin(last_words(got)[got.ended], torch.tensor(unendable)).any()
    assert got.ended.any()


def test_max_len_cuts_back_to_a_clean_word() -> None:
    decoder = make_decoder(8, end_bias=-30.0)  # never ends by itself: every caption is finalised
    feats = features(8, 12)
    cfg = BeamConfig(beam_size=3, max_len=7, n_best=3)
    free, _ = run_both(decoder, feats, cfg)
    unendable = tuple(range(4, 40, 2))  # the even words may not end a caption
    assert torch.isin(last_words(free), torch.tensor(unendable)).any()
    got, want = run_both(decoder, feats, cfg, unendable=unendable)
    assert_same(got, want)
    assert not got.ended.any()
    clean_exists = ~torch.isin(free.tokens, torch.tensor(unendable)).all(2)
    cut = torch.isin(last_words(got), torch.tensor(unendable))
    assert not (cut & clean_exists).any()  # ends on a clean word whenever it has one
    assert (got.lengths < cfg.max_len).any()  # some were cut
    # the search's score is kept: that of all max_len words, so the list stays ordered by it
    assert (got.scores[:, :-1] >= got.scores[:, 1:]).all()
    torch.testing.assert_close(got.scores.sort(1).values, free.scores.sort(1).values)
    # the token log-probabilities are those of the words kept, zero after them
    kept = torch.arange(cfg.max_len + 1)[None, None, :] < got.lengths[:, :, None]
    assert (got.token_logprobs[~kept] == 0).all() and (got.token_logprobs[kept] < 0).all()


def test_token_logprobs_add_up_to_the_raw_score() -> None:
    decoder = make_decoder(22, end_bias=0.5)
    cfg = BeamConfig(beam_size=4, max_len=9, n_best=4, length_penalty=0.7)
    got, want = run_both(decoder, features(22, 16), cfg, unendable=(5, 6, 7))
    assert_same(got, want)
    length = (got.lengths + got.ended.long()).float()
    torch.testing.assert_close(got.token_logprobs.sum(2), got.scores * length**0.7)


@pytest.mark.parametrize("attention", [True, False])
def test_beam_of_one_is_greedy(attention: bool) -> None:
    decoder = make_decoder(5, attention=attention, end_bias=0.5)
    feats = features(5, 17)
    cfg = BeamConfig(beam_size=1, max_len=10, min_len=2)
    with torch.inference_mode():
        state = decoder.init_state(feats)
        got = beam_search(decoder.step, state, cfg, start_id=START, end_id=END, banned_ids=BANNED)
        # plain greedy decoding: arg-max of the masked log-probabilities, every row every step
        tokens, total = torch.full((17,), START), torch.zeros(17)
        words, done = [[] for _ in range(17)], [False] * 17
        for t in range(cfg.max_len):
            log_probs, state = decoder.step(tokens, state)
            log_probs[:, list(BANNED)] = float("-inf")
            if t < cfg.min_len:
                log_probs[:, END] = float("-inf")
            tokens = log_probs.argmax(1)
            for b in range(17):
                if not done[b]:
                    total[b] += log_probs[b, tokens[b]]
                    done[b] = tokens[b].item() == END
                    if not done[b]:
                        words[b].append(tokens[b].item())
    assert [captions(got, b)[0] for b in range(17)] == words
    assert got.ended[:, 0].tolist() == done
    torch.testing.assert_close(got.scores[:, 0], total)
    assert len({len(w) for w in words}) > 2  # the model makes captions of varied lengths


def test_min_len_respected() -> None:
    decoder = make_decoder(7, end_bias=4.0)  # <end> is the favourite word
    feats = features(7, 20)
    free, _ = run_both(decoder, feats, BeamConfig(beam_size=3, max_len=8, n_best=3))
    assert (free.lengths < 3).any()
    got, want = run_both(decoder, feats, BeamConfig(beam_size=3, max_len=8, min_len=3, n_best=3))
    assert_same(got, want)
    assert (got.lengths >= 3).all()
    assert got.ended.all()


def test_max_len_finalises_unfinished() -> None:
    decoder = make_decoder(8, end_bias=-30.0)  # never ends by itself
    got, want = run_both(decoder, features(8, 9), BeamConfig(beam_size=3, max_len=6, n_best=2))
    assert_same(got, want)
    assert (got.lengths == 6).all() and not got.ended.any()
    assert torch.isfinite(got.scores).all()
    assert (got.tokens != PAD).all()


def test_length_penalty_normalises_by_length() -> None:
    decoder = make_decoder(10, end_bias=1.0)
    feats = features(10, 12)
    got, want = run_both(decoder, feats, BeamConfig(beam_size=4, max_len=10, length_penalty=1.0, n_best=4))
    assert_same(got, want)
    plain, _ = run_both(decoder, feats, BeamConfig(beam_size=4, max_len=10, n_best=4))
    # the same finished hypotheses (the search path does not depend on alpha), ranked differently
    raw = got.scores * (got.lengths + got.ended.long())  # length counts <end>
    torch.testing.assert_close(raw.sort(1).values, plain.scores.sort(1).values)
    assert got.lengths[:, 0].float().mean() > plain.lengths[:, 0].float().mean()  # alpha favours long ones


def has_repeat(words: list[int], n: int) -> bool:
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    return len(grams) != len(set(grams))


@pytest.mark.parametrize("n", [1, 2, 3])
def test_no_repeat_ngram(n: int) -> None:
    decoder = make_decoder(10 + n, vocab=30, end_bias=-3.0)
    feats = features(n, 15)
    loose, _ = run_both(decoder, feats, BeamConfig(beam_size=3, max_len=12, n_best=3))
    assert any(has_repeat(c, n) for b in range(15) for c in captions(loose, b))
    got, want = run_both(decoder, feats, BeamConfig(beam_size=3, max_len=12, n_best=3, no_repeat_ngram=n))
    assert_same(got, want)
    assert not any(has_repeat(c, n) for b in range(15) for c in captions(got, b))


def test_n_best_sorted_and_distinct() -> None:
    decoder = make_decoder(13, end_bias=0.5)
    got, want = run_both(decoder, features(13, 10), BeamConfig(beam_size=5, max_len=8, n_best=4))
    assert_same(got, want)
    assert (got.scores[:, :-1] >= got.scores[:, 1:]).all()
    for b in range(10):
        caps = captions(got, b)
        assert len({tuple(c) for c in caps}) == 4


def test_banned_ids_never_emitted() -> None:
    decoder = make_decoder(14, unk_bias=6.0)
    with torch.no_grad():
        decoder.out.bias[PAD] += 5.0
    feats = features(14, 12)
    cfg = BeamConfig(beam_size=3, max_len=8, n_best=3)
    unbanned, _ = run_both(decoder, feats, cfg, banned=())
    assert (unbanned.tokens == UNK).any()  # the bias matters
    got, want = run_both(decoder, feats, cfg)
    assert_same(got, want)
    for b in range(12):
        for c in captions(got, b):
            assert not set(c) & set(BANNED) and END not in c


def test_batch_of_one_equals_inside_batch() -> None:
    decoder = make_decoder(15, attention=True, end_bias=0.3)
    feats = features(15, 20)
    cfg = BeamConfig(beam_size=5, max_len=9, n_best=2, no_repeat_ngram=2)
    with torch.inference_mode():
        state = decoder.init_state(feats)
    kw = dict(start_id=START, end_id=END, banned_ids=BANNED)
    many = beam_search(rowwise(decoder), state, cfg, **kw)
    for b in (0, 7, 19):
        one = beam_search(rowwise(decoder), tuple(s[b : b + 1] for s in state), cfg, **kw)
        assert torch.equal(one.tokens[0], many.tokens[b]) and torch.equal(one.lengths[0], many.lengths[b])
        torch.testing.assert_close(one.scores[0], many.scores[b])


def test_real_batched_decoder_runs_in_fp32_under_autocast() -> None:
    decoder = make_decoder(16)
    feats = features(16, 8)
    cfg = BeamConfig(beam_size=3, max_len=6, n_best=3)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        state = decoder.init_state(feats)
        got = beam_search(decoder.step, state, cfg, start_id=START, end_id=END, banned_ids=BANNED)
    assert got.scores.dtype == torch.float32 and torch.isfinite(got.scores).all()
    assert (got.scores[:, :-1] >= got.scores[:, 1:]).all()


@pytest.mark.cuda
def test_cuda_matches_reference() -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    decoder = make_decoder(17).cuda()
    rules = dict(unendable=(5, 6), pairs=((7, 8), (9, 10), (8, 11)), repeats=(12,))  # the word rules on the GPU too
    got, want = run_both(decoder, features(17, 6).cuda(), BeamConfig(beam_size=3, max_len=8, n_best=2), **rules)
    assert got.tokens.device.type == "cuda"
    assert_same(
        BeamResult(*(x.cpu() for x in (got.tokens, got.lengths, got.scores, got.ended, got.token_logprobs))), want
    )


def test_fewer_candidates_than_beams_and_empty_batch() -> None:
    decoder = make_decoder(2, vocab=6)  # two usable words, each at most once
    cfg = BeamConfig(beam_size=5, max_len=4, n_best=5, no_repeat_ngram=1)
    got, want = run_both(decoder, features(2, 4), cfg)
    assert_same(got, want)
    assert torch.isinf(got.scores[:, 2:]).all() and (got.lengths[:, 2:] == 0).all()
    with torch.inference_mode():
        empty = beam_search(
            decoder.step,
            decoder.init_state(features(2, 0)),
            BeamConfig(beam_size=3, max_len=5, n_best=2),
            start_id=START,
            end_id=END,
            banned_ids=BANNED,
        )
    assert empty.tokens.shape == (0, 2, 5) and empty.scores.shape == (0, 2)


def table_step(table: dict[int, dict[int, float]], vocab: int) -> StepFn:
    """A step function whose next-word probabilities depend on the last word alone: ``table[last]``."""
    rows = torch.full((vocab, vocab), -30.0)
    for last, nexts in table.items():
        for word, prob in nexts.items():
            rows[last, word] = float(np.log(prob))
    rows = rows.log_softmax(1)

    def step(tokens: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        return rows[tokens], state

    return step


def search_table(
    table: dict[int, dict[int, float]], cfg: BeamConfig, **rules: object
) -> tuple[list[list[int]], list[bool]]:
    """The best caption of both searches (which must agree) for a one-image ``table_step``."""
    step, state = table_step(table, 12), (torch.zeros(1, 1),)
    kw: dict = dict(start_id=START, end_id=END, pad_id=PAD, banned_ids=BANNED, **rules)
    got, want = beam_search(step, state, cfg, **kw), reference_beam_search(step, state, cfg, **kw)
    assert_same(got, want)
    return captions(got, 0), got.ended[0].tolist()


MAN, IS, STANDING, IN, A, BLACK, SHIRT = 4, 5, 6, 7, 8, 9, 10


def test_a_word_may_not_follow_itself_unless_it_is_an_exception() -> None:
    # "is" again is the likeliest word after "is": "man is is is" beats "man is standing"
    table = {START: {MAN: 0.9}, MAN: {IS: 0.9}, IS: {IS: 0.9, STANDING: 0.1}, STANDING: {END: 0.9}}
    cfg = BeamConfig(beam_size=3, max_len=4, n_best=1)
    free, _ = search_table(table, cfg)
    assert free == [[MAN, IS, IS, IS]]
    ruled, ended = search_table(table, cfg, block_repeats=True)
    assert ruled == [[MAN, IS, STANDING]] and ended == [True]
    allowed, _ = search_table(table, cfg, block_repeats=True, repeatable_ids=(IS,))
    assert allowed == free  # an exception learnt from the captions may be doubled


def test_no_caption_ends_on_a_determiner_and_a_word_that_does_not_end_after_it() -> None:
    # "in a black" ends more likely than "in a black shirt"; "in black" may end
    table = {START: {IN: 0.9}, IN: {A: 0.9}, A: {BLACK: 0.9}, BLACK: {END: 0.7, SHIRT: 0.3}, SHIRT: {END: 0.9}}
    cfg = BeamConfig(beam_size=2, max_len=8, n_best=1)
    free, _ = search_table(table, cfg, unendable_ids=(A,))
    assert free == [[IN, A, BLACK]]
    ruled, ended = search_table(table, cfg, unendable_ids=(A,), unendable_pairs=((A, BLACK),))
    assert ruled == [[IN, A, BLACK, SHIRT]] and ended == [True]
    other_pair, _ = search_table(table, cfg, unendable_ids=(A,), unendable_pairs=((IN, BLACK),))
    assert other_pair == free  # the pair rule reads the word before, not the word alone


def test_max_len_cuts_back_past_an_unendable_pair() -> None:
    # never ends: "man in a black" at max_len 4 is cut back past "a black" and "a" to "man in"... and
    # "in" may not end either, so to "man"
    table = {START: {MAN: 0.9}, MAN: {IN: 0.9}, IN: {A: 0.9}, A: {BLACK: 0.9}, BLACK: {SHIRT: 0.9}}
    cfg = BeamConfig(beam_size=1, max_len=4, n_best=1)
    words, ended = search_table(table, cfg, unendable_ids=(A, IN), unendable_pairs=((A, BLACK),))
    assert words == [[MAN]] and ended == [False]
    kept, _ = search_table(table, cfg, unendable_ids=(A, IN))
    assert kept == [[MAN, IN, A, BLACK]]  # without the pair, "black" may end
