"""Picture ids on the real CLI: unique by construction across sources, and never a silent overwrite.

Two folders (or two tars) holding the same names used to give the same ids: one row of each
pair was dropped in silence and every rerun captioned them again.
"""

from __future__ import annotations

import io
import json
import re
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import webdataset as wds
from conftest import write_images
from PIL import Image
from test_resume import command, read_rows, run

from batchcap.outputs.schema import METADATA_KEY
from batchcap.pipeline.progress import EXIT_OK, EXIT_RESUME_REFUSED, EXIT_USAGE


def jpeg(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def two_cameras(root: Path) -> list[Path]:
    """``cam2023`` and ``cam2024``, both holding ``IMG_00000.jpg`` ... ``IMG_00002.jpg`` (other pixels)."""
    folders = [root / "cam2023", root / "cam2024"]
    for seed, folder in enumerate(folders):
        write_images(folder, 3, seed=seed, prefix="IMG_")
    return folders


def rerun_finds_nothing(cmd: list[str], out: Path) -> None:
    before = read_rows(out)
    proc = run(cmd)
    assert proc.returncode == EXIT_OK, proc.stdout
    assert "nothing new" in proc.stdout and re.search(r"captioned now:\s+0\n", proc.stdout), proc.stdout
    assert read_rows(out) == before


def test_same_names_in_two_folders_are_each_captioned_once(tmp_path: Path, tiny_model_path: Path) -> None:
    folders = two_cameras(tmp_path)
    out = tmp_path / "o.parquet"
    cmd = command(folders, out, tiny_model_path, "--workers", "2")
    proc = run(cmd)
    assert proc.returncode == EXIT_OK, proc.stdout
    rows = read_rows(out)
    assert sorted(r["id"] for r in rows) == [f"{c}/IMG_{i:05d}.jpg" for c in ("cam2023", "cam2024") for i in range(3)]
    assert all(r["status"] == "ok" for r in rows)
    assert {r["source"] for r in rows} == {str(f / f"IMG_{i:05d}.jpg") for f in folders for i in range(3)}
    meta = json.loads(pq.read_schema(out).metadata[METADATA_KEY.encode()])
    assert meta["resume_settings"]["id_from"] == "source-relative"
    rerun_finds_nothing(cmd, out)


def write_shard(path: Path, keys: list[str], seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with wds.TarWriter(str(path)) as sink:
        for i, key in enumerate(keys):
            sink.write({"__key__": key, "jpg": jpeg(seed * 100 + i)})


def test_same_shard_names_in_two_folders_are_each_captioned_once(tmp_path: Path, tiny_model_path: Path) -> None:
    shards = [tmp_path / "2023" / "shard-0000.tar", tmp_path / "2024" / "shard-0000.tar"]
    for seed, shard in enumerate(shards):
        write_shard(shard, ["a", "b", "c"], seed)
    out = tmp_path / "o.parquet"
    cmd = command(shards, out, tiny_model_path)
    proc = run(cmd)
    assert proc.returncode == EXIT_OK, proc.stdout
    rows = read_rows(out)
    assert sorted(r["id"] for r in rows) == [f"{y}/shard-0000.tar/{k}" for y in ("2023", "2024") for k in "abc"]
    assert all(r["status"] == "ok" for r in rows)
    rerun_finds_nothing(cmd, out)


def test_one_source_keeps_its_ids_and_an_output_from_before_resumes(tmp_path: Path, tiny_model_path: Path) -> None:
    folder = tmp_path / "photos"
    write_images(folder, 3)
    out = tmp_path / "o.parquet"
    cmd = command([folder], out, tiny_model_path)
    assert run(cmd).returncode == EXIT_OK
    assert sorted(r["id"] for r in read_rows(out)) == sorted(p.name for p in folder.iterdir())
    # An output written before the id scheme was recorded among the resume settings.
    table = pq.read_table(out)
    meta = json.loads(table.schema.metadata[METADATA_KEY.encode()])
    del meta["resume_settings"]["id_from"]
    pq.write_table(table.replace_schema_metadata({METADATA_KEY: json.dumps(meta)}), out)
    rerun_finds_nothing(cmd, out)


def test_a_path_listed_twice_is_one_caption_and_one_duplicate_row(tmp_path: Path, tiny_model_path: Path) -> None:
    paths = write_images(tmp_path / "photos", 3)
    listing = tmp_path / "list.txt"
    listing.write_text("\n".join(map(str, [paths[0], paths[1], paths[0], paths[2], paths[0]])) + "\n")
    out = tmp_path / "o.parquet"
    cmd = command([], out, tiny_model_path, "--files-from", str(listing), "--workers", "2", "--max-failures", "10")
    proc = run(cmd)
    assert proc.returncode == EXIT_OK, proc.stdout
    rows = {r["id"]: r for r in read_rows(out)}
    first = str(paths[0])
    assert sorted(rows) == sorted([first, str(paths[1]), str(paths[2]), f"{first}#2", f"{first}#3"])
    assert rows[first]["status"] == "ok"
    for dup in (f"{first}#2", f"{first}#3"):
        assert rows[dup]["status"] == "duplicate_id" and rows[dup]["caption"] is None
        assert first in rows[dup]["error"] and "already has" in rows[dup]["error"]
    assert "duplicate_id" in proc.stdout  # counted among the failures in the summary
    rerun_finds_nothing(cmd, out)


def test_a_key_repeated_in_a_tar_is_a_duplicate_row(tmp_path: Path, tiny_model_path: Path) -> None:
    shard = tmp_path / "shard.tar"
    with tarfile.open(shard, "w") as tar:  # the members of sample "a" are not stored together
        for name, data in (("a.jpg", jpeg(1)), ("b.jpg", jpeg(2)), ("a.png", jpeg(3))):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    out = tmp_path / "o.parquet"
    cmd = command([shard], out, tiny_model_path, "--max-failures", "10")
    assert run(cmd).returncode == EXIT_OK
    rows = {r["id"]: r for r in read_rows(out)}
    assert sorted(rows) == ["shard.tar/a", "shard.tar/a#2", "shard.tar/b"]
    assert rows["shard.tar/a"]["status"] == "ok"
    assert rows["shard.tar/a#2"]["status"] == "duplicate_id" and "twice" in rows["shard.tar/a#2"]["error"]
    rerun_finds_nothing(cmd, out)


def test_relative_ids_that_collide_become_duplicate_rows(tmp_path: Path, tiny_model_path: Path) -> None:
    folders = two_cameras(tmp_path)
    out = tmp_path / "o.parquet"
    cmd = command(folders, out, tiny_model_path, "--id-from", "relative", "--max-failures", "10")
    assert run(cmd).returncode == EXIT_OK
    rows = {r["id"]: r for r in read_rows(out)}
    assert len(rows) == 6
    for i in range(3):
        name = f"IMG_{i:05d}.jpg"
        assert rows[name]["status"] == "ok" and rows[name]["source"] == str(folders[0] / name)
        dup = rows[f"{name}#2"]
        assert dup["status"] == "duplicate_id" and dup["source"] == str(folders[1] / name)
        assert str(folders[0] / name) in dup["error"] and str(folders[1] / name) in dup["error"]
    rerun_finds_nothing(cmd, out)


def test_resuming_with_another_id_scheme_is_refused(tmp_path: Path, tiny_model_path: Path) -> None:
    folders = two_cameras(tmp_path)
    out = tmp_path / "o.parquet"
    assert run(command(folders, out, tiny_model_path)).returncode == EXIT_OK
    proc = run(command(folders, out, tiny_model_path, "--id-from", "absolute"))
    assert proc.returncode == EXIT_RESUME_REFUSED, proc.stdout
    assert '--id-from: "source-relative" -> "absolute"' in proc.stdout
    assert "pass --id-from source-relative to continue it" in proc.stdout


def test_sources_that_would_collide_as_a_whole_are_refused(tmp_path: Path, tiny_model_path: Path) -> None:
    folders = two_cameras(tmp_path)
    write_images(folders[0] / "sub", 1)
    out = tmp_path / "o.parquet"
    for sources, words in (
        ([folders[0], folders[0] / "sub"], "inside"),
        ([folders[0], folders[0]], "same"),
    ):
        proc = run(command(sources, out, tiny_model_path))
        assert proc.returncode == EXIT_USAGE and words in proc.stdout and "Traceback" not in proc.stdout, proc.stdout
    shards = [tmp_path / "x" / "s.tar", tmp_path / "y" / "s.tar"]
    for seed, shard in enumerate(shards):
        write_shard(shard, ["a"], seed)
    proc = run(command(shards, out, tiny_model_path, "--id-from", "relative"))
    assert proc.returncode == EXIT_USAGE, proc.stdout
    assert str(shards[0]) in proc.stdout and str(shards[1]) in proc.stdout and "--id-from" in proc.stdout
    assert not out.exists()
