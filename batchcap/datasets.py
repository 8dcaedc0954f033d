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
import json
import os
import re
import tarfile
from collections import defaultdict
from dataclasses import dataclass, field
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
TOKEN_LINE = re.compile(r"^(?P<image>[^\t]+)#(?P<n>\d+)\t(?P<caption>.*)$")


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
    try:
        with open(path, encoding="utf-8-sig", newline=None) as f:  # universal newlines: CRLF -> \n
            lines = f.read().split("\n")
    except UnicodeDecodeError as error:
        raise DatasetError(f"{name}: not UTF-8 text ({error.reason} at byte {error.start}); "
                           "expected lines of IMAGE#N<TAB>caption") from None

    def pairs() -> Iterator[tuple[str, str]]:
        for lineno, line in enumerate(lines, start=1):
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            match = TOKEN_LINE.match(line)
            if match is None:
                raise DatasetError(f"{name} line {lineno}: expected IMAGE#N<TAB>caption, got {line[:80]!r}")
            yield match["image"].strip(), match["caption"].strip()

    return _group_captions(pairs(), name, notes, "lines of IMAGE#N<TAB>caption")


def _group_captions(pairs: Iterable[tuple[str, str]], name: str, notes: list[str], expected: str
                    ) -> dict[str, list[str]]:
    """Captions per image id from ``(image id, caption)`` pairs, shared by the line-based readers.

    Ids that are not image file names are skipped and counted, empty captions too; a file
    with no caption at all is refused with what was ``expected``.
    """
    captions: dict[str, list[str]] = {}
    bogus: dict[str, int] = {}
    empty = 0
    for image_id, caption in pairs:
        if not image_id.lower().endswith(IMAGE_EXTENSIONS):
            bogus[image_id] = bogus.get(image_id, 0) + 1
            continue
        if not caption:
            empty += 1
            continue
        captions.setdefault(image_id, []).append(caption)
    _skipped_notes(name, bogus, empty, notes)
    if not captions:
        raise DatasetError(f"{name} holds no captions: expected {expected}")
    return captions


def _skipped_notes(name: str, bogus: dict[str, int], empty: int, notes: list[str]) -> None:
    for image_id, count in bogus.items():
        notes.append(f"skipped bogus id {image_id} ({count} captions): not an image file name")
    if empty:
        notes.append(f"{name}: skipped {empty} empty captions")


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
    image_dir = images or _first_dir(root, _FLICKR_IMAGE_DIRS)
    if image_dir is None:
        image_dir = text_dir
        notes.append(f"no image folder ({', '.join(_FLICKR_IMAGE_DIRS[:3])}) under {root}: "
                     f"looking for photos beside the text files")
    by_split = {s: [(i, captions[i], os.path.join(image_dir, i)) for i in ids[s]] for s in SPLITS}
    splits, missing = _place_folder_records(by_split)
    dataset = CaptionDataset("flickr8k", root, splits, missing, notes)
    _missing_notes(dataset, image_dir)
    return _check_nonempty(dataset, token_path)


# --------------------------------------------------------------------------- Kaggle Flickr8k


def read_kaggle_captions(path: str, notes: list[str]) -> dict[str, list[str]]:
    """Captions per image from Kaggle's ``captions.txt`` (CSV, header ``image,caption``).

    Parsed with :mod:`csv`, so quoted captions may hold commas and quotes; an unquoted caption
    with commas is joined back (image names hold no commas).
    """
    try:
        return _read_kaggle_captions(path, notes)
    except (csv.Error, UnicodeDecodeError) as error:
        raise DatasetError(f"{os.path.basename(path)}: not a UTF-8 CSV with header image,caption "
                           f"({error})") from None


