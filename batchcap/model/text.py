"""Caption text: the one normalisation function, the vocabulary, and the ending rule.

``normalize_caption`` is used by training (to build targets), evaluation (before
scoring) and captioning (to detokenise), so the three can never disagree.
:func:`learn_unendable` finds the words a caption must not stop on ("a", "of", "red"),
which the beam search then never lets ``<end>`` follow; :func:`learn_unendable_pairs` the
words that may end a caption but not right after a determiner ("dressed in black", never
"... in a black"); :func:`learn_repeatable` the rare words a caption may say twice in a row.
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

# Words that open a noun phrase (articles, possessives, demonstratives, quantifiers): a caption
# that ends right after one of them and one more word usually stopped before the noun ("in a
# black"). Which words may not end a caption after which determiner is learnt from captions
# (:func:`learn_unendable_pairs`), with the same thresholds as the ending rule.
DETERMINERS = (
    "a",
    "an",
    "the",
    "his",
    "her",
    "their",
    "its",
    "my",
    "your",
    "our",
    "some",
    "this",
    "that",
    "these",
    "those",
    "another",
    "each",
    "every",
)

# The repetition rule's exceptions: a word may follow itself when the training captions double
# it at least this many times and in at least this share of its occurrences. Both, because
# annotators' typos double common words ("a a" 20 times in 58,957 COCO captions, 0.02 % of its
# uses) while a real doubled word is a large share of a rare word's uses ("yo yo", from
# "yo-yo": 24 of 49 in Flickr30k). Flickr8k's train captions have no word doubled 5 times.
REPEAT_MIN_COUNT = 5
REPEAT_MIN_SHARE = 0.01

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


def learn_unendable_pairs(
    captions: Iterable[Sequence[str]],
    unendable: Iterable[str] = (),
    determiners: Sequence[str] = DETERMINERS,
    max_rate: float = ENDING_MAX_RATE,
    min_count: int = ENDING_MIN_COUNT,
) -> tuple[tuple[str, str], ...]:
    """``(determiner, word)`` pairs a normalised caption (almost) never ends on, most frequent first.

    The ending rule of :func:`learn_unendable` for a word right after a determiner: a pair
    qualifies when it occurs at least ``min_count`` times with ``word`` in the second half of
    a caption and fewer than ``max_rate`` of those are the caption's end. Words of
    ``unendable`` (which may never end a caption anyway) are left out. On Flickr8k: "a black",
    "a blue", "a dirt", "the edge", ...: "black" ends "dressed in black", never "in a black".
    """
    skip = set(unendable) | set(SPECIAL_TOKENS)
    heads = set(determiners)
    late: Counter = Counter()
    ending: Counter = Counter()
    for words in captions:
        half = len(words) / 2
        for i in range(1, len(words)):
            if i >= half and words[i - 1] in heads and words[i] not in skip:
                late[words[i - 1], words[i]] += 1
        if len(words) >= 2 and words[-2] in heads:
            ending[words[-2], words[-1]] += 1
    kept = [p for p, n in late.items() if n >= min_count and ending[p] < max_rate * n]
    return tuple(sorted(kept, key=lambda p: (-late[p], p)))


def learn_repeatable(
    captions: Iterable[Sequence[str]], min_count: int = REPEAT_MIN_COUNT, min_share: float = REPEAT_MIN_SHARE
) -> tuple[str, ...]:
    """Words a normalised caption may say twice in a row ("yo yo"), most often doubled first.

    A word qualifies when it follows itself at least ``min_count`` times and in at least
    ``min_share`` of its occurrences; every other word may not follow itself in a search.
    """
    uses: Counter = Counter()
    doubled: Counter = Counter()
    for words in captions:
        uses.update(words)
        doubled.update(w for prev, w in zip(words, words[1:]) if w == prev)
    kept = [w for w, n in doubled.items() if n >= min_count and n >= min_share * uses[w] and w not in SPECIAL_TOKENS]
    return tuple(sorted(kept, key=lambda w: (-doubled[w], w)))
