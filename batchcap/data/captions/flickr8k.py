"""The original Flickr8k release: ``Flickr8k.token.txt`` (``IMAGE#N<TAB>caption``), the official
``Flickr_8k.{train,dev,test}Images.txt`` split files and the photo folder. The same token format
carries caption text without photos (Flickr30k, COCO) for language-model pretraining.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator

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

_FLICKR_TEXT_DIRS = (".", "Flickr8k_text", "Flickr8k_text/Flickr8k_text", "text")


FLICKR_IMAGE_DIRS = (
    "Flicker8k_Dataset",
    "Flickr8k_Dataset",
    "Images",
    "images",
    "Flicker8k_Dataset/Flicker8k_Dataset",
    "Flickr8k_Dataset/Flicker8k_Dataset",
)


TOKEN_LINE = re.compile(r"^(?P<image>[^\t]+)#(?P<n>\d+)\t(?P<caption>.*)$")


def find_flickr_text_dir(root: str) -> str | None:
    for name in _FLICKR_TEXT_DIRS:
        folder = os.path.normpath(os.path.join(root, name))
        if os.path.isfile(os.path.join(folder, "Flickr8k.token.txt")):
            return folder
    return None


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
        raise DatasetError(
            f"{name}: not UTF-8 text ({error.reason} at byte {error.start}); expected lines of IMAGE#N<TAB>caption"
        ) from None

    def pairs() -> Iterator[tuple[str, str]]:
        for lineno, line in enumerate(lines, start=1):
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            match = TOKEN_LINE.match(line)
            if match is None:
                raise DatasetError(f"{name} line {lineno}: expected IMAGE#N<TAB>caption, got {line[:80]!r}")
            yield match["image"].strip(), match["caption"].strip()

    return group_captions(pairs(), name, notes, "lines of IMAGE#N<TAB>caption")


def load_flickr8k(root: str, images: str | None = None) -> CaptionDataset:
    """The original Flickr8k release under ``root`` (text files directly there or in ``Flickr8k_text/``)."""
    text_dir = find_flickr_text_dir(root)
    if text_dir is None:
        raise DatasetError(f"{root}: no Flickr8k.token.txt (looked in {', '.join(_FLICKR_TEXT_DIRS)})")
    notes: list[str] = []
    token_path = os.path.join(text_dir, "Flickr8k.token.txt")
    captions = read_flickr8k_tokens(token_path, notes)
    split_files = find_flickr_split_files([text_dir, root])
    ids = official_or_hash_split(captions, split_files, notes, "Flickr8k.token.txt")
    image_dir = images or first_dir(root, FLICKR_IMAGE_DIRS)
    if image_dir is None:
        image_dir = text_dir
        notes.append(
            f"no image folder ({', '.join(FLICKR_IMAGE_DIRS[:3])}) under {root}: "
            f"looking for photos beside the text files"
        )
    by_split = {s: [(i, captions[i], os.path.join(image_dir, i)) for i in ids[s]] for s in SPLITS}
    splits, missing = place_folder_records(by_split)
    dataset = CaptionDataset("flickr8k", root, splits, missing, notes)
    missing_notes(dataset, image_dir)
    return check_nonempty(dataset, token_path)


def flickr_root(path: str) -> str:
    """The dataset folder, also when given the token file or the ``Flickr8k_text`` folder itself."""
    if os.path.isfile(path):
        path = os.path.dirname(os.path.abspath(path))
    if os.path.basename(os.path.normpath(path)) == "Flickr8k_text":
        return os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(path):
        raise DatasetError(f"{path}: no such folder")
    return path
