"""Vectorised beam search: every image and every beam of a batch advance in one tensor step.

The search is a pure function of a ``step`` callable and its batch-first state; it does not
know it drives an LSTM. Shapes stay fixed at ``(B, K)`` from the first word to the last:
finished hypotheses move to a buffer, dead beams hold a score of ``-inf``, and the only
Python loop is over time steps (fairseq's and Hugging Face's vectorised searches; the
tutorial's per-image search, kept in ``tests/beam_reference.py``, must return the same).

Semantics, exactly (the reference implements the same rules one image at a time):

* **Slots.** Each image owns ``K`` slots. At word ``t = 0`` only beam 0 is live (the other
  ``K - 1`` copies of the start state score ``-inf``, so they never duplicate it) and all
  ``K`` slots are open. At every step the ``open`` best candidates of the image (one
  ``topk`` over ``K * V``: beam ``= flat // V``, token ``= flat % V``) are taken; a candidate
  whose score is ``-inf`` is dropped. Candidates that emit ``<end>`` are finished; the rest
  become the live beams of the next step, best first, and ``open`` becomes their number
  (the shrinking beam of Show, Attend and Tell's reference search). So an image finishes
  at most ``K`` hypotheses, each a distinct word sequence.
* **Masks.** ``banned_ids`` always score ``-inf``; ``<end>`` scores ``-inf`` while the
  hypothesis has fewer than ``min_len`` words, and right after any word of ``unendable_ids``
  (words that cannot end a caption: "a", "of", "red"; the ending rule of
  :func:`batchcap.model.text.learn_unendable`), and right after a pair of
  ``unendable_pairs`` (a determiner and a word that may end a caption, but not after it:
  "... in a black"; :func:`batchcap.model.text.learn_unendable_pairs`); with
  ``block_repeats`` a word may not follow itself unless it is one of ``repeatable_ids``
  (never "a a", "is is"; ``<start>`` is no word); with ``no_repeat_ngram = N > 0`` a word
  that would complete an N-gram already present in the hypothesis' words scores ``-inf``
  (fairseq's rule; ``<start>`` and ``<end>`` are not words).
* **Scores.** A hypothesis' raw score is the fp32 sum of its log-probabilities. One that
  emits ``<end>`` after ``L`` words has length ``L + 1`` (``<end>`` counts); one still live
  after ``max_len`` words is finalised, length ``max_len``, so every image gets a caption.
  Its score is ``raw / length ** length_penalty``.
* **Clean ending at max_len.** A finalised hypothesis whose last word may not end a caption
  (a word of ``unendable_ids``, or the second word of a pair of ``unendable_pairs`` right
  after the first) is cut back to its last word that may (kept whole when it has none); it
  keeps the score the search ranked it by (that of all its ``max_len`` words), so a
  hypothesis that did end with ``<end>`` ranks above it whenever it scores higher, and the
  list stays ordered by score. A cut caption may repeat a shorter one's words.
* **Token log-probabilities.** ``token_logprobs[b, j, i]`` is the log-probability of word
  ``i`` of the caption and, at ``i = length`` when it ended, of ``<end>``; 0 beyond.
* **Early stop** (only with ``length_penalty == 0``, where a live score can only fall): an
  image stops once it holds ``n_best`` finished hypotheses and the ``n_best``-th best of
  them scores ``>=`` its best live beam. This never changes the result.
* **Order.** The ``n_best`` best finished hypotheses by score, ties to the one finished
  first (earlier step, then better candidate rank; finalised ones last, in beam order).
  Missing ones (only when fewer than ``n_best`` candidates were ever finite) have score
  ``-inf`` and length 0.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from batchcap.config import BeamConfig

# The step function's state: a tuple of batch-first tensors (N, ...), reordered blindly.
State = tuple[torch.Tensor, ...]
StepFn = Callable[[torch.Tensor, State], tuple[torch.Tensor, State]]

_NEG_INF = float("-inf")


@dataclass(frozen=True)
class BeamResult:
    """The ``n_best`` captions of each image, best first.

    ``tokens`` holds word ids padded with ``pad_id`` after the caption (``<end>`` not
    included); ``lengths`` counts words; ``scores`` are length-normalised fp32
    log-probabilities, what the search ranked by; ``ended`` is False for a caption stopped at
    ``max_len``; ``token_logprobs`` are the log-probabilities of the caption's words (and of
    ``<end>`` after them when it ended), 0-padded.
    """

    tokens: torch.Tensor  # long (B, n_best, max_len)
    lengths: torch.Tensor  # long (B, n_best)
    scores: torch.Tensor  # float32 (B, n_best)
    ended: torch.Tensor  # bool (B, n_best)
    token_logprobs: torch.Tensor | None = None  # float32 (B, n_best, max_len + 1)


def _ngram_blocked(words: torch.Tensor, t: int, n: int, vocab: int) -> torch.Tensor:
    """Bool ``(N, V)``: tokens that would repeat an n-gram of ``words[:, :t]`` (needs t >= n)."""
    hist = words[:, :t]  # (N, t)
    windows = hist.unfold(1, n, 1)  # (N, t-n+1, n) every complete n-gram
    if n > 1:
        suffix = hist[:, t - n + 1 :]  # (N, n-1) the words the next one would follow
        match = (windows[:, :, : n - 1] == suffix[:, None, :]).all(-1)  # (N, t-n+1)
    else:
        match = torch.ones(windows.shape[:2], dtype=torch.bool, device=words.device)
    hits = torch.zeros(words.shape[0], vocab, device=words.device)  # (N, V)
    hits.scatter_add_(1, windows[:, :, n - 1], match.float())  # duplicates add, never overwrite
    return hits > 0


@torch.inference_mode()
def beam_search(
    step: StepFn,
    state: State,
    cfg: BeamConfig,
    *,
    start_id: int,
    end_id: int,
    pad_id: int = 0,
    banned_ids: Sequence[int] = (),
    unendable_ids: Sequence[int] = (),
    unendable_pairs: Sequence[tuple[int, int]] = (),
    block_repeats: bool = False,
    repeatable_ids: Sequence[int] = (),
    per_image: Sequence[bool] = (),
    sync_every: int | None = None,
) -> BeamResult:
    """Search ``cfg.beam_size`` beams for each of the ``B`` rows of ``state`` at once.

    ``step(tokens (N,), state) -> (log_probs (N, V), state)`` advances N hypotheses by one
    word; it is called with ``N = B * K``. State tensors that ``step`` returns unchanged (the
    very same object, e.g. the encoder memory) are identical across an image's beams and
    are never reordered. Everything runs on the device of ``state[0]``; scores are fp32
    even when ``step`` runs under autocast. See the module docstring for the exact rules.

    ``per_image[j]`` marks state tensor ``j`` as one row per image, shared by its K beams (the
    decoder's encoder memory and attention keys): it is passed to ``step`` as ``(B, ...)``,
    never copied K times and never reordered, so ``step`` must return it unchanged and cope
    with ``N = B * K`` hypotheses over ``B`` images. ``sync_every`` is how many words pass
    between checks of whether every image has finished (a device-to-host sync); the result
    is the same for any value, since words after the end change nothing. Default: every word
    on CPU, where the check is free, every 4 on an accelerator.

    One function on purpose: the word loop's steps (score, block, rank, reorder, finish) share a
    dozen ``(B, K)`` tensors, and read inline, with a shape comment on each line, they can be
    checked against the per-image reference search (``tests/beam_reference.py``) line by line;
    split into helpers they would pass those tensors back and forth on every word.
    """
    K, T, n_best = cfg.beam_size, cfg.max_len, cfg.n_best
    alpha, min_len, ngram = float(cfg.length_penalty), cfg.min_len, cfg.no_repeat_ngram
    device = state[0].device
    B = state[0].shape[0]
    BK = B * K
    long: dict[str, Any] = {"dtype": torch.long, "device": device}

    shared = tuple(per_image) + (False,) * (len(state) - len(per_image))
    state = tuple(s if keep else s.repeat_interleave(K, dim=0) for s, keep in zip(state, shared))  # (B*K, ...)
    if sync_every is None:
        sync_every = 1 if device.type == "cpu" else 4
    offsets = torch.arange(B, **long)[:, None] * K  # (B, 1) first row of each image
    rank = torch.arange(K, **long)[None, :]  # (1, K)
    beam_scores = torch.full((B, K), _NEG_INF, device=device)  # (B, K) raw sums; -inf = dead
    beam_scores[:, 0] = 0.0
    words = torch.full((B, K, T), pad_id, **long)  # (B, K, T) live hypotheses' words
    word_lp = torch.zeros((B, K, T + 1), device=device)  # (B, K, T+1) their tokens' log-probs
    n_open = torch.full((B,), K, **long)  # (B,) candidates to take next step
    last = torch.full((BK,), start_id, **long)  # (B*K,) token fed to step

    # Finished buffer: K slots per image plus a dump slot K for scatters of non-finishers.
    fin_words = torch.full((B, K + 1, T), pad_id, **long)  # (B, K+1, T)
    fin_len = torch.zeros((B, K + 1), **long)  # (B, K+1) words
    fin_score = torch.full((B, K + 1), _NEG_INF, device=device)  # (B, K+1) normalised
    fin_ended = torch.zeros((B, K + 1), dtype=torch.bool, device=device)  # (B, K+1)
    fin_lp = torch.zeros((B, K + 1, T + 1), device=device)  # (B, K+1, T+1)
    n_fin = torch.zeros((B,), **long)  # (B,) finished so far = next free slot

    # (first, second) pairs as the keys first * V + second, known once V is (at t == 0)
    pair_keys = repeatable = None
    base_mask = end_mask = unendable = None
    all_done = False
    for t in range(T):
        log_probs, new_state = step(last, state)
        log_probs = log_probs.float()  # (B*K, V) fp32 whatever the step's precision
        V = log_probs.shape[1]
        if base_mask is None:
            base_mask = torch.zeros(V, device=device)  # (V,) 0 or -inf
            if len(banned_ids):
                base_mask[torch.tensor(list(banned_ids), **long)] = _NEG_INF
            end_mask = base_mask.clone()
            end_mask[end_id] = _NEG_INF
            unendable = torch.zeros(V, dtype=torch.bool, device=device)  # (V,)
            if len(unendable_ids):
                unendable[torch.tensor(list(unendable_ids), **long)] = True
            pair_keys = torch.tensor([a * V + b for a, b in unendable_pairs], **long)  # (P,)
            repeatable = torch.zeros(V, dtype=torch.bool, device=device)  # (V,)
            if len(repeatable_ids):
                repeatable[torch.tensor(list(repeatable_ids), **long)] = True
        assert base_mask is not None and end_mask is not None and unendable is not None  # built at t == 0
        assert pair_keys is not None and repeatable is not None
        log_probs = log_probs + (end_mask if t < min_len else base_mask)  # (B*K, V)
        if t > 0 and len(unendable_ids):
            log_probs[:, end_id] = log_probs[:, end_id].masked_fill(unendable[last], _NEG_INF)
        if t > 1 and len(unendable_pairs):
            before = words.reshape(BK, T)[:, t - 2]  # (B*K,) the word before the last
            log_probs[:, end_id] = log_probs[:, end_id].masked_fill(torch.isin(before * V + last, pair_keys), _NEG_INF)
        if block_repeats and t > 0:
            rows = torch.arange(BK, device=device)  # (B*K,)
            again = log_probs[rows, last].masked_fill(~repeatable[last], _NEG_INF)  # (B*K,) the last word again
            log_probs[rows, last] = again
        if ngram and t >= ngram:
            blocked = _ngram_blocked(words.reshape(BK, T), t, ngram, V)  # (B*K, V)
            log_probs = log_probs.masked_fill(blocked, _NEG_INF)

        cand = beam_scores.reshape(BK, 1) + log_probs  # (B*K, V) raw score of every extension
        top, flat = cand.view(B, K * V).topk(K, dim=1)  # (B, K) best first
        beam = torch.div(flat, V, rounding_mode="floor")  # (B, K) source beam
        token = flat % V  # (B, K) word
        take = (rank < n_open[:, None]) & torch.isfinite(top)  # (B, K)
        ended = take & (token == end_id)  # (B, K)
        live = take & ~ended  # (B, K)

        src = offsets + beam  # (B, K) flat row of the source beam
        cand_words = words.reshape(BK, T).index_select(0, src.view(-1)).view(B, K, T)  # (B, K, T)
        cand_lp = word_lp.reshape(BK, T + 1).index_select(0, src.view(-1)).view(B, K, T + 1)
        cand_lp[:, :, t] = log_probs.view(B, K * V).gather(1, flat)  # (B, K) the chosen token's

        # finished: slot n_fin + (order among this step's finishers); others go to the dump
        fin_pos = torch.where(ended, n_fin[:, None] + ended.cumsum(1) - 1, K)  # (B, K)
        fin_words.scatter_(1, fin_pos[:, :, None].expand(B, K, T), cand_words)
        fin_len.scatter_(1, fin_pos, torch.full_like(fin_pos, t))
        fin_score.scatter_(1, fin_pos, top / float((t + 1) ** alpha))
        fin_ended.scatter_(1, fin_pos, ended)
        fin_lp.scatter_(1, fin_pos[:, :, None].expand(B, K, T + 1), cand_lp)
        n_fin = n_fin + ended.sum(1)

        # live: compacted to the front, best first; dead slots read beam 0 of their image
        cand_words[:, :, t] = token
        live_pos = torch.where(live, live.cumsum(1) - 1, K)  # (B, K)
        new_scores = torch.full((B, K + 1), _NEG_INF, device=device)
        beam_scores = new_scores.scatter_(1, live_pos, top)[:, :K]  # (B, K)
        new_words = torch.full((B, K + 1, T), pad_id, **long)
        words = new_words.scatter_(1, live_pos[:, :, None].expand(B, K, T), cand_words)[:, :K]
        new_lp = torch.zeros((B, K + 1, T + 1), device=device)
        word_lp = new_lp.scatter_(1, live_pos[:, :, None].expand(B, K, T + 1), cand_lp)[:, :K]
        new_src = offsets.expand(B, K + 1).clone()
        reorder = new_src.scatter_(1, live_pos, src)[:, :K].reshape(BK)  # (B*K,)
        new_last = torch.full((B, K + 1), pad_id, **long)
        last = new_last.scatter_(1, live_pos, token)[:, :K].reshape(BK)  # (B*K,)
        n_open = live.sum(1)  # (B,)

        if alpha == 0.0:
            kth = fin_score[:, :K].topk(n_best, dim=1).values[:, -1]  # (B,)
            stop = (n_fin >= n_best) & (kth >= beam_scores.max(1).values)  # (B,)
            n_open = torch.where(stop, 0, n_open)
            beam_scores = beam_scores.masked_fill(stop[:, None], _NEG_INF)

        if (t + 1) % sync_every == 0 and not bool((n_open > 0).any()):
            all_done = True
            break
        if any(keep and new is not old for old, new, keep in zip(state, new_state, shared)):
            raise ValueError("step changed a per_image state tensor; it must return it unchanged")
        state = tuple(old if new is old else new.index_select(0, reorder) for old, new in zip(state, new_state))

    if not all_done:  # finalise beams still live after max_len words, in beam order
        alive = torch.isfinite(beam_scores)  # (B, K); dead beams are exactly the -inf ones
        fin_pos = torch.where(alive, n_fin[:, None] + alive.cumsum(1) - 1, K)
        lengths = torch.full_like(fin_pos, T)  # (B, K)
        if (len(unendable_ids) or len(unendable_pairs)) and unendable is not None:  # cut back to a clean word
            clean = ~unendable[words]  # (B, K, T)
            if len(unendable_pairs) and pair_keys is not None and T > 1:
                V = unendable.shape[0]
                bad_pair = torch.isin(words[:, :, :-1] * V + words[:, :, 1:], pair_keys)  # (B, K, T-1)
                clean[:, :, 1:] &= ~bad_pair
            last_clean = (clean * torch.arange(1, T + 1, **long)).amax(2)  # (B, K) 0 = none
            lengths = torch.where(last_clean > 0, last_clean, T)
            kept = torch.arange(T, **long)[None, None, :] < lengths[:, :, None]  # (B, K, T)
            words = words.masked_fill(~kept, pad_id)
            word_lp[:, :, :T] = word_lp[:, :, :T].masked_fill(~kept, 0.0)
        fin_words.scatter_(1, fin_pos[:, :, None].expand(B, K, T), words)
        fin_len.scatter_(1, fin_pos, lengths)
        fin_score.scatter_(1, fin_pos, beam_scores / float(T**alpha))
        fin_ended.scatter_(1, fin_pos, torch.zeros_like(alive))
        fin_lp.scatter_(1, fin_pos[:, :, None].expand(B, K, T + 1), word_lp)

    order = torch.sort(fin_score[:, :K], dim=1, descending=True, stable=True).indices[:, :n_best]
    return BeamResult(
        tokens=fin_words.gather(1, order[:, :, None].expand(B, n_best, T)),
        lengths=fin_len.gather(1, order),
        scores=fin_score.gather(1, order),
        ended=fin_ended.gather(1, order),
        token_logprobs=fin_lp.gather(1, order[:, :, None].expand(B, n_best, T + 1)),
    )


def token_logprobs_mean(result: BeamResult) -> torch.Tensor:
    """Mean log-probability of the tokens each caption shows (its words, and ``<end>`` when it ended).

    This is the output's ``logprob`` column (what schema version 1 called ``score``, except
    that a caption cut back to a clean word at ``max_len`` no longer counts its dropped words).
    """
    assert result.token_logprobs is not None
    tokens = (result.lengths + result.ended.long()).clamp(min=1).float()  # (B, n)
    return result.token_logprobs.float().sum(2) / tokens
