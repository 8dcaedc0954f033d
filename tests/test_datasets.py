"""Caption dataset readers: a tiny fixture per layout written in tmp_path, plus the real Flickr8k text files."""
from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from batchcap.datasets import (
    CaptionDataset,
    DatasetError,
    detect_format,
    hash_split,
    load_caption_dataset,
    read_image_bytes,
)
from tests.conftest import shared_path


def _jpeg(path: Path, colour: tuple[int, int, int] = (200, 30, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 6), colour).save(path, format="JPEG")
    return path


# --------------------------------------------------------------------------- original Flickr8k


def make_flickr8k(root: Path, text_dir: str = "Flickr8k_text", image_dir: str = "Flicker8k_Dataset",
                  crlf: bool = True, absent: tuple[str, ...] = ("t0.jpg",)) -> Path:
    """Six captioned images (2 train, 2 dev, 2 test) + the bogus id; ``absent`` photos are not written."""
    names = {"train": ["a0.jpg", "a1.jpg"], "dev": ["d0.jpg", "d1.jpg"], "test": ["t0.jpg", "t1.jpg"]}
    lines = []
    for split_names in names.values():
        for name in split_names:
            lines += [f"{name}#{n}\tA caption {n} of {name} , with a comma ." for n in range(5)]
    lines += [f"2258277193_586949ec62.jpg.1#{n}\tpeople waiting for the subway" for n in range(5)]
    end = "\r\n" if crlf else "\n"
    text = root / text_dir
    text.mkdir(parents=True, exist_ok=True)
    (text / "Flickr8k.token.txt").write_bytes((end.join(lines) + end).encode())
    for split, file_split in (("train", "train"), ("dev", "dev"), ("test", "test")):
        (text / f"Flickr_8k.{file_split}Images.txt").write_text("\n".join(names[split]) + "\n")
    for split_names in names.values():
        for name in split_names:
            if name not in absent:
                _jpeg(root / image_dir / name)
    return root


def test_flickr8k_layout_splits_captions_and_missing(tmp_path: Path) -> None:
    root = make_flickr8k(tmp_path / "f8k")
    assert detect_format(str(root)) == "flickr8k"
    ds = load_caption_dataset(root)
    assert isinstance(ds, CaptionDataset) and ds.format == "flickr8k"
    assert [r.image_id for r in ds.splits["train"]] == ["a0.jpg", "a1.jpg"]
    assert [r.image_id for r in ds.splits["val"]] == ["d0.jpg", "d1.jpg"]  # dev -> val
    assert [r.image_id for r in ds.splits["test"]] == ["t1.jpg"]
    assert ds.missing == {"train": [], "val": [], "test": ["t0.jpg"]}
    record = ds.splits["train"][0]
    assert record.captions[0] == "A caption 0 of a0.jpg , with a comma ."  # CRLF gone, text raw
    assert len(record.captions) == 5
    assert record.path == str(root / "Flicker8k_Dataset" / "a0.jpg")
    assert read_image_bytes(record)[:2] == b"\xff\xd8"
    assert any("bogus id 2258277193_586949ec62.jpg.1" in n for n in ds.notes)
    assert any("test: 1 of 2 listed images not found" in n for n in ds.notes)
    summary = ds.summary()
    assert summary["splits"]["test"] == {"images": 1, "captions": 5, "missing": 1}
    assert summary["format"] == "flickr8k" and summary["root"] == str(root)


@pytest.mark.parametrize("image_dir", ["Flickr8k_Dataset", "Images"])
def test_flickr8k_flat_text_files_and_other_image_folders(tmp_path: Path, image_dir: str) -> None:
    root = make_flickr8k(tmp_path / "f8k", text_dir=".", image_dir=image_dir, crlf=False, absent=())
    ds = load_caption_dataset(root, "flickr8k")
    assert [len(ds.splits[s]) for s in ("train", "val", "test")] == [2, 2, 2]
    assert not any(ds.missing.values())