def _read_kaggle_captions(path: str, notes: list[str]) -> dict[str, list[str]]:
    name = os.path.basename(path)
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f, strict=True)
        header = next(reader, None)
        if header is None:
            raise DatasetError(f"{name} is empty: expected a CSV with header image,caption")
        if [h.strip().lower() for h in header[:2]] != ["image", "caption"]:
            raise DatasetError(f"{name} line 1: expected the header image,caption, "
                               f"got {','.join(header)[:80]!r}")

        def pairs() -> Iterator[tuple[str, str]]:
            for row in reader:
                if not row or not any(cell.strip() for cell in row):
                    continue
                if len(row) < 2 or not row[0].strip():
                    raise DatasetError(f"{name} line {reader.line_num}: expected image,caption, "
                                       f"got {','.join(row)[:80]!r}")
                yield row[0].strip(), ",".join(row[1:]).strip()

        return _group_captions(pairs(), name, notes, "a CSV with header image,caption")


def load_kaggle(root: str, images: str | None = None, captions_file: str | None = None) -> CaptionDataset:
    """Kaggle's Flickr8k (``captions.txt`` + ``Images/``); official split files are used when beside it."""
    captions_path = captions_file or os.path.join(root, "captions.txt")
    if not os.path.isfile(captions_path):
        raise DatasetError(f"{root}: no captions.txt (Kaggle Flickr8k layout: captions.txt + Images/)")
    notes: list[str] = []
    captions = read_kaggle_captions(captions_path, notes)
    split_files = _find_flickr_split_files([root, os.path.join(root, "Flickr8k_text")])
    ids = _official_or_hash_split(captions, split_files, notes, os.path.basename(captions_path))
    image_dir = images or _first_dir(root, ("Images", "images") + _FLICKR_IMAGE_DIRS[:2]) or root
    by_split = {s: [(i, captions[i], os.path.join(image_dir, i)) for i in ids[s]] for s in SPLITS}
    splits, missing = _place_folder_records(by_split)
    dataset = CaptionDataset("kaggle", root, splits, missing, notes)
    _missing_notes(dataset, image_dir)
    return _check_nonempty(dataset, captions_path)


# --------------------------------------------------------------------------- Karpathy split JSON

_KARPATHY_IMAGE_DIRS = {
    "flickr8k": ("Flicker8k_Dataset", "Flickr8k_Dataset", "Images", "images"),
    "flickr30k": ("flickr30k-images", "flickr30k_images", "Images", "images"),
    "coco": ("images", "coco", "."),
}


def _load_json(path: str) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as error:
        raise DatasetError(f"{os.path.basename(path)}: not valid JSON ({error})") from None
    except UnicodeDecodeError:
        raise DatasetError(f"{os.path.basename(path)}: not UTF-8 JSON") from None


