"""Caption datasets: turn a captioned image collection on disk into split lists of records.

One reader per layout, picked by :func:`detect_format` (or the user's ``--format``):

- ``flickr8k``: the original Flickr8k release -- ``Flickr8k.token.txt`` (``IMAGE#N<TAB>caption``)
  plus the official ``Flickr_8k.{train,dev,test}Images.txt`` split files and the photo folder.
- ``kaggle``: Kaggle's Flickr8k -- ``captions.txt`` (CSV, header ``image,caption``) + ``Images/``.
- ``karpathy``: Karpathy's split JSON (``dataset_flickr8k.json``, ``dataset_flickr30k.json``,
  ``dataset_coco.json``).
- ``coco``: COCO caption annotations (``captions_train2014.json`` ...) + image folders.
- ``wds``: WebDataset shards holding an image plus ``txt`` or ``json`` captions.

Readers only list and check files; they never decode pictures (the feature cache does, and
counts the unreadable ones). Listed images whose file is absent go to
:attr:`CaptionDataset.missing` and are reported, never fatal; a caption file that is empty or
not in the expected shape raises :class:`DatasetError` saying what was expected.

Split names are canonical: ``train``, ``val``, ``test`` (Flickr8k ``dev`` -> ``val``, Karpathy
``restval`` -> ``train``). Where a layout has no split, a deterministic one is made from a
stable hash of the image id (see :func:`hash_split`): the same id always lands in the same
split, on every machine and Python version, whatever else the dataset holds.
"""
from __future__ import annotations

import csv
import glob
import hashlib
import io
import json
import os
import re
import tarfile
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

SPLITS = ("train", "val", "test")
FORMATS = ("flickr8k", "kaggle", "karpathy", "coco", "wds")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")
# Fractions (in percent) of the deterministic split used when a layout has none.
HASH_SPLIT = (90, 5, 5)

LAYOUTS = """recognised layouts:
  flickr8k  DIR with Flickr8k.token.txt (directly or in Flickr8k_text/), Flickr_8k.*Images.txt split
            files, photos in Flicker8k_Dataset/, Flickr8k_Dataset/ or Images/
  kaggle    DIR with captions.txt (CSV, header image,caption) and Images/
  karpathy  dataset_flickr8k.json / dataset_flickr30k.json / dataset_coco.json (or a DIR with one)
  coco      captions_*.json (or a DIR with annotations/captions_*.json) and the image folders
  wds       WebDataset shards: a .tar, a brace pattern (shard-{000..009}.tar), a glob, or a DIR of .tar"""

_SPLIT_ALIASES = {
    "train": "train", "training": "train", "restval": "train",
    "val": "val", "valid": "val", "validation": "val", "dev": "val",
    "test": "test", "testing": "test",
}
_FLICKR_TEXT_DIRS = (".", "Flickr8k_text", "Flickr8k_text/Flickr8k_text", "text")
_FLICKR_IMAGE_DIRS = ("Flicker8k_Dataset", "Flickr8k_Dataset", "Images", "images",
                      "Flicker8k_Dataset/Flicker8k_Dataset", "Flickr8k_Dataset/Flicker8k_Dataset")
_FLICKR_SPLIT_FILES = {"train": "Flickr_8k.trainImages.txt", "val": "Flickr_8k.devImages.txt",
                       "test": "Flickr_8k.testImages.txt"}
_TOKEN_LINE = re.compile(r"^(?P<image>[^\t]+)#(?P<n>\d+)\t(?P<caption>.*)$")


class DatasetError(Exception):
    """The dataset on disk is not usable as given (a user error: the message says what was expected)."""


@dataclass(frozen=True)
class CaptionRecord:
    """One image and its reference captions (raw text; ``batchcap.text.normalize_caption`` comes later)."""

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
        }


# --------------------------------------------------------------------------- helpers


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


def _file_listing(folder: str, cache: dict[str, set[str]]) -> set[str]:
    """Names in ``folder`` (empty set when absent), listed once: one ``listdir`` beats 100k ``stat``."""
    if folder not in cache:
        try:
            cache[folder] = set(os.listdir(folder))
        except OSError:
            cache[folder] = set()
    return cache[folder]


def _first_dir(root: str, candidates: Iterable[str]) -> str | None:
    for name in candidates:
        path = os.path.normpath(os.path.join(root, name))
        if os.path.isdir(path):
            return path
    return None


def _empty_splits() -> tuple[dict[str, list[CaptionRecord]], dict[str, list[str]]]:
    return {s: [] for s in SPLITS}, {s: [] for s in SPLITS}


