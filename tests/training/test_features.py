"""The training feature cache: chunked, resumable, keyed by what made the features."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest
import torch
from conftest import write_images

from batchcap.config import Preprocess, RuntimeConfig
from batchcap.training.feature_cache import (
    FeatureCache,
    FeatureKey,
    FeatureSpaceError,
    available_memory_bytes,
    feature_memory_budget,
    is_file_backed,
)

PRE = Preprocess(input_size=(3, 32, 32), resize="squash", interpolation="bilinear")
RUNTIME = RuntimeConfig(precision="fp32", batch_size=2, workers=0, channels_last=False)


def channel_means(images: torch.Tensor) -> torch.Tensor:
    """A stand-in encoder: one 'region' holding the mean of each colour channel."""
    return images.float().mean(dim=(2, 3))[:, None, :]  # (B, 1, 3)


def test_extract_resumes_and_load_returns_rows_in_the_asked_order(tmp_path: Path) -> None:
    paths = write_images(tmp_path / "p", 5)
    (tmp_path / "p" / "bad.jpg").write_text("not a picture")
    items = [(p.name, str(p)) for p in paths] + [("bad.jpg", str(tmp_path / "p" / "bad.jpg"))]
    cache = FeatureCache(tmp_path / "cache", FeatureKey("x", "w", PRE, True, "fp32"))
    calls = []

    def encoder(images: torch.Tensor) -> torch.Tensor:
        calls.append(len(images))
        return channel_means(images)

    failures = cache.extract(items[:3], encoder, RUNTIME, chunk_size=2)
    assert failures == {} and len(cache.chunks()) == 2
    failures = cache.extract(items, encoder, RUNTIME, chunk_size=2)  # only the rest is computed
    assert sum(calls) == 5 and set(failures) == {"bad.jpg"}
    assert failures["bad.jpg"].startswith("unsupported:")  # the run's decode stage named it
    assert cache.cached_ids() == {p.name for p in paths}
    wanted = [paths[4].name, paths[0].name, paths[2].name]
    ids, feats = cache.load(wanted)
    assert ids == wanted and feats.shape == (3, 1, 3) and feats.dtype == torch.float16
    _, everything = cache.load()
    order = [i for chunk in cache.chunks() for i in cache._chunk_ids(chunk)]
    for row, image_id in enumerate(wanted):
        assert torch.equal(feats[row], everything[order.index(image_id)])


def test_a_change_in_what_makes_features_gives_a_new_cache(tmp_path: Path) -> None:
    key = FeatureKey("legacy_xception", "abc", PRE, True, "bf16")
    variants = [
        dataclasses.replace(key, weights="abd"),
        dataclasses.replace(key, precision="fp32"),
        dataclasses.replace(key, view="hflip"),
        dataclasses.replace(key, preprocess=dataclasses.replace(PRE, resize="crop")),
    ]
    digests = {key.digest()} | {v.digest() for v in variants}
    assert len(digests) == 5
    assert FeatureCache(tmp_path, key).dir != FeatureCache(tmp_path, variants[0]).dir


def test_a_split_over_the_memory_budget_is_file_backed_equal_and_leaves_no_file(tmp_path: Path) -> None:
    paths = write_images(tmp_path / "p", 7)
    cache = FeatureCache(tmp_path / "cache", FeatureKey("x", "w", PRE, True, "fp32"))
    cache.extract([(p.name, str(p)) for p in paths], channel_means, RUNTIME, chunk_size=3)
    wanted = [paths[i].name for i in (6, 1, 3, 0)]
    _, held = cache.load(wanted, memory_budget=float("inf"))
    _, mapped = cache.load(wanted, memory_budget=0)
    assert not is_file_backed(held) and is_file_backed(mapped)
    assert mapped.shape == held.shape and mapped.dtype == torch.float16 and torch.equal(mapped, held)
    assert torch.equal(mapped[torch.tensor([2, 0])], held[torch.tensor([2, 0])])  # as training gathers rows
    assert not [n for n in os.listdir(cache.dir) if n.startswith(".split-")]  # unlinked at once
    # the budget is the split's size: one row over it maps, at it stays in memory
    row = held[:1].nbytes
    assert is_file_backed(cache.load(wanted, memory_budget=4 * row - 1)[1])
    assert not is_file_backed(cache.load(wanted, memory_budget=4 * row)[1])


def test_the_feature_memory_budget_reads_the_environment_and_refuses_nonsense() -> None:
    assert feature_memory_budget({"BATCHCAP_FEATURE_MEMORY_GIB": "0"}) == 0
    assert feature_memory_budget({"BATCHCAP_FEATURE_MEMORY_GIB": "1.5"}) == 1.5 * 2**30
    available = available_memory_bytes()
    assert available is not None and available > 0  # Linux
    assert 0 < feature_memory_budget({}) <= available
    for bad in ("lots", "-1"):
        with pytest.raises(ValueError, match="BATCHCAP_FEATURE_MEMORY_GIB"):
            feature_memory_budget({"BATCHCAP_FEATURE_MEMORY_GIB": bad})


def test_no_room_for_a_mapped_split_is_a_clear_error_not_a_sigbus(tmp_path: Path) -> None:
    """On a full disk the mapped file's blocks are refused up front (posix_fallocate), with what to do."""
    from conftest import tmpfs

    paths = write_images(tmp_path / "p", 10)

    def wide(images: torch.Tensor) -> torch.Tensor:  # 64 KB a picture in fp16
        return channel_means(images).repeat(1, 64, 171)[:, :, :512]

    with tmpfs(tmp_path / "disk", size="1m") as disk:
        cache = FeatureCache(disk / "cache", FeatureKey("x", "w", PRE, True, "fp32"))
        cache.extract([(p.name, str(p)) for p in paths], wide, RUNTIME, chunk_size=5)  # 640 KB of 1 MB
        with pytest.raises(FeatureSpaceError, match=r"no room for 0\.6 MiB of features.*BATCHCAP_FEATURE_MEMORY_GIB"):
            cache.load(memory_budget=0)
        assert not [n for n in os.listdir(cache.dir) if n.startswith(".split-")]
        _, held = cache.load(memory_budget=float("inf"))  # in memory it still loads
        assert held.shape == (10, 64, 512)
