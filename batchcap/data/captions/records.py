"""What every caption-dataset reader returns (records in canonical splits) and the helpers they share.

Split names are canonical: ``train``, ``val``, ``test`` (Flickr8k ``dev`` -> ``val``, Karpathy
``restval`` -> ``train``). Where a layout has no split, a deterministic one is made from a
stable hash of the image id (see :func:`hash_split`): the same id always lands in the same
split, on every machine and Python version, whatever else the dataset holds.
"""

from __future__ import annotations

import hashlib
import json
import os
import tarfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from batchcap.data.extensions import IMAGE_KEYS, is_image_name

SPLITS = ("train", "val", "test")


# Fractions (in percent) of the deterministic split used when a layout has none.
HASH_SPLIT = (90, 5, 5)


_SPLIT_ALIASES = {
    "train": "train",
    "training": "train",
    "restval": "train",
    "val": "val",
    "valid": "val",
    "validation": "val",
    "dev": "val",
    "test": "test",
    "testing": "test",
}


class DatasetError(Exception):
    """The dataset on disk is not usable as given (a user error: the message says what was expected)."""


@dataclass(frozen=True)
class CaptionRecord:
    """One image and its reference captions (raw text; ``batchcap.model.text.normalize_caption`` comes later)."""

    image_id: str
    captions: tuple[str, ...]
    path: str | None = None  # image file, for folder-based layouts
    shard: str | None = None  # tar path, for WebDataset records
    key: str | None = None  # __key__ inside the shard


