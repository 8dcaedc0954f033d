"""batchcap.model.text: caption normalisation, the vocabulary, and the learnt ending rule."""

from __future__ import annotations

import pytest
import torch

from batchcap.model.text import (
    END,
    PAD,
    SPECIAL_TOKENS,
    START,
    UNK,
    Vocabulary,
    learn_repeatable,
    learn_unendable,
    learn_unendable_pairs,
    normalize_caption,
)


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("A dog runs on the grass .", ["a", "dog", "runs", "on", "the", "grass"]),
        ("  A   DOG\truns\n", ["a", "dog", "runs"]),
        ("Two dogs, playing; happily!", ["two", "dogs", "playing", "happily"]),
        ("a black-and-white dog", ["a", "black", "and", "white", "dog"]),
        ("the man's hat", ["the", "man's", "hat"]),
        ("the man 's hat", ["the", "mans", "hat"]),  # Flickr8k's split possessive, folded back
        ("'quoted' words ''", ["quoted", "words"]),
        ("a café crème", ["a", "cafe", "creme"]),
        ("3 dogs and 1 cat", ["3", "dogs", "and", "1", "cat"]),
        ("a b c dog", ["a", "dog"]),  # single letters other than "a" are dropped
        ("s dog", ["dog"]),  # a stray "s" with nothing before it is dropped
        ("", []),
        ("... !!!", []),
    ],
)
def test_normalize_caption(text: str, words: list[str]) -> None:
    assert normalize_caption(text) == words


def test_normalize_caption_is_idempotent() -> None:
    for text in ["A man's dog, in the snow!", "Children play at the beach ."]:
        once = normalize_caption(text)
        assert normalize_caption(" ".join(once)) == once


def test_vocabulary_starts_with_the_special_tokens() -> None:
    vocab = Vocabulary(SPECIAL_TOKENS + ("dog",))
    assert (vocab.pad_id, vocab.start_id, vocab.end_id, vocab.unk_id) == (0, 1, 2, 3)
    assert [vocab.words[i] for i in (0, 1, 2, 3)] == [PAD, START, END, UNK]
    assert set(vocab.never_generated) == {vocab.pad_id, vocab.start_id, vocab.unk_id}
    assert vocab.end_id not in vocab.never_generated
    with pytest.raises(ValueError):
        Vocabulary(("dog", "cat"))
    with pytest.raises(ValueError):
        Vocabulary((START, PAD, END, UNK, "dog"))


def test_build_keeps_words_seen_min_count_times_most_frequent_first() -> None:
    captions = [["a", "dog"], ["a", "cat"], ["a", "dog", "runs"], ["the", "cat"], ["a", "bird"]]
    vocab = Vocabulary.build(captions, min_count=2)
    assert vocab.words == SPECIAL_TOKENS + ("a", "cat", "dog")  # a: 4; cat, dog: 2 each, ties by word
    assert len(vocab) == 7
    assert Vocabulary.build(captions, min_count=1).words[4:] == ("a", "cat", "dog", "bird", "runs", "the")
    assert Vocabulary.build(captions, min_count=5).words == SPECIAL_TOKENS


def test_build_never_duplicates_a_special_token_found_in_captions() -> None:
    vocab = Vocabulary.build([["<end>", "dog"]] * 5, min_count=1)
    assert vocab.words == SPECIAL_TOKENS + ("dog",)


def test_encode_decode_round_trip_and_unknown_words() -> None:
    vocab = Vocabulary.build([["a", "dog", "runs", "on", "grass"]] * 3, min_count=1)
    words = ["a", "dog", "runs", "on", "grass"]
    ids = vocab.encode(words)
    assert all(i >= len(SPECIAL_TOKENS) for i in ids)
    assert vocab.decode(ids) == "a dog runs on grass"
    assert vocab.encode(["a", "zebra"]) == [vocab.encode(["a"])[0], vocab.unk_id]
    assert vocab.decode(vocab.encode(["a", "zebra", "runs"])) == "a runs"  # <unk> is dropped when decoding


def test_decode_stops_at_end_and_drops_specials() -> None:
    vocab = Vocabulary(SPECIAL_TOKENS + ("a", "dog"))
    a, dog = 4, 5
    assert vocab.decode([vocab.start_id, a, vocab.pad_id, dog, vocab.end_id, a, dog]) == "a dog"
    assert vocab.decode([vocab.end_id, a]) == ""
    assert vocab.decode(torch.tensor([a, dog, vocab.end_id])) == "a dog"  # tensors of ids too


def test_ids_of_is_sorted_and_skips_unknown_words() -> None:
    vocab = Vocabulary(SPECIAL_TOKENS + ("a", "dog", "the"))
    assert vocab.ids_of(["the", "zebra", "a", "the"]) == (4, 6)
    assert vocab.ids_of([]) == ()