def _place_folder_records(
    by_split: Mapping[str, Sequence[tuple[str, Sequence[str], str]]],
) -> tuple[dict[str, list[CaptionRecord]], dict[str, list[str]]]:
    """Records for (image_id, captions, path) triples; ids whose file is absent go to ``missing``."""
    splits, missing = _empty_splits()
    listing: dict[str, set[str]] = {}
    for split, items in by_split.items():
        splits.setdefault(split, [])
        missing.setdefault(split, [])
        for image_id, captions, path in items:
            folder, name = os.path.split(path)
            if name in _file_listing(folder, listing):
                splits[split].append(CaptionRecord(image_id, tuple(captions), path=path))
            else:
                missing[split].append(image_id)
    return splits, missing


def _check_nonempty(dataset: CaptionDataset, what: str) -> CaptionDataset:
    if not any(dataset.splits.values()) and not any(dataset.missing.values()):
        raise DatasetError(f"{what}: no captioned images found")
    return dataset


def _missing_notes(dataset: CaptionDataset, image_dir: str | None) -> None:
    for split in SPLITS:
        n_missing = len(dataset.missing.get(split, []))
        if n_missing:
            n_listed = n_missing + len(dataset.splits.get(split, []))
            where = f" in {image_dir}" if image_dir else ""
            dataset.notes.append(f"{split}: {n_missing} of {n_listed} listed images not found{where}")


# --------------------------------------------------------------------------- Flickr8k (original)


def _find_flickr_text_dir(root: str) -> str | None:
    for name in _FLICKR_TEXT_DIRS:
        folder = os.path.normpath(os.path.join(root, name))
        if os.path.isfile(os.path.join(folder, "Flickr8k.token.txt")):
            return folder
    return None


def _read_split_file(path: str) -> list[str]:
    """Image names, one a line (blank lines and surrounding whitespace ignored)."""
    with open(path, encoding="utf-8-sig") as f:
        return [line.strip() for line in f if line.strip()]


def _find_flickr_split_files(folders: Iterable[str]) -> dict[str, str]:
    for folder in folders:
        found = {split: os.path.join(folder, name) for split, name in _FLICKR_SPLIT_FILES.items()
                 if os.path.isfile(os.path.join(folder, name))}
        if found:
            return found
    return {}


def _official_or_hash_split(
    captions: dict[str, list[str]], split_files: dict[str, str], notes: list[str], source: str,
) -> dict[str, list[str]]:
    """Image ids per split: from the official Flickr8k split files when present, else by hash."""
    ids: dict[str, list[str]] = {s: [] for s in SPLITS}
    if not split_files:
        for image_id in captions:
            ids[hash_split(image_id)].append(image_id)
        notes.append(f"no split files beside {source}: made a deterministic "
                     f"{HASH_SPLIT[0]}/{HASH_SPLIT[1]}/{HASH_SPLIT[2]} split by SHA-1 of the image id")
        return ids
    assigned: set[str] = set()
    for split, path in split_files.items():
        uncaptioned: list[str] = []
        for image_id in _read_split_file(path):
            if image_id in assigned:
                continue
            if image_id not in captions:
                uncaptioned.append(image_id)
                continue
            assigned.add(image_id)
            ids[split].append(image_id)
        if uncaptioned:
            shown = ", ".join(uncaptioned[:5]) + (", ..." if len(uncaptioned) > 5 else "")
            notes.append(f"{os.path.basename(path)}: {len(uncaptioned)} listed images have no captions "
                         f"({shown}); skipped")
    unsplit = len(captions) - len(assigned)
    if unsplit:
        notes.append(f"{unsplit} captioned images are in no split file; left out")
    return ids


def read_flickr8k_tokens(path: str, notes: list[str]) -> dict[str, list[str]]:
    """Captions per image from ``Flickr8k.token.txt`` (``IMAGE#N<TAB>caption``, CRLF or LF).

    Ids that are not image file names (the release's known bogus ``2258277193_586949ec62.jpg.1``)
    are skipped with a note; a line that is not ``IMAGE#N<TAB>caption`` raises :class:`DatasetError`.
    """
    name = os.path.basename(path)
    captions: dict[str, list[str]] = {}
    bogus: dict[str, int] = {}
    empty = 0
    with open(path, encoding="utf-8-sig", newline=None) as f:  # universal newlines: CRLF -> \n
        for lineno, line in enumerate(f, start=1):
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            match = _TOKEN_LINE.match(line)
            if match is None:
                raise DatasetError(f"{name} line {lineno}: expected IMAGE#N<TAB>caption, got {line[:80]!r}")
            image_id, caption = match["image"].strip(), match["caption"].strip()
            if not image_id.lower().endswith(IMAGE_EXTENSIONS):
                bogus[image_id] = bogus.get(image_id, 0) + 1
                continue
            if not caption:
                empty += 1
                continue
            captions.setdefault(image_id, []).append(caption)
    for image_id, count in bogus.items():
        notes.append(f"skipped bogus id {image_id} ({count} captions): not an image file name")
    if empty:
        notes.append(f"{name}: skipped {empty} empty captions")
    if not captions:
        raise DatasetError(f"{name} holds no captions: expected lines of IMAGE#N<TAB>caption")
    return captions


