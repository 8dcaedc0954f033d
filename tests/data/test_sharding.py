"""Sharding as a pure function: disjoint, complete, stable when the input grows."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from batchcap.data.sharding import ShardError, in_shard, parse_shard, resolve_shard, select, shard_of

ids = st.lists(st.text(min_size=1, max_size=30), max_size=60, unique=True)
counts = st.integers(min_value=1, max_value=12)


@settings(max_examples=150, deadline=None)
@given(ids, counts)
def test_shards_are_disjoint_and_complete(keys: list[str], count: int) -> None:
    parts = [list(select(keys, i, count)) for i in range(count)]
    flat = [k for part in parts for k in part]
    assert sorted(flat) == sorted(keys)  # complete, and no key twice: disjoint
    for part in parts:  # each shard keeps the input order
        assert part == [k for k in keys if k in set(part)]


@settings(max_examples=150, deadline=None)
@given(ids, ids, counts)
def test_assignment_is_stable_when_the_input_grows(old: list[str], new: list[str], count: int) -> None:
    grown = old + [k for k in new if k not in set(old)]
    for i in range(count):
        assert list(select(old, i, count)) == [k for k in select(grown, i, count) if k in set(old)]


@given(st.text(max_size=40), counts)
def test_shard_of_is_pure_and_in_range(key: str, count: int) -> None:
    assert 0 <= shard_of(key, count) < count
    assert shard_of(key, count) == shard_of(key, count)
    assert in_shard(key, shard_of(key, count), count)


def test_known_values_do_not_drift() -> None:
    # a change here would reassign every input of a running multi-job collection
    assert [shard_of(f"img{i}.jpg", 7) for i in range(8)] == [5, 4, 4, 6, 0, 4, 1, 5]
    assert shard_of("a/b.jpg", 1) == 0
    assert shard_of("", 5) == 1


def test_roughly_balanced() -> None:
    sizes = [sum(1 for _ in select((f"photo_{i:06d}.jpg" for i in range(4000)), s, 4)) for s in range(4)]
    assert min(sizes) > 900


def test_parse_shard() -> None:
    assert parse_shard("0/1") == (0, 1)
    assert parse_shard(" 3/4 ") == (3, 4)
    for bad in ("3/2", "4/4", "-1/4", "1", "a/b", "1/0", "1/2/3", ""):
        with pytest.raises(ShardError):
            parse_shard(bad)


def test_resolve_shard_prefers_the_option_then_slurm() -> None:
    slurm = {"SLURM_ARRAY_TASK_ID": "2", "SLURM_ARRAY_TASK_COUNT": "5"}
    assert resolve_shard(None, {}) == (0, 1)
    assert resolve_shard("1/3", slurm) == (1, 3)
    assert resolve_shard(None, slurm) == (2, 5)
    assert resolve_shard(None, {**slurm, "SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_MIN": "1"}) == (2, 5)
    assert resolve_shard(
        None,
        {
            "SLURM_ARRAY_TASK_ID": "4",
            "SLURM_ARRAY_TASK_COUNT": "3",
            "SLURM_ARRAY_TASK_MIN": "0",
            "SLURM_ARRAY_TASK_STEP": "2",
        },
    ) == (2, 3)
    for env in (
        {"SLURM_ARRAY_TASK_ID": "7", "SLURM_ARRAY_TASK_COUNT": "5"},
        {"SLURM_ARRAY_TASK_ID": "x", "SLURM_ARRAY_TASK_COUNT": "5"},
        {"SLURM_ARRAY_TASK_ID": "1"},
    ):
        with pytest.raises(ShardError):
            resolve_shard(None, env)
    with pytest.raises(ShardError):
        resolve_shard("3/2", {})
