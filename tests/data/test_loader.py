"""The loader: every input in exactly one batch, across job shards and DataLoader workers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import webdataset as wds
from conftest import write_images

from batchcap.config import ImagePolicy, Preprocess
from batchcap.data.loader import Batch, iter_batches
from batchcap.data.sources import open_sources

PRE = Preprocess(input_size=(3, 16, 16), resize="squash", interpolation="bilinear")


def run(sources, **kw) -> tuple[list[Batch], dict[str, str]]:
    batches = list(iter_batches(sources, PRE, ImagePolicy(), **kw))
    seen: dict[str, str] = {}
    for b in batches:
        assert b.images.dtype == torch.uint8 and b.images.shape == (len(b.ok), 3, 16, 16)
        for r in b.ok + b.failed:
            assert r.item.id not in seen
            seen[r.item.id] = r.status
    return batches, seen


@pytest.fixture
def mixed(tmp_path: Path):
    """A folder of 23 pictures (2 broken, 2 ignored) and two tar shards of 5 samples."""
    folder = tmp_path / "photos"
    write_images(folder, 20)
    write_images(folder / "sub", 3, fmt="PNG")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff")
    (folder / "empty.png").write_bytes(b"")
    (folder / "notes.txt").write_text("x")
    (folder / ".DS_Store").write_bytes(b"x")
    for s in range(2):
        with wds.TarWriter(str(tmp_path / f"t-{s}.tar")) as sink:
            for i in range(5):
                sink.write({"__key__": f"k{i}", "jpg": (folder / f"img{i:05d}.jpg").read_bytes()})
    return open_sources([str(folder), str(tmp_path / "t-{0..1}.tar")])


def test_every_input_once_with_batches_of_the_right_size(mixed) -> None:
    batches, seen = run(mixed, batch_size=4, workers=0)
    assert len(seen) == 25 + 10
    assert sum(s != "ok" for s in seen.values()) == 2
    # Failures ride along without taking a picture's place: every batch but the last holds
    # exactly 4 pictures, so the encoder sees one shape (cuDNN autotunes once).
    assert [len(b.ok) for b in batches[:-1]] == [4] * (len(batches) - 1)
    assert 1 <= len(batches[-1].ok) <= 4
    assert sum(len(b.failed) for b in batches) == 2
    assert sum(b.ignored for b in batches) == 2


def test_a_stream_of_failures_is_sent_without_waiting_for_pictures(tmp_path: Path, monkeypatch) -> None:
    import batchcap.data.loader

    monkeypatch.setattr(batchcap.data.loader, "COUNT_FLUSH", 3)
    for i in range(7):
        (tmp_path / f"bad{i}.jpg").write_bytes(b"nope")
    batches, seen = run(open_sources([str(tmp_path)]), batch_size=100, workers=0)
    assert len(seen) == 7 and [len(b.failed) for b in batches] == [3, 3, 1]


def test_shards_together_are_the_whole_input(mixed) -> None:
    _, whole = run(mixed, batch_size=3, workers=0)
    union: dict[str, str] = {}
    ignored = 0
    for i in range(3):
        batches, part = run(mixed, batch_size=3, workers=0, shard_index=i, shard_count=3)
        assert not set(part) & set(union)
        union.update(part)
        ignored += sum(b.ignored for b in batches)
    assert union == whole and ignored == 2


def test_workers_split_the_work_without_overlap(mixed) -> None:
    batches, seen = run(mixed, batch_size=4, workers=2)
    _, alone = run(mixed, batch_size=4, workers=0)
    assert seen == alone
    assert sum(b.ignored for b in batches) == 2


def test_sharded_workers_and_done_counts_add_up(mixed) -> None:
    _, whole = run(mixed, batch_size=4, workers=0)
    done_ids = sorted(whole)[:7]
    first = list(iter_batches(mixed, PRE, ImagePolicy(), batch_size=64, workers=0))
    fingerprints = {r.item.id: (r.item.size, r.item.mtime_ns) for b in first for r in b.ok + b.failed}
    done = {k: fingerprints[k] for k in done_ids}
    seen_all: dict[str, str] = {}
    skipped = 0
    for i in range(2):
        batches, part = run(mixed, batch_size=4, workers=2, shard_index=i, shard_count=2, done=done)
        seen_all.update(part)
        skipped += sum(b.skipped for b in batches)
    assert skipped == 7 and set(seen_all) == set(whole) - set(done_ids)


def test_all_failed_batch_has_an_empty_image_tensor(tmp_path: Path) -> None:
    (tmp_path / "a.jpg").write_bytes(b"nope")
    batches, seen = run(open_sources([str(tmp_path)]), batch_size=8, workers=0)
    assert seen == {"a.jpg": "unsupported"} and batches[0].images.shape == (0, 3, 16, 16)


@pytest.mark.cuda
def test_pin_memory(mixed) -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    batches = list(iter_batches(mixed, PRE, ImagePolicy(), batch_size=8, workers=1, pin_memory=True))
    assert all(b.images.is_pinned() for b in batches if len(b.ok))
