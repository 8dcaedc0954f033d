"""What a run reads and what it passes over, on the real CLI: iPhone and AVIF photos are captioned,
and the files that are not pictures are named, not only counted."""

from __future__ import annotations

import re
from pathlib import Path

from conftest import write_images, write_oriented
from test_resume import command, read_rows, run

from batchcap.pipeline.progress import EXIT_OK


def test_heic_and_avif_are_captioned_and_ignored_files_are_named(tmp_path: Path, tiny_model_path: Path) -> None:
    folder = tmp_path / "phone"
    write_images(folder, 1)
    for name in ("IMG_0001.HEIC", "IMG_0002.heic", "IMG_0003.heif", "IMG_0004.avif"):
        write_oriented(folder / name, orientation=6, size=(40, 20))
    (folder / "notes.txt").write_text("not a picture")
    (folder / "raw").mkdir()
    for name in ("a.CR2", "b.cr2", "c.cr2", "d.cr2"):
        (folder / "raw" / name).write_bytes(b"raw sensor data")
    (folder / ".DS_Store").write_bytes(b"\0")
    out = tmp_path / "captions.parquet"
    cmd = command([folder], out, tiny_model_path, "--workers", "2")
    proc = run(cmd)
    assert proc.returncode == EXIT_OK, proc.stdout

    rows = {r["id"]: r for r in read_rows(out)}
    assert sorted(rows) == ["IMG_0001.HEIC", "IMG_0002.heic", "IMG_0003.heif", "IMG_0004.avif", "img00000.jpg"]
    assert all(r["status"] == "ok" and r["caption"] for r in rows.values())
    assert all((rows[i]["width"], rows[i]["height"]) == (20, 40) for i in rows if i != "img00000.jpg")

    line = next(x for x in proc.stdout.splitlines() if x.strip().startswith("ignored:"))
    assert re.search(r"ignored:\s+6 \(\.cr2 4, \.txt 1, hidden 1;", line), line
    assert any(str(folder / p) in line for p in (".DS_Store", "notes.txt", "raw/a.CR2"))  # the first few, by path
    listed = out.with_name(out.name + ".ignored.txt")
    assert str(listed) in line
    paths = sorted(x.split("\t")[1] for x in listed.read_text().splitlines())
    expected = [".DS_Store", "notes.txt", "raw/a.CR2", "raw/b.cr2", "raw/c.cr2", "raw/d.cr2"]
    assert paths == sorted(str(folder / p) for p in expected)

    # Once nothing is ignored any more, the list of an earlier pass goes too.
    for path in [folder / ".DS_Store", folder / "notes.txt", *(folder / "raw").iterdir()]:
        path.unlink()
    proc = run(cmd)
    assert proc.returncode == EXIT_OK and "nothing new" in proc.stdout, proc.stdout
    assert re.search(r"ignored:\s+0\n", proc.stdout) and not listed.exists()