def load_flickr8k(root: str, images: str | None = None) -> CaptionDataset:
    """The original Flickr8k release under ``root`` (text files directly there or in ``Flickr8k_text/``)."""
    text_dir = _find_flickr_text_dir(root)
    if text_dir is None:
        raise DatasetError(f"{root}: no Flickr8k.token.txt (looked in {', '.join(_FLICKR_TEXT_DIRS)})")
    notes: list[str] = []
    token_path = os.path.join(text_dir, "Flickr8k.token.txt")
    captions = read_flickr8k_tokens(token_path, notes)
    split_files = _find_flickr_split_files([text_dir, root])
    ids = _official_or_hash_split(captions, split_files, notes, "Flickr8k.token.txt")
    image_dir = images or _first_dir(root, _FLICKR_IMAGE_DIRS) or _first_dir(text_dir, (".",))
    if images is None and _first_dir(root, _FLICKR_IMAGE_DIRS) is None:
        notes.append(f"no image folder ({', '.join(_FLICKR_IMAGE_DIRS[:3])}) under {root}: "
                     f"looking for photos beside the text files")
    assert image_dir is not None
    by_split = {s: [(i, captions[i], os.path.join(image_dir, i)) for i in ids[s]] for s in SPLITS}
    splits, missing = _place_folder_records(by_split)
    dataset = CaptionDataset("flickr8k", root, splits, missing, notes)
    _missing_notes(dataset, image_dir)
    return _check_nonempty(dataset, token_path)


# --------------------------------------------------------------------------- image bytes


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
                    key, ext = _split_member_name(member.name)
                    if key == record.key and ext.lower() in _WDS_IMAGE_EXTS:
                        f = tar.extractfile(member)
                        if f is None:
                            break
                        return f.read()
        raise FileNotFoundError(f"{record.shard}: no image member for key {record.key!r}")
    raise FileNotFoundError(f"record {record.image_id!r} has neither a path nor a shard")


# --------------------------------------------------------------------------- detection and entry point


def detect_format(path: str) -> str:
    """The layout of ``path`` (one of :data:`FORMATS`), or :class:`DatasetError` listing the known ones."""
    name = os.path.basename(os.path.normpath(path)).lower()
    if os.path.isfile(path):
        if name.endswith(".token.txt"):
            return "flickr8k"
    if os.path.isdir(path):
        if _find_flickr_text_dir(path) is not None:
            return "flickr8k"
    raise DatasetError(f"{path}: not a recognised caption dataset\n{LAYOUTS}")


def load_caption_dataset(path: str | os.PathLike[str], format: str = "auto", *,
                         images: str | os.PathLike[str] | None = None) -> CaptionDataset:
    """Read the caption dataset at ``path``; ``format="auto"`` detects it; ``images`` overrides the photo folder."""
    path = os.fspath(path)
    image_dir = os.fspath(images) if images is not None else None
    if image_dir is not None and not os.path.isdir(image_dir):
        raise DatasetError(f"image folder {image_dir} does not exist")
    fmt = detect_format(path) if format == "auto" else format
    if fmt not in FORMATS:
        raise DatasetError(f"unknown dataset format {format!r}: expected auto or one of {', '.join(FORMATS)}")
    if fmt == "flickr8k":
        root = _flickr_root(path)
        return load_flickr8k(root, image_dir)
    raise DatasetError(f"format {fmt!r} is not implemented yet")


def _flickr_root(path: str) -> str:
    """The dataset folder, also when given the token file or the ``Flickr8k_text`` folder itself."""
    if os.path.isfile(path):
        path = os.path.dirname(os.path.abspath(path))
    if os.path.basename(os.path.normpath(path)) == "Flickr8k_text":
        return os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(path):
        raise DatasetError(f"{path}: no such folder")
    return path


# --------------------------------------------------------------------------- WebDataset helpers

_WDS_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


def _split_member_name(name: str) -> tuple[str, str]:
    """WebDataset's key/extension split: the key is the path up to the first dot of the base name."""
    folder, base = os.path.split(name)
    stem, dot, ext = base.partition(".")
    return (os.path.join(folder, stem) if folder else stem), ext
