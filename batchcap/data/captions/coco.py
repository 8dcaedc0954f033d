"""COCO caption annotations (``captions_train2014.json`` ...) beside their image folders."""

from __future__ import annotations

import glob
import os
import re
from typing import Any

from batchcap.data.captions.records import (
    HASH_SPLIT,
    SPLITS,
    CaptionDataset,
    DatasetError,
    canonical_split,
    check_nonempty,
    hash_split,
    load_json,
    missing_notes,
    place_folder_records,
)


def _coco_split_tag(name: str) -> tuple[str | None, str]:
    """(canonical split, folder tag such as ``train2014``) read from a ``captions_*.json`` name."""
    stem = re.sub(r"\.json$", "", os.path.basename(name), flags=re.IGNORECASE)
    tag = re.sub(r"^captions_?", "", stem, flags=re.IGNORECASE)
    for word in re.split(r"[^a-zA-Z]+", tag):
        split = canonical_split(word)
        if split is not None:
            return split, tag
    return None, tag


def coco_files(path: str) -> list[str]:
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
    files = coco_files(path)
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
        data = load_json(file)
        if (
            not isinstance(data, dict)
            or not isinstance(data.get("images"), list)
            or not isinstance(data.get("annotations"), list)
        ):
            raise DatasetError(f"{name}: {expected}")
        if not data["annotations"]:
            raise DatasetError(f"{name} holds no captions: {expected}")
        split, tag = _coco_split_tag(name)
        image_dir = _coco_image_dir(dataset_root, tag, images)
        image_dirs.append(image_dir)
        file_names: dict[Any, str] = {}
        for index, image in enumerate(data["images"]):
            if not isinstance(image, dict) or "id" not in image or not isinstance(image.get("file_name"), str):
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
            notes.append(
                f"{name}: no train/val/test in the file name: made a deterministic "
                f"{HASH_SPLIT[0]}/{HASH_SPLIT[1]}/{HASH_SPLIT[2]} split by SHA-1 of the file name"
            )
        for image_id in sorted(captions, key=lambda i: file_names[i]):
            file_name = file_names[image_id]
            target = split or hash_split(file_name)
            by_split[target].append((file_name, captions[image_id], os.path.join(image_dir, file_name)))
    splits, missing = place_folder_records(by_split)
    dataset = CaptionDataset("coco", path, splits, missing, notes)
    missing_notes(dataset, ", ".join(sorted(set(image_dirs))))
    return check_nonempty(dataset, path)
