"""CIDEr-D (Vedantam et al., 2015), as the COCO toolkit computes it: a reward in self-critical training,
and the neighbours' consensus at caption time.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence


def ngrams(words: Sequence[str], n: int = 4) -> Iterator[tuple[str, ...]]:
    """Every 1..n-gram of ``words``, repeats included."""
    for k in range(1, n + 1):
        for i in range(len(words) - k + 1):
            yield tuple(words[i : i + k])


def ngram_counts(words: Sequence[str], n: int = 4) -> Counter:
    """Counts of every 1..n-gram of ``words``."""
    return Counter(ngrams(words, n))


class CiderD:
    """CIDEr-D (Vedantam et al., 2015, as in the COCO caption toolkit) with fixed document frequencies.

    ``corpus`` gives each image's reference captions as word lists; an n-gram's document
    frequency is the number of images whose references contain it. Scores are on the
    toolkit's scale (x10), so a caption identical to all its references scores about 10.
    """

    def __init__(self, corpus: Iterable[Sequence[Sequence[str]]], n: int = 4, sigma: float = 6.0) -> None:
        self.n, self.sigma = n, sigma
        # An n-gram's document frequency: the images whose references contain it. One set per image,
        # not per-caption Counters: a model's 30,000 neighbour captions are counted at every start-up.
        self.document_frequency: Counter[NGram] = Counter()
        images = 0
        for refs in corpus:
            images += 1
            self.document_frequency.update({g for ref in refs for g in ngrams(ref, n)})
        if images == 0:
            raise ValueError("CIDEr-D needs at least one image's references for its document frequencies")
        self.log_images = math.log(float(images))

    def vector(self, words: Sequence[str]) -> Vector:
        """tf-idf vectors of one caption; ``length`` counts bigrams, as the toolkit (only deltas matter)."""
        vec: list[dict[NGram, float]] = [{} for _ in range(self.n)]
        norm = [0.0] * self.n
        length = 0
        for ngram, tf in ngram_counts(words, self.n).items():
            order = len(ngram) - 1
            df = math.log(max(1.0, self.document_frequency.get(ngram, 0.0)))
            weight = float(tf) * (self.log_images - df)
            vec[order][ngram] = weight
            norm[order] += weight * weight
            if order == 1:
                length += tf
        return vec, [math.sqrt(x) for x in norm], length

    def prepare(self, references: Sequence[Sequence[str]]) -> list[Vector]:
        """An image's reference vectors, computed once and reused for every candidate."""
        return [self.vector(ref) for ref in references]

    def score(self, words: Sequence[str], references: list[Vector]) -> float:
        """CIDEr-D of one candidate against prepared references."""
        return self._score(self.vector(words), references) if references else 0.0

    def score_each(self, words: Sequence[str], groups: Sequence[list[Vector]]) -> list[float]:
        """:meth:`score` of one candidate against each group of prepared references, vectorising it once."""
        hypothesis = self.vector(words)
        return [self._score(hypothesis, references) if references else 0.0 for references in groups]

    def _score(self, hypothesis: Vector, references: list[Vector]) -> float:
        hyp_vec, hyp_norm, hyp_len = hypothesis
        total = 0.0
        for ref_vec, ref_norm, ref_len in references:
            penalty = math.exp(-((hyp_len - ref_len) ** 2) / (2 * self.sigma**2))
            for order in range(self.n):
                refs = ref_vec[order]
                value = 0.0
                for ngram, weight in hyp_vec[order].items():
                    ref_weight = refs.get(ngram)
                    if ref_weight is not None:
                        value += min(weight, ref_weight) * ref_weight
                if hyp_norm[order] != 0 and ref_norm[order] != 0:
                    value /= hyp_norm[order] * ref_norm[order]
                total += value * penalty
        return total / self.n / len(references) * 10.0


NGram = tuple[str, ...]


# One caption as CIDEr-D sees it: per n-gram order, its tf-idf weights; their norms; its length.
Vector = tuple[list[dict[NGram, float]], list[float], int]
