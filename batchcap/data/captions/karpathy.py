"""Karpathy's split JSON (``dataset_flickr8k.json``, ``dataset_flickr30k.json``, ``dataset_coco.json``)."""

from __future__ import annotations

import glob
import os
import re
from collections import defaultdict

from batchcap.data.captions.records import (
    SPLITS,
    CaptionDataset,
    DatasetError,
    canonical_split,
    check_nonempty,
    file_listing,
    first_dir,
    load_json,
    missing_notes,
    place_folder_records,
)

_KARPATHY_IMAGE_DIRS = {
    "flickr8k": ("Flicker8k_Dataset", "Flickr8k_Dataset", "Images", "images"),
    "flickr30k": ("flickr30k-images", "flickr30k_images", "Images", "images"),
    "coco": ("images", "coco", "."),
}


def load_karpathy(path: str, images: str | None = None) -> CaptionDataset:
    """Karpathy's split JSON: ``{"images": [{"filename", "filepath"?, "split", "sentences": [{"raw"}]}]}``.

    The image folder is ``images`` or the first of the usual names beside the JSON; COCO's
    ``filepath`` (``train2014``/``val2014``) is a subfolder of it (tried without, too).
    """
    name = os.path.basename(path)
    data = load_json(path)
    expected = 'expected {"images": [{"filename", "split", "sentences": [{"raw"}]}], "dataset": ...}'
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise DatasetError(f"{name}: {expected}")
    if not data["images"]:
        raise DatasetError(f"{name} lists no images: {expected}")
    kind = str(data.get("dataset") or re.sub(r"^dataset_|\.json$", "", name)).lower()
    root = os.path.dirname(os.path.abspath(path))
    image_dir = images or first_dir(root, _KARPATHY_IMAGE_DIRS.get(kind, ("Images", "images"))) or root
    notes: list[str] = []
    by_split: dict[str, list[tuple[str, list[str], str]]] = {s: [] for s in SPLITS}
    listing: dict[str, set[str]] = {}
    seen: set[str] = set()
    other_splits: dict[str, int] = defaultdict(int)
    no_captions = 0
    for index, entry in enumerate(data["images"]):
        if (
            not isinstance(entry, dict)
            or not isinstance(entry.get("filename"), str)
            or not isinstance(entry.get("sentences"), list)
        ):
            raise DatasetError(f"{name}: images[{index}]: {expected}")
        filepath = str(entry.get("filepath") or "")
        image_id = f"{filepath}/{entry['filename']}" if filepath and kind == "coco" else entry["filename"]
        split = canonical_split(str(entry.get("split", "")))
        if split is None:
            other_splits[str(entry.get("split"))] += 1
            continue
        captions = [
            str(s.get("raw") or " ".join(s.get("tokens") or [])).strip()
            for s in entry["sentences"]
            if isinstance(s, dict)
        ]
        captions = [c for c in captions if c]
        if not captions:
            no_captions += 1
            continue
        if image_id in seen:
            continue
        seen.add(image_id)
        image_path = os.path.join(image_dir, filepath, entry["filename"])
        if (
            filepath
            and entry["filename"] not in file_listing(os.path.join(image_dir, filepath), listing)
            and entry["filename"] in file_listing(image_dir, listing)
        ):
            image_path = os.path.join(image_dir, entry["filename"])
        by_split[split].append((image_id, captions, image_path))
    for split_name, count in sorted(other_splits.items()):
        notes.append(f"{name}: {count} images with unknown split {split_name!r}; left out")
    if no_captions:
        notes.append(f"{name}: {no_captions} images without sentences; left out")
    if any(e.get("split") == "restval" for e in data["images"] if isinstance(e, dict)):
        notes.append("Karpathy 'restval' images are counted as train")
    splits, missing = place_folder_records(by_split)
    dataset = CaptionDataset("karpathy", path, splits, missing, notes, label=kind)
    missing_notes(dataset, image_dir)
    return check_nonempty(dataset, path)


def karpathy_file(path: str) -> str:
    if os.path.isfile(path):
        return path
    found = sorted(glob.glob(os.path.join(glob.escape(path), "dataset_*.json")))
    if not found:
        raise DatasetError(f"{path}: no dataset_*.json (Karpathy split file)")
    if len(found) > 1:
        raise DatasetError(
            f"{path} holds several Karpathy split files; pass one: " + ", ".join(os.path.basename(f) for f in found)
        )
    return found[0]
