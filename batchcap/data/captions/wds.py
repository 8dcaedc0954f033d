"""WebDataset shards holding an image plus ``txt`` or ``json`` captions."""

from __future__ import annotations

import glob
import json
import os
import re
import tarfile
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from batchcap.data.captions.records import (
    HASH_SPLIT,
    SPLITS,
    CaptionDataset,
    CaptionRecord,
    DatasetError,
    canonical_split,
    empty_splits,
    hash_split,
    split_member_name,
)
from batchcap.data.extensions import IMAGE_KEYS

_WDS_SPLIT_WORD = re.compile(r"(?<![a-z])(train|training|val|valid|validation|dev|test|testing)(?![a-z])")


def _braceexpand(pattern: str) -> list[str]:
    """``shard-{000..002}.tar`` -> the three names (uses webdataset's ``braceexpand`` dependency)."""
    try:
        from braceexpand import braceexpand
    except ImportError:  # pragma: no cover - braceexpand comes with webdataset
        return [pattern]
    return list(braceexpand(pattern))


def wds_shards(spec: str) -> list[str]:
    """Local shard paths for a ``.tar`` path, brace pattern, glob or folder of ``.tar`` files (sorted)."""
    if os.path.isdir(spec):
        shards = sorted(glob.glob(os.path.join(glob.escape(spec), "**", "*.tar"), recursive=True))
    else:
        shards = []
        for name in _braceexpand(spec):
            if any(ch in name for ch in "*?["):
                shards += sorted(glob.glob(name, recursive=True))
            else:
                shards.append(name)
    if not shards:
        raise DatasetError(f"{spec}: no .tar shards found")
    absent = [s for s in shards if not os.path.isfile(s)]
    if absent:
        raise DatasetError(f"{len(absent)} shards not found, e.g. {absent[0]}")
    return shards


def _wds_split(shard: str) -> str | None:
    match = _WDS_SPLIT_WORD.search(os.path.basename(shard).lower())
    if match is not None:
        return canonical_split(match.group(1))
    # A folder named exactly after the split: .../val/shard-000.tar (not any folder containing the word).
    return canonical_split(os.path.basename(os.path.dirname(os.path.abspath(shard))))


def _wds_captions(ext: str, data: bytes) -> list[str]:
    """Captions from a ``txt`` member (one per line) or a ``json`` one (``caption`` or ``captions``)."""
    text = data.decode("utf-8-sig")
    if ext == "txt":
        return [line.strip() for line in text.splitlines() if line.strip()]
    value = json.loads(text)
    if not isinstance(value, dict):
        raise ValueError("json is not an object")
    found = value.get("captions", value.get("caption"))
    if isinstance(found, str):
        found = [found]
    if not isinstance(found, list):
        raise ValueError("json has no 'caption' (string) or 'captions' (list)")
    return [str(c).strip() for c in found if str(c).strip()]


def _shard_id(shard: str, shards: Sequence[str]) -> str:
    """A short stable name for a shard: its file name, or its path below the common folder if names repeat."""
    names = [os.path.basename(s) for s in shards]
    if len(set(names)) == len(names):
        return os.path.basename(shard)
    common = os.path.commonpath([os.path.abspath(s) for s in shards])
    return os.path.relpath(os.path.abspath(shard), common)


def load_wds(spec: str) -> CaptionDataset:
    """WebDataset shards: per key an image (jpg/jpeg/png/webp) plus ``txt`` or ``json`` captions.

    Only caption members are read; images are listed, not decoded. The split comes from the
    shard's name or folder (``train``/``val``/``dev``/``test`` as a word), else from a hash of
    ``<shard>/<key>``. A sample with an unreadable caption member is skipped with a note (bad
    data is a row); samples with captions but no image go to ``missing``.
    """
    shards = wds_shards(spec)
    notes: list[str] = []
    splits, missing = empty_splits()
    bad: list[str] = []
    uncaptioned = 0
    hashed = 0
    for shard in shards:
        shard_name = _shard_id(shard, shards)
        shard_split = _wds_split(shard)
        samples: dict[str, dict[str, Any]] = {}
        try:
            with tarfile.open(shard, "r") as tar:
                for member in tar:
                    if not member.isfile():
                        continue
                    key, ext = split_member_name(member.name)
                    if key.startswith("__") or not ext:
                        continue
                    ext = ext.lower()
                    sample = samples.setdefault(key, {})
                    if ext in IMAGE_KEYS:
                        sample["image"] = True
                    elif ext in ("txt", "json") and ext not in sample:
                        f = tar.extractfile(member)
                        sample[ext] = f.read() if f is not None else b""
        except (tarfile.TarError, OSError) as error:
            raise DatasetError(f"{shard}: not a readable tar file ({error})") from None
        for key, sample in samples.items():
            image_id = f"{shard_name}/{key}"
            captions: list[str] = []
            for ext in ("json", "txt"):
                if ext in sample and not captions:
                    try:
                        captions = _wds_captions(ext, sample[ext])
                    except (ValueError, UnicodeDecodeError) as error:
                        bad.append(f"{image_id}.{ext} ({error})")
            if not captions:
                uncaptioned += "txt" not in sample and "json" not in sample
                continue
            split = shard_split
            if split is None:
                split, hashed = hash_split(image_id), hashed + 1
            if not sample.get("image"):
                missing[split].append(image_id)
                continue
            splits[split].append(CaptionRecord(image_id, tuple(captions), shard=shard, key=key))
    if bad:
        notes.append(f"skipped {len(bad)} samples with unreadable captions, e.g. {bad[0]}")
    if uncaptioned:
        notes.append(f"skipped {uncaptioned} samples with no txt or json captions")
    if hashed:
        notes.append(
            f"{hashed} samples in shards whose name says no split: deterministic "
            f"{HASH_SPLIT[0]}/{HASH_SPLIT[1]}/{HASH_SPLIT[2]} split by SHA-1 of <shard>/<key>"
        )
    dataset = CaptionDataset("wds", spec, splits, missing, notes)
    for split in SPLITS:
        if missing[split]:
            notes.append(f"{split}: {len(missing[split])} captioned samples have no image member")
    if not any(splits.values()) and not any(missing.values()):
        raise DatasetError(
            f"{spec}: no samples with an image and txt/json captions in {len(shards)} shards "
            "(expected KEY.jpg|png|webp + KEY.txt or KEY.json with caption/captions)"
        )
    return dataset


def iter_wds_images(records: Iterable[CaptionRecord]) -> Iterator[tuple[CaptionRecord, bytes]]:
    """``(record, image bytes)`` for WebDataset records, reading each shard once, in shard order.

    Records whose image member is absent are not yielded (compare counts to find them).
    """
    by_shard: dict[str, dict[str, CaptionRecord]] = defaultdict(dict)
    for record in records:
        if record.shard is None or record.key is None:
            raise ValueError(f"record {record.image_id!r} is not a WebDataset record")
        by_shard[record.shard][record.key] = record
    for shard, wanted in by_shard.items():
        done: set[str] = set()
        with tarfile.open(shard, "r") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                key, ext = split_member_name(member.name)
                if key in wanted and key not in done and ext.lower() in IMAGE_KEYS:
                    f = tar.extractfile(member)
                    if f is not None:
                        done.add(key)
                        yield wanted[key], f.read()
