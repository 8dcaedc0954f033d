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

import glob
import os

from batchcap.data.captions.coco import coco_files, load_coco
from batchcap.data.captions.flickr8k import find_flickr_text_dir, flickr_root, load_flickr8k
from batchcap.data.captions.kaggle import load_kaggle
from batchcap.data.captions.karpathy import karpathy_file, load_karpathy
from batchcap.data.captions.records import CaptionDataset, DatasetError, load_json
from batchcap.data.captions.wds import load_wds

FORMATS = ("flickr8k", "kaggle", "karpathy", "coco", "wds")

LAYOUTS = """recognised layouts:
  flickr8k  DIR with Flickr8k.token.txt (directly or in Flickr8k_text/), Flickr_8k.*Images.txt split
            files, photos in Flicker8k_Dataset/, Flickr8k_Dataset/ or Images/
  kaggle    DIR with captions.txt (CSV, header image,caption) and Images/
  karpathy  dataset_flickr8k.json / dataset_flickr30k.json / dataset_coco.json (or a DIR with one)
  coco      captions_*.json (or a DIR with annotations/captions_*.json) and the image folders
  wds       WebDataset shards: a .tar, a brace pattern (shard-{000..009}.tar), a glob, or a DIR of .tar"""


# --------------------------------------------------------------------------- helpers


# --------------------------------------------------------------------------- Flickr8k (original)


# --------------------------------------------------------------------------- Kaggle Flickr8k


# --------------------------------------------------------------------------- Karpathy split JSON


# --------------------------------------------------------------------------- COCO caption JSON


# --------------------------------------------------------------------------- WebDataset shards


# --------------------------------------------------------------------------- image bytes


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
            data = load_json(path)
            if isinstance(data, dict) and isinstance(data.get("annotations"), list):
                return "coco"
            if (
                isinstance(data, dict)
                and isinstance(data.get("images"), list)
                and data["images"]
                and isinstance(data["images"][0], dict)
                and "sentences" in data["images"][0]
            ):
                return "karpathy"
    elif os.path.isdir(path):
        if find_flickr_text_dir(path) is not None:
            return "flickr8k"
        if os.path.isfile(os.path.join(path, "captions.txt")):
            return "kaggle"
        if glob.glob(os.path.join(glob.escape(path), "dataset_*.json")):
            return "karpathy"
        if coco_files(path):
            return "coco"
        if glob.glob(os.path.join(glob.escape(path), "*.tar")) or glob.glob(
            os.path.join(glob.escape(path), "*", "*.tar")
        ):
            return "wds"
    elif any(ch in path for ch in "{*?[") or path.endswith(".tar"):
        return "wds"
    else:
        raise DatasetError(f"{path}: no such file or folder\n{LAYOUTS}")
    raise DatasetError(f"{path}: not a recognised caption dataset\n{LAYOUTS}")


def load_caption_dataset(
    path: str | os.PathLike[str], format: str = "auto", *, images: str | os.PathLike[str] | None = None
) -> CaptionDataset:
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
        return load_flickr8k(flickr_root(path), image_dir)
    if fmt == "kaggle":
        if os.path.isfile(path):
            return load_kaggle(os.path.dirname(os.path.abspath(path)), image_dir, captions_file=path)
        return load_kaggle(path, image_dir)
    if fmt == "karpathy":
        return load_karpathy(karpathy_file(path), image_dir)
    if fmt == "coco":
        return load_coco(path, image_dir)
    if image_dir is not None:
        raise DatasetError("images= does not apply to WebDataset shards (the images are inside the tars)")
    return load_wds(path)
