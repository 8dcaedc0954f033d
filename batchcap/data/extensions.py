"""Which file names are pictures and which are WebDataset shards: one list for run, train, calibrate and report.

And what lets Pillow open every picture format listed here (:func:`enable_heif`).
"""

from __future__ import annotations

import functools
import os
import re

#: Picture file extensions (lower case, with the dot). A folder's other files are listed as ignored.
#: HEIC/HEIF (iPhones) are read through pillow-heif, AVIF by Pillow itself.
IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".heic", ".heif", ".avif"}
)
#: The same, as WebDataset member extensions (no dot), in a fixed order of preference.
IMAGE_KEYS: tuple[str, ...] = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff", "heic", "heif", "avif")
#: File names read as WebDataset shards.
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")


def is_image_name(name: str) -> bool:
    """Whether ``name`` has one of the picture extensions (case-insensitive)."""
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


def url_scheme(spec: str) -> str | None:
    """The scheme of ``scheme://...`` (lower case), ``pipe`` for ``pipe:``, None for a path."""
    if spec.startswith("pipe:"):
        return "pipe"
    match = _SCHEME.match(spec)
    return match.group(1).lower() if match else None


def is_remote(spec: str) -> bool:
    """Whether ``spec`` is a URL read through fsspec (``s3://``, ``gs://``, ``https://``), not a path or ``pipe:``."""
    return url_scheme(spec) not in (None, "pipe")


#: File names read as Parquet tables of encoded pictures (img2dataset, Hugging Face datasets).
TABLE_SUFFIXES = (".parquet", ".pq")


def is_table_name(name: str) -> bool:
    """Whether ``name`` is a Parquet file name (case-insensitive)."""
    return name.lower().endswith(TABLE_SUFFIXES)


@functools.cache
def enable_heif() -> bool:
    """Teach Pillow HEIC/HEIF (iPhone photos) through pillow-heif, once per process; False without it.

    Called where pictures are opened, so that a DataLoader worker registers it too however it
    was started. pillow-heif applies the HEIF rotation and mirroring itself and resets the
    EXIF orientation to 1, so the orientation is never applied twice. AVIF needs nothing:
    Pillow reads it (and its EXIF orientation) natively.
    """
    try:
        from pillow_heif import register_heif_opener
    except ImportError:
        return False
    register_heif_opener()
    return True
