"""Sources: folder walks, file lists, and WebDataset shards written with webdataset.TarWriter."""

from __future__ import annotations

import importlib.util
import io
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from conftest import write_images
from PIL import Image

from batchcap.config import ImagePolicy, Preprocess
from batchcap.data.inputs import fingerprinted
from batchcap.data.loader import iter_batches
from batchcap.data.sources import (
    FileEntry,
    FolderReader,
    Ignored,
    MemberEntry,
    ShardFailure,
    SourceError,
    TarReader,
    open_sources,
    shard_name,
)

PRE = Preprocess(input_size=(3, 16, 16), resize="squash", interpolation="bilinear")


def jpeg_bytes(seed: int, size: tuple[int, int] = (24, 20)) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def write_shards(folder: Path, shards: int, per_shard: int, prefix: str = "shards") -> list[Path]:
    """``shards`` tars of ``per_shard`` samples (jpg + txt), keys unique across shards."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for s in range(shards):
        path = folder / f"{prefix}-{s:04d}.tar"
        with wds.TarWriter(str(path)) as sink:
            for i in range(per_shard):
                sink.write({"__key__": f"s{s}_{i:03d}", "jpg": jpeg_bytes(s * 1000 + i), "txt": f"caption {i}"})
        paths.append(path)
    return paths


def collect(sources, **kw) -> tuple[dict[str, str], int, int]:
    seen: dict[str, str] = {}
    ignored = skipped = 0
    for batch in iter_batches(
        sources, PRE, ImagePolicy(), batch_size=kw.pop("batch_size", 5), workers=kw.pop("workers", 0), **kw
    ):
        for r in batch.ok + batch.failed:
            assert r.item.id not in seen, r.item.id
            seen[r.item.id] = r.status
        ignored += batch.ignored
        skipped += batch.skipped
    return seen, ignored, skipped


# -- folders -------------------------------------------------------------------------------


def test_folder_walk_is_sorted_recursive_and_relative(tmp_path: Path) -> None:
    write_images(tmp_path / "b", 2)
    write_images(tmp_path / "a" / "deep", 2, fmt="PNG")
    (tmp_path / "Z.JPG").write_bytes(jpeg_bytes(1))
    (tmp_path / "readme.md").write_text("hi")
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "x.png").write_bytes(b"")
    entries = list(FolderReader(str(tmp_path)).entries())
    ids = [e.item.id for e in entries if isinstance(e, FileEntry)]
    assert ids == ["Z.JPG", "a/deep/img00000.png", "a/deep/img00001.png", "b/img00000.jpg", "b/img00001.jpg"]
    assert sorted(e.path for e in entries if isinstance(e, Ignored)) == [".git", "readme.md"]
    item = fingerprinted(next(e.item for e in entries if isinstance(e, FileEntry)))
    st = os.stat(tmp_path / "Z.JPG")
    assert (item.size, item.mtime_ns) == (st.st_size, st.st_mtime_ns)
    assert ids == [e.item.id for e in FolderReader(str(tmp_path)).entries() if isinstance(e, FileEntry)]


def test_symlinked_directories_are_followed_once(tmp_path: Path) -> None:
    write_images(tmp_path / "real", 2)
    os.symlink("real", tmp_path / "alias")  # same directory twice: walked once
    os.symlink("..", tmp_path / "real" / "up")  # a loop back to the root
    ids = [e.item.id for e in FolderReader(str(tmp_path)).entries() if isinstance(e, FileEntry)]
    assert ids == ["alias/img00000.jpg", "alias/img00001.jpg"]


def test_files_from_lists_paths_as_given(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    paths = write_images(tmp_path / "p", 3)
    listing = tmp_path / "list.txt"
    listing.write_text(f"{paths[0]}\n\n{paths[2]}\r\n{tmp_path / 'gone.jpg'}\n{tmp_path / 'list.txt'}\n")
    sources = open_sources([], files_from=str(listing))
    assert sources.count() == 4
    seen, _, _ = collect(sources)
    assert seen == {
        str(paths[0]): "ok",
        str(paths[2]): "ok",
        str(tmp_path / "gone.jpg"): "missing",
        str(tmp_path / "list.txt"): "unsupported",
    }

    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(f"{paths[1]}\n".encode())))
    seen, _, _ = collect(open_sources([], files_from="-"))
    assert seen == {str(paths[1]): "ok"}


def test_bad_specs_are_user_errors(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("x")
    for spec in (
        str(tmp_path / "nope"),
        str(tmp_path / "*.tar"),
        str(tmp_path / "notes.txt"),
        str(tmp_path / "s-{0000..0003}.tar"),
    ):
        with pytest.raises(SourceError):
            open_sources([spec])
    with pytest.raises(SourceError):
        open_sources([])
    with pytest.raises(SourceError):
        open_sources([], files_from=str(tmp_path / "missing.txt"))


def test_single_picture_spec(tmp_path: Path) -> None:
    (path,) = write_images(tmp_path, 1)
    assert collect(open_sources([str(path)]))[0] == {str(path): "ok"}


# -- WebDataset shards ---------------------------------------------------------------------


def test_several_shards_by_brace_glob_and_path(tmp_path: Path) -> None:
    write_shards(tmp_path, 3, 4)
    expected = {f"shards-{s:04d}.tar/s{s}_{i:03d}": "ok" for s in range(3) for i in range(4)}
    for spec in (
        [str(tmp_path / "shards-{0000..0002}.tar")],
        [str(tmp_path / "shards-*.tar")],
        [str(p) for p in sorted(tmp_path.glob("*.tar"))],
    ):
        sources = open_sources(spec)
        assert sources.count() is None
        seen, _, _ = collect(sources)
        assert seen == expected, spec


def test_pipe_url(tmp_path: Path) -> None:
    (path,) = write_shards(tmp_path, 1, 3)
    seen, _, _ = collect(open_sources([f"pipe:cat {path}"]))
    assert seen == {f"shards-0000.tar/s0_{i:03d}": "ok" for i in range(3)}
    seen, _, _ = collect(open_sources([f"pipe:cat {tmp_path / 'absent.tar'} 2>/dev/null"]))
    assert seen == {"absent.tar": "shard_error"}


def test_truncated_shard_yields_samples_before_the_damage_and_one_error(tmp_path: Path) -> None:
    paths = write_shards(tmp_path, 3, 6)
    data = paths[1].read_bytes()
    paths[1].write_bytes(data[: len(data) // 2])
    seen, _, _ = collect(open_sources([str(tmp_path / "shards-{0000..0002}.tar")]))
    broken = {k: v for k, v in seen.items() if k.startswith("shards-0001.tar")}
    assert broken.pop("shards-0001.tar") == "shard_error"
    assert 1 <= len(broken) < 6 and set(broken.values()) == {"ok"}
    keys = sorted(broken)
    assert keys == [f"shards-0001.tar/s1_{i:03d}" for i in range(len(keys))]  # a prefix of the shard
    for s in (0, 2):  # the job went on
        assert sum(k.startswith(f"shards-{s:04d}.tar/") for k in seen) == 6


def test_garbage_shard_is_one_error_row(tmp_path: Path) -> None:
    bad = tmp_path / "garbage.tar"
    bad.write_bytes(b"\x01" * 3000)
    entries = list(TarReader((str(bad),)).read_shard(str(bad)))
    assert len(entries) == 1 and isinstance(entries[0], ShardFailure)
    assert entries[0].item.id == "garbage.tar" and "\n" not in entries[0].error


def test_image_key_choice_and_samples_without_image(tmp_path: Path) -> None:
    path = tmp_path / "mixed.tar"
    png = io.BytesIO()
    Image.new("RGB", (8, 8), (0, 0, 255)).save(png, "PNG")
    with wds.TarWriter(str(path)) as sink:
        sink.write({"__key__": "both", "png": png.getvalue(), "jpg": jpeg_bytes(0)})
        sink.write({"__key__": "meta", "json": b"{}"})
    entries = list(TarReader((str(path),)).read_shard(str(path)))
    assert [e.item.id for e in entries] == ["mixed.tar/both", "mixed.tar/meta"]
    assert isinstance(entries[0], MemberEntry) and entries[0].data == jpeg_bytes(0)
    entries = list(TarReader((str(path),), image_keys=("png",)).read_shard(str(path)))
    assert entries[0].data == png.getvalue()
    seen, _, _ = collect(open_sources([str(path)]))
    assert seen == {"mixed.tar/both": "ok", "mixed.tar/meta": "unsupported"}
    policy = ImagePolicy(image_keys=("png",))
    assert open_sources([str(path)], policy=policy).readers[0].image_keys == ("png",)


def test_shard_name() -> None:
    assert shard_name("/data/x/shards-0001.tar") == "shards-0001.tar"
    assert shard_name("pipe:curl -s https://host/a/b-01.tar") == "b-01.tar"
    assert shard_name("https://host/a/c.tar?token=1") == "c.tar"


def test_done_skips_unchanged_files_and_known_members(tmp_path: Path) -> None:
    paths = write_images(tmp_path / "p", 3)
    st = [os.stat(p) for p in paths]
    done = {
        "img00000.jpg": (st[0].st_size, st[0].st_mtime_ns),
        "img00001.jpg": (st[1].st_size, st[1].st_mtime_ns - 1),
    }  # changed since: redone
    seen, _, skipped = collect(open_sources([str(tmp_path / "p")]), done=done)
    assert set(seen) == {"img00001.jpg", "img00002.jpg"} and skipped == 1
    write_shards(tmp_path / "t", 1, 3)
    seen, _, skipped = collect(
        open_sources([str(tmp_path / "t" / "shards-0000.tar")]), done={"shards-0000.tar/s0_001": (None, None)}
    )
    assert set(seen) == {"shards-0000.tar/s0_000", "shards-0000.tar/s0_002"} and skipped == 1


# -- ids across sources (--id-from) ----------------------------------------------------------


def test_one_source_keeps_relative_ids_and_several_are_told_apart(tmp_path: Path) -> None:
    for year in ("2023", "2024"):
        write_images(tmp_path / "data" / year / "photos", 2)
    a, b = (str(tmp_path / "data" / y / "photos") for y in ("2023", "2024"))
    one = open_sources([a])
    assert one.id_scheme == "relative"
    assert sorted(collect(one)[0]) == ["img00000.jpg", "img00001.jpg"]
    two = open_sources([a, b])
    assert two.id_scheme == "source-relative" and not two.may_collide
    assert sorted(collect(two)[0]) == [f"{y}/photos/img0000{i}.jpg" for y in ("2023", "2024") for i in (0, 1)]
    pictures = [str(p) for p in sorted(Path(a).iterdir())]
    assert open_sources(pictures).id_scheme == "relative"  # `photos/*.jpg`: the paths as given, as always
    assert sorted(collect(open_sources(pictures))[0]) == pictures
    with pytest.raises(SourceError, match="is inside"):
        open_sources([*pictures, str(tmp_path / "data")])
    absolute = open_sources([a, b], id_from="absolute")
    assert sorted(collect(absolute)[0]) == sorted(f"{d}/img0000{i}.jpg" for d in (a, b) for i in (0, 1))
    relative = open_sources([a, b], id_from="relative")
    assert relative.may_collide
    seen, _, _ = collect(relative, workers=2)
    assert seen == {"img00000.jpg": "ok", "img00001.jpg": "ok", "img00000.jpg#2": "duplicate_id",
                    "img00001.jpg#2": "duplicate_id"}  # fmt: skip


def test_shards_of_one_name_get_their_folders_as_labels(tmp_path: Path) -> None:
    x = write_shards(tmp_path / "x", 1, 2)[0]
    y = write_shards(tmp_path / "y", 1, 2)[0]
    seen, _, _ = collect(open_sources([str(x), str(y)]))
    assert sorted(seen) == [f"{d}/shards-0000.tar/s0_00{i}" for d in ("x", "y") for i in (0, 1)]
    with pytest.raises(SourceError, match="would both give ids shards-0000.tar"):
        open_sources([str(x), str(y)], id_from="relative")
    with pytest.raises(SourceError, match="given twice"):
        open_sources([str(x), str(x)])


def test_a_list_with_a_folder_tracks_repeats(tmp_path: Path) -> None:
    paths = write_images(tmp_path / "p", 2)
    listing = tmp_path / "list.txt"
    listing.write_text(f"{paths[1]}\n{paths[1]}\n")
    sources = open_sources([str(tmp_path / "p")], files_from=str(listing))
    assert sources.may_collide and sources.count() == 4
    seen, _, _ = collect(sources)
    assert seen == {"p/img00000.jpg": "ok", "p/img00001.jpg": "ok", str(paths[1]): "ok",
                    f"{paths[1]}#2": "duplicate_id"}  # fmt: skip
    surveyed = sources.surveyed()  # what a run does: workers then remember only the repeated ids
    assert surveyed.repeated == {str(paths[1])}
    assert collect(surveyed, workers=2)[0] == seen
    assert open_sources([str(tmp_path / "p")]).surveyed().repeated is None  # one folder: nothing to survey


@pytest.mark.parametrize(
    "spec, says",
    [
        ("anything://n/x.tar", "fsspec knows no such protocol"),
        ("nosuch://bucket/photos/", "fsspec knows no such protocol"),
    ],
)
def test_a_url_no_reader_opens_is_refused(spec: str, says: str) -> None:
    with pytest.raises(SourceError, match=says):
        open_sources([spec])
    with pytest.raises(SourceError, match=says):
        open_sources([], files_from=spec)


def test_a_url_whose_filesystem_is_not_installed_names_the_extra() -> None:
    if importlib.util.find_spec("gcsfs") is not None:
        pytest.skip("gcsfs is installed here")
    with pytest.raises(SourceError, match=r'pip install "batchcap\[gcs\]"'):
        open_sources(["gs://b/x-{0..3}.tar"])