def load_karpathy(path: str, images: str | None = None) -> CaptionDataset:
    """Karpathy's split JSON: ``{"images": [{"filename", "filepath"?, "split", "sentences": [{"raw"}]}]}``.

    The image folder is ``images`` or the first of the usual names beside the JSON; COCO's
    ``filepath`` (``train2014``/``val2014``) is a subfolder of it (tried without, too).
    """
    name = os.path.basename(path)
    data = _load_json(path)
    expected = 'expected {"images": [{"filename", "split", "sentences": [{"raw"}]}], "dataset": ...}'
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise DatasetError(f"{name}: {expected}")
    if not data["images"]:
        raise DatasetError(f"{name} lists no images: {expected}")
    kind = str(data.get("dataset") or re.sub(r"^dataset_|\.json$", "", name)).lower()
    root = os.path.dirname(os.path.abspath(path))
    image_dir = images or _first_dir(root, _KARPATHY_IMAGE_DIRS.get(kind, ("Images", "images"))) or root
    notes: list[str] = []
    by_split: dict[str, list[tuple[str, list[str], str]]] = {s: [] for s in SPLITS}
    listing: dict[str, set[str]] = {}
    seen: set[str] = set()
    other_splits: dict[str, int] = defaultdict(int)
    no_captions = 0
    for index, entry in enumerate(data["images"]):
        if not isinstance(entry, dict) or not isinstance(entry.get("filename"), str) \
                or not isinstance(entry.get("sentences"), list):
            raise DatasetError(f"{name}: images[{index}]: {expected}")
        filepath = str(entry.get("filepath") or "")
        image_id = f"{filepath}/{entry['filename']}" if filepath and kind == "coco" else entry["filename"]
        split = canonical_split(str(entry.get("split", "")))
        if split is None:
            other_splits[str(entry.get("split"))] += 1
            continue
        captions = [str(s.get("raw") or " ".join(s.get("tokens") or [])).strip()
                    for s in entry["sentences"] if isinstance(s, dict)]
        captions = [c for c in captions if c]
        if not captions:
            no_captions += 1
            continue
        if image_id in seen:
            continue
        seen.add(image_id)
        image_path = os.path.join(image_dir, filepath, entry["filename"])
        if filepath and entry["filename"] not in _file_listing(os.path.join(image_dir, filepath), listing) \
                and entry["filename"] in _file_listing(image_dir, listing):
            image_path = os.path.join(image_dir, entry["filename"])
        by_split[split].append((image_id, captions, image_path))
    for split_name, count in sorted(other_splits.items()):
        notes.append(f"{name}: {count} images with unknown split {split_name!r}; left out")
    if no_captions:
        notes.append(f"{name}: {no_captions} images without sentences; left out")
    if any(e.get("split") == "restval" for e in data["images"] if isinstance(e, dict)):
        notes.append("Karpathy 'restval' images are counted as train")
    splits, missing = _place_folder_records(by_split)
    dataset = CaptionDataset("karpathy", path, splits, missing, notes)
    _missing_notes(dataset, image_dir)
    return _check_nonempty(dataset, path)


# --------------------------------------------------------------------------- COCO caption JSON


def _coco_split_tag(name: str) -> tuple[str | None, str]:
    """(canonical split, folder tag such as ``train2014``) read from a ``captions_*.json`` name."""
    stem = re.sub(r"\.json$", "", os.path.basename(name), flags=re.IGNORECASE)
    tag = re.sub(r"^captions_?", "", stem, flags=re.IGNORECASE)
    for word in re.split(r"[^a-zA-Z]+", tag):
        split = canonical_split(word)
        if split is not None:
            return split, tag
    return None, tag


def _coco_files(path: str) -> list[str]:
    if os.path.isfile(path):
        return [path]
    found: list[str] = []
    for folder in (os.path.join(path, "annotations"), path):
        found += sorted(glob.glob(os.path.join(glob.escape(folder), "captions_*.json")))
        if found:
            break
    return found


def _coco_image_dir(root: str, tag: str, images: str | None) -> str:
    """The folder of one annotation file's images: ``<base>/<tag>`` (``train2014/``) or ``<base>`` itself."""
    if images:
        return os.path.join(images, tag) if os.path.isdir(os.path.join(images, tag)) else images
    for base in (root, os.path.join(root, "images")):
        if os.path.isdir(os.path.join(base, tag)):
            return os.path.join(base, tag)
    return os.path.join(root, "images") if os.path.isdir(os.path.join(root, "images")) else root


