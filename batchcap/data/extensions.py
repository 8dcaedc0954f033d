"""Which file names are pictures and which are WebDataset shards: one list for run, train, calibrate and report."""

from __future__ import annotations

import os

#: Picture file extensions (lower case, with the dot). A folder's other files are listed as ignored.
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
#: The same, as WebDataset member extensions (no dot), in a fixed order of preference.
IMAGE_KEYS: tuple[str, ...] = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
#: File names read as WebDataset shards.
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")


def is_image_name(name: str) -> bool:
    """Whether ``name`` has one of the picture extensions (case-insensitive)."""
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


#: File names read as Parquet tables of encoded pictures (img2dataset, Hugging Face datasets).
TABLE_SUFFIXES = (".parquet", ".pq")


def is_table_name(name: str) -> bool:
    """Whether ``name`` is a Parquet file name (case-insensitive)."""
    return name.lower().endswith(TABLE_SUFFIXES)