def test_learn_unendable_finds_words_that_never_end_a_caption() -> None:
    captions = [["a", "dog", "runs", "in", "the", "park"]] * 30 + [["a", "cat", "sits", "on", "a", "mat"]] * 30
    words = learn_unendable(captions, max_rate=0.03, min_count=20)
    # Second half of each caption: "in the park" and "on a mat"; park and mat always end.
    assert words == ("a", "in", "on", "the")  # 30 late occurrences each: ties by word


def test_learn_unendable_counts_only_the_second_half_and_needs_min_count() -> None:
    captions = [["man", "with", "a", "dog"]] * 25
    # "man" never ends, but only ever appears in the first half: it is not judged
    assert learn_unendable(captions, min_count=20) == ("a",)
    assert learn_unendable(captions, min_count=26) == ()


def test_learn_unendable_respects_max_rate_and_orders_by_frequency() -> None:
    ends_sometimes = [["x", "y", "dog", "runs"]] * 19 + [["x", "y", "z", "dog"]]  # dog ends 1 in 20
    assert "dog" not in learn_unendable(ends_sometimes, max_rate=0.03, min_count=20)
    assert "dog" in learn_unendable(ends_sometimes, max_rate=0.06, min_count=20)
    many = [["p", "q", "r", "the", "on", "end"]] * 40 + [["p", "q", "r", "s", "on", "end"]] * 10
    assert learn_unendable(many, min_count=20) == ("on", "the")  # on: 50 late, the: 40 late
    assert learn_unendable([[], ["<end>"] * 4] * 30, min_count=1) == ()


def test_learn_unendable_pairs_finds_words_that_end_a_caption_but_not_after_a_determiner() -> None:
    # "black" ends "dressed in black" but never "... in a black"; "a shirt" ends captions
    captions = (
        [["a", "man", "dressed", "in", "black"]] * 30
        + [["a", "man", "in", "a", "black", "shirt"]] * 30
        + [["a", "boy", "wearing", "a", "shirt"]] * 30
    )
    assert learn_unendable_pairs(captions, min_count=20) == (("a", "black"),)
    # a word that may never end a caption is the ending rule's, not a pair's
    assert learn_unendable_pairs(captions, unendable=("black",), min_count=20) == ()
    # any word list may open pairs: after "in", "black" ends every caption, "a" none
    assert learn_unendable_pairs(captions, determiners=("in",), min_count=20) == (("in", "a"),)


def test_learn_unendable_pairs_counts_the_second_half_respects_max_rate_and_orders() -> None:
    early = [["the", "dog", "runs", "far", "away", "now"]] * 30  # "the dog" only in the first half
    assert learn_unendable_pairs(early, min_count=20) == ()
    sometimes = [["x", "y", "the", "dog", "runs"]] * 19 + [["x", "y", "z", "the", "dog"]]  # ends 1 in 20
    assert learn_unendable_pairs(sometimes, max_rate=0.03, min_count=20) == ()
    assert learn_unendable_pairs(sometimes, max_rate=0.06, min_count=20) == (("the", "dog"),)
    many = [["p", "q", "in", "his", "red", "car"]] * 40 + [["p", "q", "on", "a", "blue", "car"]] * 25
    assert learn_unendable_pairs(many, min_count=20) == (("his", "red"), ("a", "blue"))
    assert learn_unendable_pairs(many, min_count=30) == (("his", "red"),)


def test_learn_repeatable_needs_both_a_count_and_a_share_of_the_words_uses() -> None:
    yoyo = [["a", "girl", "plays", "with", "a", "yo", "yo"]] * 5
    typos = [["a", "a", "dog", "runs"]] * 6 + [["a", "cat", "on", "a", "mat"]] * 400
    assert learn_repeatable(yoyo + typos) == ("yo",)  # "a a" 6 times, but 0.7 % of 811 uses of "a"
    assert learn_repeatable(yoyo + typos, min_share=0.005) == ("a", "yo")  # more often doubled first
    assert learn_repeatable(yoyo, min_count=6) == ()
    assert learn_repeatable([["<unk>", "<unk>"]] * 10) == ()


def test_the_word_rules_learnt_from_flickr8k_train_captions() -> None:
    from conftest import shared_path

    from batchcap.data.captions.flickr8k import load_flickr8k

    train = load_flickr8k(str(shared_path("data", "flickr8k"))).splits["train"]
    captions = [normalize_caption(c) for r in train for c in r.captions]
    unendable = learn_unendable(captions)
    pairs = learn_unendable_pairs(captions, unendable)
    # "black" may end a caption ("dressed in black"), but not right after "a"
    assert "black" not in unendable and ("a", "black") in pairs and ("the", "edge") in pairs
    assert not {w for _, w in pairs} & set(unendable) and {d for d, _ in pairs} <= {"a", "an", "the"}
    assert 10 <= len(pairs) <= 60
    assert learn_repeatable(captions) == ()  # no word is doubled 5 times in Flickr8k's train captions