def load_coco(path: str, images: str | None = None) -> CaptionDataset:
    """COCO caption annotations: ``{"images": [{"id", "file_name"}], "annotations": [...]}``.

    ``path`` is one ``captions_*.json`` or a folder with ``annotations/captions_*.json``. The split
    comes from each file name (``captions_val2014.json`` -> val); images are looked for in a
    folder named after the file (``train2014/``) under ``images``, the dataset folder or its
    ``images/``. A single file whose name names no split is split by hash of the file name.
    """
    files = _coco_files(path)
    if not files:
        raise DatasetError(f"{path}: no captions_*.json (looked in annotations/ and the folder itself)")
    root = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    dataset_root = os.path.dirname(root) if os.path.basename(root) == "annotations" else root
    notes: list[str] = []
    by_split: dict[str, list[tuple[str, list[str], str]]] = {s: [] for s in SPLITS}
    expected = 'expected {"images": [{"id", "file_name"}], "annotations": [{"image_id", "caption"}]}'
    image_dirs = []
    for file in files:
        name = os.path.basename(file)
        data = _load_json(file)
        if not isinstance(data, dict) or not isinstance(data.get("images"), list) \
                or not isinstance(data.get("annotations"), list):
            raise DatasetError(f"{name}: {expected}")
        if not data["annotations"]:
            raise DatasetError(f"{name} holds no captions: {expected}")
        split, tag = _coco_split_tag(name)
        image_dir = _coco_image_dir(dataset_root, tag, images)
        image_dirs.append(image_dir)
        file_names: dict[Any, str] = {}
        for index, image in enumerate(data["images"]):
            if not isinstance(image, dict) or "id" not in image \
                    or not isinstance(image.get("file_name"), str):
                raise DatasetError(f"{name}: images[{index}]: {expected}")
            file_names[image["id"]] = image["file_name"]
        captions: dict[Any, list[str]] = {}
        orphans = 0
        for index, ann in enumerate(data["annotations"]):
            if not isinstance(ann, dict) or "image_id" not in ann or not isinstance(ann.get("caption"), str):
                raise DatasetError(f"{name}: annotations[{index}]: {expected}")
            if ann["image_id"] not in file_names:
                orphans += 1
                continue
            caption = ann["caption"].strip()
            if caption:
                captions.setdefault(ann["image_id"], []).append(caption)
        if orphans:
            notes.append(f"{name}: {orphans} captions for image ids not in its images list; skipped")
        uncaptioned = len(file_names) - len(captions)
        if uncaptioned:
            notes.append(f"{name}: {uncaptioned} images without captions; left out")
        if split is None:
            notes.append(f"{name}: no train/val/test in the file name: made a deterministic "
                         f"{HASH_SPLIT[0]}/{HASH_SPLIT[1]}/{HASH_SPLIT[2]} split by SHA-1 of the file name")
        for image_id in sorted(captions, key=lambda i: file_names[i]):
            file_name = file_names[image_id]
            target = split or hash_split(file_name)
            by_split[target].append((file_name, captions[image_id], os.path.join(image_dir, file_name)))
    splits, missing = _place_folder_records(by_split)
    dataset = CaptionDataset("coco", path, splits, missing, notes)
    _missing_notes(dataset, ", ".join(sorted(set(image_dirs))))
    return _check_nonempty(dataset, path)


# --------------------------------------------------------------------------- WebDataset shards

