"""Caption text: the one normalisation function, the vocabulary, and the ending rule.

``normalize_caption`` is used by training (to build targets), evaluation (before
scoring) and captioning (to detokenise), so the three can never disagree.
:func:`learn_unendable` finds the words a caption must not stop on ("a", "of", "red"),
which the beam search then never lets ``<end>`` follow.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

PAD, START, END, UNK = "<pad>", "<start>", "<end>", "<unk>"
SPECIAL_TOKENS = (PAD, START, END, UNK)

# The ending rule learnt from training captions: a word may not end a caption when, of its
# occurrences in the second half of a caption, fewer than this share end it. The second half
# only, because a subject ("a man ...") rarely ends a caption but may well end one as an object.
ENDING_MAX_RATE = 0.03
ENDING_MIN_COUNT = 20  # second-half occurrences needed to judge a word; rarer words may end

# For model files written before the rule was stored: closed-class words that never end an
# English caption (articles, prepositions, conjunctions, auxiliaries, possessives, numbers).
FALLBACK_UNENDABLE = (
    "a",
    "an",
    "the",
    "of",
    "in",
    "on",
    "at",
    "to",
    "into",
    "onto",
    "with",
    "from",
    "for",
    "by",
    "near",
    "through",
    "across",
    "along",
    "under",
    "over",
    "behind",
    "beside",
    "between",
    "toward",
    "towards",
    "against",
    "during",
    "while",
    "whilst",
    "as",
    "and",
    "or",
    "but",
    "that",
    "who",
    "which",
    "is",
    "are",
    "was",
    "were",
    "be",
    "being",
    "has",
    "have",
    "its",
    "his",
    "her",
    "their",
    "some",
    "several",
    "each",
    "two",
    "three",
    "four",
    "five",
    "very",
    "next",
    "front",
)

_NON_WORD = re.compile(r"[^a-z0-9' ]+")
_SPACES = re.compile(r"\s+")


def normalize_caption(text: str) -> list[str]:
    """Lower-case, strip accents and punctuation, split on whitespace.

    Keeps letters, digits and apostrophes inside words ("man's"); drops tokens that
    are only apostrophes and single-letter tokens other than "a" (Flickr8k's stray
    "s" left from "man 's" is folded back onto its word).
    """
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    text = text.lower().replace("-", " ")
    text = _NON_WORD.sub(" ", text)
    words: list[str] = []
    for word in _SPACES.split(text.strip()):
        word = word.strip("'")
        if not word:
            continue
        if len(word) == 1 and word not in ("a",) and not word.isdigit():
            if word == "s" and words:
                words[-1] = words[-1] + "s"
            continue
        words.append(word)
    return words


@dataclass(frozen=True)
class Vocabulary:
    """Word <-> id mapping; ids 0..3 are ``<pad> <start> <end> <unk>``."""

    words: tuple[str, ...]

    def __post_init__(self) -> None:
        if self.words[: len(SPECIAL_TOKENS)] != SPECIAL_TOKENS:
            raise ValueError(f"vocabulary must start with {SPECIAL_TOKENS}")
        object.__setattr__(self, "_index", {w: i for i, w in enumerate(self.words)})

    @classmethod
    def build(cls, captions: Iterable[Sequence[str]], min_count: int = 5) -> Vocabulary:
        """Words seen at least ``min_count`` times, most frequent first (ties by word)."""
        counts = Counter(word for caption in captions for word in caption)
        kept = sorted(
            (w for w, c in counts.items() if c >= min_count and w not in SPECIAL_TOKENS), key=lambda w: (-counts[w], w)
        )
        return cls(SPECIAL_TOKENS + tuple(kept))

    def __len__(self) -> int:
        return len(self.words)

    @property
    def pad_id(self) -> int:
        return 0

    @property
    def start_id(self) -> int:
        return 1

    @property
    def end_id(self) -> int:
        return 2

    @property
    def unk_id(self) -> int:
        return 3

    @property
    def never_generated(self) -> tuple[int, ...]:
        """Ids no caption may contain as a word: ``<pad>``, ``<start>`` and ``<unk>``."""
        return (self.pad_id, self.start_id, self.unk_id)

    def ids_of(self, words: Iterable[str]) -> tuple[int, ...]:
        """Sorted ids of those ``words`` that are in the vocabulary (others are ignored)."""
        index = self._index  # type: ignore[attr-defined]
        return tuple(sorted({index[w] for w in words if w in index}))

    def encode(self, words: Sequence[str]) -> list[int]:
        """Word ids of ``words`` (unknown words become ``<unk>``); no start/end added."""
        index = self._index  # type: ignore[attr-defined]
        return [index.get(w, 3) for w in words]

    def decode(self, ids: Iterable[int]) -> str:
        """The caption text of ``ids``, stopping at ``<end>`` and dropping specials."""
        out = []
        for i in ids:
            i = int(i)
            if i == self.end_id:
                break
            if i < len(SPECIAL_TOKENS):
                continue
            out.append(self.words[i])
        return " ".join(out)


def learn_unendable(
    captions: Iterable[Sequence[str]], max_rate: float = ENDING_MAX_RATE, min_count: int = ENDING_MIN_COUNT
) -> tuple[str, ...]:
    """Words that (almost) never end a normalised caption, most frequent first (ties by word).

    A word qualifies when it occurs at least ``min_count`` times in the second half of a
    caption and fewer than ``max_rate`` of those occurrences are the caption's last word.
    On Flickr8k this finds articles, prepositions, conjunctions, auxiliaries, numbers and
    colour and size adjectives, and keeps the nouns that end object phrases.
    """
    late: Counter = Counter()
    ending: Counter = Counter()
    for words in captions:
        if not words:
            continue
        half = len(words) / 2
        late.update(w for i, w in enumerate(words) if i >= half)
        ending[words[-1]] += 1
    kept = [w for w, n in late.items() if n >= min_count and ending[w] < max_rate * n and w not in SPECIAL_TOKENS]
    return tuple(sorted(kept, key=lambda w: (-late[w], w)))