@dataclass
class CaptionDataset:
    """Records per canonical split, plus what was missing or skipped on the way."""

    format: str
    root: str
    splits: dict[str, list[CaptionRecord]]
    missing: dict[str, list[str]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    label: str = ""  # what the layout calls the collection, when it says (Karpathy's "dataset": "coco")

    def summary(self) -> dict[str, Any]:
        """JSON-ready counts per split (images, captions, missing), format and root, for training records."""
        names = list(SPLITS) + sorted(set(self.splits) | set(self.missing) - set(SPLITS))
        return {
            "format": self.format,
            "root": self.root,
            "splits": {
                name: {
                    "images": len(self.splits.get(name, [])),
                    "captions": sum(len(r.captions) for r in self.splits.get(name, [])),
                    "missing": len(self.missing.get(name, [])),
                }
                for name in names
            },
            "notes": list(self.notes),
            **({"label": self.label} if self.label else {}),
        }


def canonical_split(name: str) -> str | None:
    """``train``/``val``/``test`` for a split name or alias (``dev``, ``restval``...), else None."""
    return _SPLIT_ALIASES.get(name.strip().lower())


def hash_split(image_id: str, fractions: Sequence[int] = HASH_SPLIT) -> str:
    """Deterministic split of ``image_id`` from the first 8 bytes of its SHA-1 (percent buckets).

    Stable across runs, machines and Python versions (unlike ``hash()``), and independent of
    which other ids the dataset holds, so adding images never moves existing ones.
    """
    bucket = int.from_bytes(hashlib.sha1(image_id.encode("utf-8")).digest()[:8], "big") % 100
    train, val = fractions[0], fractions[0] + fractions[1]
    return "train" if bucket < train else "val" if bucket < val else "test"


def file_listing(folder: str, cache: dict[str, set[str]]) -> set[str]:
    """Names in ``folder`` (empty set when absent), listed once: one ``listdir`` beats 100k ``stat``."""
    if folder not in cache:
        try:
            cache[folder] = set(os.listdir(folder))
        except OSError:
            cache[folder] = set()
    return cache[folder]


def first_dir(root: str, candidates: Iterable[str]) -> str | None:
    for name in candidates:
        path = os.path.normpath(os.path.join(root, name))
        if os.path.isdir(path):
            return path
    return None


def empty_splits() -> tuple[dict[str, list[CaptionRecord]], dict[str, list[str]]]:
    return {s: [] for s in SPLITS}, {s: [] for s in SPLITS}


def place_folder_records(
    by_split: Mapping[str, Sequence[tuple[str, Sequence[str], str]]],
) -> tuple[dict[str, list[CaptionRecord]], dict[str, list[str]]]:
    """Records for (image_id, captions, path) triples; ids whose file is absent go to ``missing``."""
    splits, missing = empty_splits()
    listing: dict[str, set[str]] = {}
    for split, items in by_split.items():
        splits.setdefault(split, [])
        missing.setdefault(split, [])
        for image_id, captions, path in items:
            folder, name = os.path.split(path)
            if name in file_listing(folder, listing):
                splits[split].append(CaptionRecord(image_id, tuple(captions), path=path))
            else:
                missing[split].append(image_id)
    return splits, missing


def check_nonempty(dataset: CaptionDataset, what: str) -> CaptionDataset:
    if not any(dataset.splits.values()) and not any(dataset.missing.values()):
        raise DatasetError(f"{what}: no captioned images found")
    return dataset


def missing_notes(dataset: CaptionDataset, image_dir: str | None) -> None:
    for split in SPLITS:
        n_missing = len(dataset.missing.get(split, []))
        if n_missing:
            n_listed = n_missing + len(dataset.splits.get(split, []))
            where = f" in {image_dir}" if image_dir else ""
            dataset.notes.append(f"{split}: {n_missing} of {n_listed} listed images not found{where}")


def read_split_file(path: str) -> list[str]:
    """Image names, one a line (blank lines and surrounding whitespace ignored)."""
    with open(path, encoding="utf-8-sig") as f:
        return [line.strip() for line in f if line.strip()]


def find_flickr_split_files(folders: Iterable[str]) -> dict[str, str]:
    for folder in folders:
        found = {
            split: os.path.join(folder, name)
            for split, name in FLICKR_SPLIT_FILES.items()
            if os.path.isfile(os.path.join(folder, name))
        }
        if found:
            return found
    return {}


def official_or_hash_split(
    captions: dict[str, list[str]],
    split_files: dict[str, str],
    notes: list[str],
    source: str,
) -> dict[str, list[str]]:
    """Image ids per split: from the official Flickr8k split files when present, else by hash."""
    ids: dict[str, list[str]] = {s: [] for s in SPLITS}
    if not split_files:
        for image_id in captions:
            ids[hash_split(image_id)].append(image_id)
        notes.append(
            f"no split files beside {source}: made a deterministic "
            f"{HASH_SPLIT[0]}/{HASH_SPLIT[1]}/{HASH_SPLIT[2]} split by SHA-1 of the image id"
        )
        return ids
    assigned: set[str] = set()
    for split, path in split_files.items():
        uncaptioned: list[str] = []
        for image_id in read_split_file(path):
            if image_id in assigned:
                continue
            if image_id not in captions:
                uncaptioned.append(image_id)
                continue
            assigned.add(image_id)
            ids[split].append(image_id)
        if uncaptioned:
            shown = ", ".join(uncaptioned[:5]) + (", ..." if len(uncaptioned) > 5 else "")
            notes.append(
                f"{os.path.basename(path)}: {len(uncaptioned)} listed images have no captions ({shown}); skipped"
            )
    unsplit = len(captions) - len(assigned)
    if unsplit:
        notes.append(f"{unsplit} captioned images are in no split file; left out")
    return ids


def group_captions(
    pairs: Iterable[tuple[str, str]], name: str, notes: list[str], expected: str
) -> dict[str, list[str]]:
    """Captions per image id from ``(image id, caption)`` pairs, shared by the line-based readers.

    Ids that are not image file names are skipped and counted, empty captions too; a file
    with no caption at all is refused with what was ``expected``.
    """
    captions: dict[str, list[str]] = {}
    bogus: dict[str, int] = {}
    empty = 0
    for image_id, caption in pairs:
        if not is_image_name(image_id):
            bogus[image_id] = bogus.get(image_id, 0) + 1
            continue
        if not caption:
            empty += 1
            continue
        captions.setdefault(image_id, []).append(caption)
    skipped_notes(name, bogus, empty, notes)
    if not captions:
        raise DatasetError(f"{name} holds no captions: expected {expected}")
    return captions


def skipped_notes(name: str, bogus: dict[str, int], empty: int, notes: list[str]) -> None:
    for image_id, count in bogus.items():
        notes.append(f"skipped bogus id {image_id} ({count} captions): not an image file name")
    if empty:
        notes.append(f"{name}: skipped {empty} empty captions")


def load_json(path: str) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as error:
        raise DatasetError(f"{os.path.basename(path)}: not valid JSON ({error})") from None
    except UnicodeDecodeError:
        raise DatasetError(f"{os.path.basename(path)}: not UTF-8 JSON") from None


def read_image_bytes(record: CaptionRecord) -> bytes:
    """The encoded image of ``record``; ``OSError`` (``FileNotFoundError``...) when absent or unreadable.

    WebDataset members are looked up by scanning the tar, which is slow per call: read many
    with :func:`iter_wds_images`, which streams each shard once.
    """
    if record.path is not None:
        with open(record.path, "rb") as f:
            return f.read()
    if record.shard is not None and record.key is not None:
        with tarfile.open(record.shard, "r") as tar:
            for member in tar:
                if member.isfile():
                    key, ext = split_member_name(member.name)
                    if key == record.key and ext.lower() in IMAGE_KEYS:
                        member_file = tar.extractfile(member)
                        if member_file is None:
                            break
                        return member_file.read()
        raise FileNotFoundError(f"{record.shard}: no image member for key {record.key!r}")
    raise FileNotFoundError(f"record {record.image_id!r} has neither a path nor a shard")


def split_member_name(name: str) -> tuple[str, str]:
    """WebDataset's key/extension split: the key is the path up to the first dot of the base name."""
    folder, base = os.path.split(name)
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext


FLICKR_SPLIT_FILES = {
    "train": "Flickr_8k.trainImages.txt",
    "val": "Flickr_8k.devImages.txt",
    "test": "Flickr_8k.testImages.txt",
}