_WDS_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
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
    splits, missing = _empty_splits()
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
                    key, ext = _split_member_name(member.name)
                    if key.startswith("__") or not ext:
                        continue
                    ext = ext.lower()
                    sample = samples.setdefault(key, {})
                    if ext in _WDS_IMAGE_EXTS:
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
        notes.append(f"{hashed} samples in shards whose name says no split: deterministic "
                     f"{HASH_SPLIT[0]}/{HASH_SPLIT[1]}/{HASH_SPLIT[2]} split by SHA-1 of <shard>/<key>")
    dataset = CaptionDataset("wds", spec, splits, missing, notes)
    for split in SPLITS:
        if missing[split]:
            notes.append(f"{split}: {len(missing[split])} captioned samples have no image member")
    if not any(splits.values()) and not any(missing.values()):
        raise DatasetError(f"{spec}: no samples with an image and txt/json captions in {len(shards)} shards "
                           "(expected KEY.jpg|png|webp + KEY.txt or KEY.json with caption/captions)")
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
                key, ext = _split_member_name(member.name)
                if key in wanted and key not in done and ext.lower() in _WDS_IMAGE_EXTS:
                    f = tar.extractfile(member)
                    if f is not None:
                        done.add(key)
                        yield wanted[key], f.read()


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
        if name.endswith(".tar"):
            return "wds"
        if name.endswith((".txt", ".csv")):
            return "kaggle"
        if name.endswith(".json"):
            if name.startswith("dataset_"):
                return "karpathy"
            if name.startswith("captions_"):
                return "coco"
            data = _load_json(path)
            if isinstance(data, dict) and isinstance(data.get("annotations"), list):
                return "coco"
            if isinstance(data, dict) and isinstance(data.get("images"), list) and data["images"] \
                    and isinstance(data["images"][0], dict) and "sentences" in data["images"][0]:
                return "karpathy"
    elif os.path.isdir(path):
        if _find_flickr_text_dir(path) is not None:
            return "flickr8k"
        if os.path.isfile(os.path.join(path, "captions.txt")):
            return "kaggle"
        if glob.glob(os.path.join(glob.escape(path), "dataset_*.json")):
            return "karpathy"
        if _coco_files(path):
            return "coco"
        if glob.glob(os.path.join(glob.escape(path), "*.tar")) or \
                glob.glob(os.path.join(glob.escape(path), "*", "*.tar")):
            return "wds"
    elif any(ch in path for ch in "{*?[") or path.endswith(".tar"):
        return "wds"
    else:
        raise DatasetError(f"{path}: no such file or folder\n{LAYOUTS}")
    raise DatasetError(f"{path}: not a recognised caption dataset\n{LAYOUTS}")


def load_caption_dataset(path: str | os.PathLike[str], format: str = "auto", *,
                         images: str | os.PathLike[str] | None = None) -> CaptionDataset:
    """Read the caption dataset at ``path``; ``format="auto"`` detects it; ``images`` overrides the photos.

    Raises :class:`DatasetError` for a user error (nothing recognisable, an empty or malformed
    caption file); images listed but absent are reported in ``missing`` and ``notes`` instead.
    """
    path = os.fspath(path)
    image_dir = os.fspath(images) if images is not None else None
    if image_dir is not None and not os.path.isdir(image_dir):
        raise DatasetError(f"image folder {image_dir} does not exist")
    if format not in FORMATS + ("auto",):
        raise DatasetError(f"unknown dataset format {format!r}: expected auto or one of {', '.join(FORMATS)}")
    fmt = detect_format(path) if format == "auto" else format
    if fmt == "flickr8k":
        return load_flickr8k(_flickr_root(path), image_dir)
    if fmt == "kaggle":
        if os.path.isfile(path):
            return load_kaggle(os.path.dirname(os.path.abspath(path)), image_dir, captions_file=path)
        return load_kaggle(path, image_dir)
    if fmt == "karpathy":
        return load_karpathy(_karpathy_file(path), image_dir)
    if fmt == "coco":
        return load_coco(path, image_dir)
    if image_dir is not None:
        raise DatasetError("images= does not apply to WebDataset shards (the images are inside the tars)")
    return load_wds(path)


def _karpathy_file(path: str) -> str:
    if os.path.isfile(path):
        return path
    found = sorted(glob.glob(os.path.join(glob.escape(path), "dataset_*.json")))
    if not found:
        raise DatasetError(f"{path}: no dataset_*.json (Karpathy split file)")
    if len(found) > 1:
        raise DatasetError(f"{path} holds several Karpathy split files; pass one: "
                           + ", ".join(os.path.basename(f) for f in found))
    return found[0]


def _flickr_root(path: str) -> str:
    """The dataset folder, also when given the token file or the ``Flickr8k_text`` folder itself."""
    if os.path.isfile(path):
        path = os.path.dirname(os.path.abspath(path))
    if os.path.basename(os.path.normpath(path)) == "Flickr8k_text":
        return os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(path):
        raise DatasetError(f"{path}: no such folder")
    return path


def _split_member_name(name: str) -> tuple[str, str]:
    """WebDataset's key/extension split: the key is the path up to the first dot of the base name."""
    folder, base = os.path.split(name)
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext
