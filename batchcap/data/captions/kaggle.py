"""Kaggle's Flickr8k: ``captions.txt`` (CSV, header ``image,caption``) and ``Images/``."""

from __future__ import annotations

import csv
import os
from collections.abc import Iterator

from batchcap.data.captions.flickr8k import FLICKR_IMAGE_DIRS
from batchcap.data.captions.records import (
    SPLITS,
    CaptionDataset,
    DatasetError,
    check_nonempty,
    find_flickr_split_files,
    first_dir,
    group_captions,
    missing_notes,
    official_or_hash_split,
    place_folder_records,
)


def read_kaggle_captions(path: str, notes: list[str]) -> dict[str, list[str]]:
    """Captions per image from Kaggle's ``captions.txt`` (CSV, header ``image,caption``).

    Parsed with :mod:`csv`, so quoted captions may hold commas and quotes; an unquoted caption
    with commas is joined back (image names hold no commas).
    """
    try:
        return _read_kaggle_captions(path, notes)
    except (csv.Error, UnicodeDecodeError) as error:
        raise DatasetError(f"{os.path.basename(path)}: not a UTF-8 CSV with header image,caption ({error})") from None


def _read_kaggle_captions(path: str, notes: list[str]) -> dict[str, list[str]]:
    name = os.path.basename(path)
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f, strict=True)
        header = next(reader, None)
        if header is None:
            raise DatasetError(f"{name} is empty: expected a CSV with header image,caption")
        if [h.strip().lower() for h in header[:2]] != ["image", "caption"]:
            raise DatasetError(f"{name} line 1: expected the header image,caption, got {','.join(header)[:80]!r}")

        def pairs() -> Iterator[tuple[str, str]]:
            for row in reader:
                if not row or not any(cell.strip() for cell in row):
                    continue
                if len(row) < 2 or not row[0].strip():
                    raise DatasetError(
                        f"{name} line {reader.line_num}: expected image,caption, got {','.join(row)[:80]!r}"
                    )
                yield row[0].strip(), ",".join(row[1:]).strip()

        return group_captions(pairs(), name, notes, "a CSV with header image,caption")


def load_kaggle(root: str, images: str | None = None, captions_file: str | None = None) -> CaptionDataset:
    """Kaggle's Flickr8k (``captions.txt`` + ``Images/``); official split files are used when beside it."""
    captions_path = captions_file or os.path.join(root, "captions.txt")
    if not os.path.isfile(captions_path):
        raise DatasetError(f"{root}: no captions.txt (Kaggle Flickr8k layout: captions.txt + Images/)")
    notes: list[str] = []
    captions = read_kaggle_captions(captions_path, notes)
    split_files = find_flickr_split_files([root, os.path.join(root, "Flickr8k_text")])
    ids = official_or_hash_split(captions, split_files, notes, os.path.basename(captions_path))
    image_dir = images or first_dir(root, ("Images", "images") + FLICKR_IMAGE_DIRS[:2]) or root
    by_split = {s: [(i, captions[i], os.path.join(image_dir, i)) for i in ids[s]] for s in SPLITS}
    splits, missing = place_folder_records(by_split)
    dataset = CaptionDataset("kaggle", root, splits, missing, notes)
    missing_notes(dataset, image_dir)
    return check_nonempty(dataset, captions_path)