def test_flickr8k_given_token_file_and_images_override(tmp_path: Path) -> None:
    root = make_flickr8k(tmp_path / "f8k", image_dir="elsewhere", absent=())
    ds = load_caption_dataset(root / "Flickr8k_text" / "Flickr8k.token.txt", images=root / "elsewhere")
    assert len(ds.splits["train"]) == 2 and not any(ds.missing.values())


def test_flickr8k_without_split_files_splits_by_hash(tmp_path: Path) -> None:
    root = make_flickr8k(tmp_path / "f8k", absent=())
    for path in (root / "Flickr8k_text").glob("Flickr_8k.*Images.txt"):
        path.unlink()
    ds = load_caption_dataset(root)
    for split, records in ds.splits.items():
        assert all(hash_split(r.image_id) == split for r in records)
    assert sum(len(r) for r in ds.splits.values()) == 6
    assert any("deterministic 90/5/5 split" in n for n in ds.notes)


def test_flickr8k_malformed_and_empty_token_files_are_refused(tmp_path: Path) -> None:
    root = make_flickr8k(tmp_path / "f8k")
    token = root / "Flickr8k_text" / "Flickr8k.token.txt"
    lines = token.read_bytes().split(b"\r\n")
    lines[16] = b"d1.jpg a caption without the hash and tab"
    token.write_bytes(b"\r\n".join(lines))
    with pytest.raises(DatasetError, match=r"Flickr8k.token.txt line 17: expected IMAGE#N<TAB>caption"):
        load_caption_dataset(root)
    token.write_bytes(b"\r\n\r\n")
    with pytest.raises(DatasetError, match="no captions"):
        load_caption_dataset(root)


def test_nothing_found_lists_layouts(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="recognised layouts") as info:
        load_caption_dataset(tmp_path / "empty")
    assert "captions.txt" in str(info.value) and "dataset_flickr8k.json" in str(info.value)
    with pytest.raises(DatasetError, match="unknown dataset format"):
        load_caption_dataset(tmp_path / "empty", "imagenet")


def test_hash_split_is_stable_and_roughly_90_5_5() -> None:
    assert hash_split("1000268201_693b08cb0e.jpg") == hash_split("1000268201_693b08cb0e.jpg")
    counts = {"train": 0, "val": 0, "test": 0}
    for i in range(4000):
        counts[hash_split(f"img{i}.jpg")] += 1
    assert 3500 < counts["train"] < 3700 and 120 < counts["val"] < 280 and 120 < counts["test"] < 280


# --------------------------------------------------------------------------- the real files in ../shared


def test_real_flickr8k_full() -> None:
    root = shared_path("data", "flickr8k")
    ds = load_caption_dataset(root)
    # The official lists: 6000 train / 1000 dev / 1000 test. Two train ids (99679241_adc853a5c0.jpg,
    # 861795382_5145ad433d.jpg) have no captions in this token file: noted and left out.
    assert len(ds.splits["train"]) == 5998 and len(ds.splits["val"]) == 1000
    assert all(len(r.captions) == 5 for s in ("train", "val") for r in ds.splits[s])
    assert ds.splits["test"] == [] and len(ds.missing["test"]) == 1000  # held out on purpose
    assert ds.missing["train"] == [] and ds.missing["val"] == []
    assert any("99679241_adc853a5c0.jpg" in n for n in ds.notes)
    assert any("bogus id 2258277193_586949ec62.jpg.1" in n for n in ds.notes)
    assert not {r.image_id for r in ds.splits["train"]} & {r.image_id for r in ds.splits["val"]}


def test_real_flickr8k_sample() -> None:
    root = shared_path("data", "flickr8k-sample")
    ds = load_caption_dataset(root)
    assert ds.format == "flickr8k"
    present = len(ds.splits["train"]) + len(ds.splits["val"]) + len(ds.splits["test"])
    assert present == 94
    assert read_image_bytes(ds.splits["val"][0])[:2] == b"\xff\xd8"
