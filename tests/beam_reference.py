"""The obviously-correct beam search, one image at a time, that ``batchcap.model.beam`` must match.

It follows the per-image search of the Show, Attend and Tell tutorial: Python lists of
hypotheses, ``step`` called with N = the number of live hypotheses of one image, the beam
shrinking as hypotheses finish. The rules are those of ``batchcap.model.beam``'s docstring, written
out plainly. Test and benchmark code only; never imported by the package.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from batchcap.config import BeamConfig
from batchcap.model.beam import BeamResult, State, StepFn


@dataclass
class _Hyp:
    words: list[int]
    raw: torch.Tensor  # fp32 0-d: sum of log-probabilities
    row: int  # its row in the image's current state
    logprobs: list[float]  # each word's log-probability


@dataclass
class _Done:
    words: list[int]
    score: float  # length-normalised, an fp32 value
    ended: bool
    logprobs: list[float]  # each word's, then <end>'s when it ended


def _blocked_words(words: list[int], n: int) -> set[int]:
    """Words that would complete an n-gram already in ``words`` (fairseq's rule)."""
    if n <= 0 or len(words) < n:
        return set()
    suffix = words[len(words) - n + 1 :] if n > 1 else []
    return {words[i + n - 1] for i in range(len(words) - n + 1) if words[i : i + n - 1] == suffix}


def _may_end(words: list[int], unendable: set[int], pairs: set[tuple[int, int]]) -> bool:
    """Whether ``<end>`` may follow ``words``: not after an unendable word, nor after an unendable pair."""
    if words and words[-1] in unendable:
        return False
    return not (len(words) >= 2 and (words[-2], words[-1]) in pairs)


def _cut_back(
    words: list[int], logprobs: list[float], unendable: set[int], pairs: set[tuple[int, int]]
) -> tuple[list[int], list[float]]:
    """``words`` up to its last word that may end a caption (all of it when none may)."""
    keep = max((i + 1 for i in range(len(words)) if _may_end(words[: i + 1], unendable, pairs)), default=len(words))
    return words[:keep], logprobs[:keep]


def _search_one(
    step: StepFn,
    state: State,
    cfg: BeamConfig,
    start_id: int,
    end_id: int,
    banned_ids: Sequence[int],
    unendable: set[int],
    pairs: set[tuple[int, int]],
    repeats: set[int] | None,
) -> list[_Done]:
    """One image's finished hypotheses; ``repeats`` None: any word may follow itself, else only these."""
    alpha, device = float(cfg.length_penalty), state[0].device
    live = [_Hyp([], torch.zeros((), dtype=torch.float32, device=device), 0, [])]
    open_slots = cfg.beam_size
    done: list[_Done] = []
    for t in range(cfg.max_len):
        tokens = torch.tensor([h.words[-1] if h.words else start_id for h in live], device=device)
        state = tuple(s.index_select(0, torch.tensor([h.row for h in live], device=device)) for s in state)
        log_probs, state = step(tokens, state)
        log_probs = log_probs.float().clone()  # (n_live, V)
        for i, h in enumerate(live):
            log_probs[i, list(banned_ids)] = float("-inf")
            if t < cfg.min_len or not _may_end(h.words, unendable, pairs):
                log_probs[i, end_id] = float("-inf")
            if repeats is not None and h.words and h.words[-1] not in repeats:
                log_probs[i, h.words[-1]] = float("-inf")
            for w in _blocked_words(h.words, cfg.no_repeat_ngram):
                log_probs[i, w] = float("-inf")
        vocab = log_probs.shape[1]
        cand = torch.stack([h.raw for h in live])[:, None] + log_probs  # (n_live, V)
        values, flat = cand.view(-1).topk(min(open_slots, cand.numel()))
        new_live = []
        for value, index in zip(values, flat.tolist()):
            if not torch.isfinite(value):
                continue
            h, word = live[index // vocab], index % vocab
            logprobs = h.logprobs + [float(log_probs[index // vocab, word])]
            if word == end_id:
                done.append(_Done(list(h.words), float(value / float((t + 1) ** alpha)), True, logprobs))
            else:
                new_live.append(_Hyp(h.words + [word], value, index // vocab, logprobs))
        live, open_slots = new_live, len(new_live)
        if alpha == 0.0 and len(done) >= cfg.n_best and live:
            kth = sorted((d.score for d in done), reverse=True)[cfg.n_best - 1]
            if kth >= max(float(h.raw) for h in live):
                live = []
        if not live:
            return done
    for h in live:  # still running after max_len words: finalised, cut back to a clean ending
        words, logprobs = _cut_back(h.words, h.logprobs, unendable, pairs)
        done.append(_Done(words, float(h.raw / float(cfg.max_len**alpha)), False, logprobs))
    return done


def reference_beam_search(
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
) -> BeamResult:
    """Same contract as ``batchcap.model.beam.beam_search``, one image after another."""
    batch = state[0].shape[0]
    tokens = torch.full((batch, cfg.n_best, cfg.max_len), pad_id, dtype=torch.long)
    lengths = torch.zeros((batch, cfg.n_best), dtype=torch.long)
    scores = torch.full((batch, cfg.n_best), float("-inf"))
    ended = torch.zeros((batch, cfg.n_best), dtype=torch.bool)
    token_logprobs = torch.zeros((batch, cfg.n_best, cfg.max_len + 1))
    with torch.inference_mode():
        for b in range(batch):
            done = _search_one(
                step,
                tuple(s[b : b + 1] for s in state),
                cfg,
                start_id,
                end_id,
                banned_ids,
                set(unendable_ids),
                {(int(a), int(w)) for a, w in unendable_pairs},
                set(repeatable_ids) if block_repeats else None,
            )
            best = sorted(done, key=lambda d: -d.score)[: cfg.n_best]  # stable: ties to first finished
            for j, d in enumerate(best):
                tokens[b, j, : len(d.words)] = torch.tensor(d.words, dtype=torch.long)
                lengths[b, j] = len(d.words)
                scores[b, j] = d.score
                ended[b, j] = d.ended
                token_logprobs[b, j, : len(d.logprobs)] = torch.tensor(d.logprobs)
    return BeamResult(tokens=tokens, lengths=lengths, scores=scores, ended=ended, token_logprobs=token_logprobs)
