"""Manifests for --files-from: Parquet, CSV, TSV and JSON-lines tables written by pyarrow, csv and json, read back."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import write_images

from batchcap.config import ImagePolicy, Preprocess
from batchcap.data.inputs import FileEntry, RowFailure, SourceError
from batchcap.data.loader import iter_batches
from batchcap.data.manifests import DEFAULT_PATH_COLUMNS, manifest_entries, manifest_format, open_manifest
from batchcap.data.sources import ListReader, open_sources

PRE = Preprocess(input_size=(3, 16, 16), resize="squash", interpolation="bilinear")


def write_manifest(path: Path, rows: list[dict[str, Any]]) -> Path:
    """``rows`` as the table ``path``'s extension names, written by the library a user would use."""
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=2)  # several row groups
    elif suffix in (".csv", ".tsv"):
        with open(path, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]), delimiter="\t" if suffix == ".tsv" else ",")
            writer.writeheader()
            writer.writerows(rows)
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def collect(sources: Any, **kw: Any) -> dict[str, tuple[str, str | None, str]]:
    """id -> (status, error, source) over every batch; an id seen twice fails the test."""
    seen: dict[str, tuple[str, str | None, str]] = {}
    for batch in iter_batches(sources, PRE, ImagePolicy(), batch_size=3, workers=kw.pop("workers", 0), **kw):
        for r in batch.ok + batch.failed:
            assert r.item.id not in seen, r.item.id
            seen[r.item.id] = (r.status, r.error, r.item.source)
    return seen


@pytest.mark.parametrize("name", ["m.parquet", "m.csv", "m.tsv", "m.jsonl", "m.ndjson", "M.CSV"])
def test_each_format_gives_paths_and_verbatim_ids(tmp_path: Path, name: str) -> None:
    pictures = write_images(tmp_path / "p", 5)
    rows = [{"sku": f"{i:03d}", "file": str(p), "note": "x,y"} for i, p in enumerate(pictures)]
    manifest = write_manifest(tmp_path / name, rows)
    assert manifest_format(str(manifest)) is not None
    sources = open_sources([], files_from=str(manifest), id_column="sku")
    assert sources.count() == 5
    assert collect(sources) == {f"{i:03d}": ("ok", None, str(p)) for i, p in enumerate(pictures)}  # 000, not 0


def test_a_text_list_keeps_one_path_a_line(tmp_path: Path) -> None:
    pictures = write_images(tmp_path / "p", 2)
    listing = tmp_path / "list.txt"
    listing.write_text("path\n" + "".join(f"{p}\n" for p in pictures))
    reader = open_sources([], files_from=str(listing)).readers[0]
    assert isinstance(reader, ListReader) and reader.manifest is None
    assert [e.item.id for e in reader.entries()] == ["path", *map(str, pictures)]
    assert manifest_format("list.txt") is None and manifest_format("list") is None


@pytest.mark.parametrize("column", DEFAULT_PATH_COLUMNS)
def test_the_path_column_is_found_by_its_usual_names(tmp_path: Path, column: str) -> None:
    manifest = write_manifest(tmp_path / "m.csv", [{"caption": "c", column: "a.jpg"}])
    assert open_manifest(str(manifest)).path_column == column


def test_the_first_usual_name_wins_and_the_option_overrides(tmp_path: Path) -> None:
    manifest = write_manifest(tmp_path / "m.parquet", [{"url": "u.jpg", "path": "p.jpg", "thumb": "t.jpg"}])
    assert open_manifest(str(manifest)).path_column == "path"
    entries = list(manifest_entries(open_manifest(str(manifest), path_column="thumb")))
    assert entries == [FileEntry(entries[0].item)] and entries[0].item.source == "t.jpg"


def test_missing_columns_name_what_the_manifest_has_and_the_option(tmp_path: Path) -> None:
    manifest = write_manifest(tmp_path / "m.jsonl", [{"picture": "a.jpg", "key": 1}])
    with pytest.raises(SourceError, match=r"no path column .*'picture', 'key'.*--path-column"):
        open_sources([], files_from=str(manifest))
    with pytest.raises(SourceError, match=r"no column 'photo' for --path-column \(it has 'picture', 'key'\)"):
        open_sources([], files_from=str(manifest), path_column="photo")
    with pytest.raises(SourceError, match=r"no column 'sku' for --id-column \(it has 'picture', 'key'\)"):
        open_sources([], files_from=str(manifest), path_column="picture", id_column="sku")


def test_path_column_needs_a_manifest(tmp_path: Path) -> None:
    listing = tmp_path / "list.txt"
    listing.write_text("a.jpg\n")
    with pytest.raises(SourceError, match="text list"):
        open_sources([], files_from=str(listing), path_column="path")
    with pytest.raises(SourceError, match="pass --files-from"):
        open_sources([str(listing)], path_column="path")


def test_a_manifest_that_is_not_its_format_is_an_error_before_any_work(tmp_path: Path) -> None:
    for name in ("m.parquet", "m.jsonl"):
        (tmp_path / name).write_text("a.jpg\nb.jpg\n")
        with pytest.raises(SourceError, match="cannot read it as"):
            open_sources([], files_from=str(tmp_path / name))


def test_rows_without_a_picture_are_rows_with_an_error(tmp_path: Path) -> None:
    good = write_images(tmp_path / "p", 1)[0]
    manifest = write_manifest(
        tmp_path / "m.parquet",
        [
            {"path": str(good), "key": "k0"},
            {"path": None, "key": "k1"},
            {"path": "", "key": "k2"},
            {"path": " ", "key": "k3"},
            {"path": str(good), "key": None},
        ],
    )
    sources = open_sources([], files_from=str(manifest), id_column="key")
    assert sources.count() == 5
    seen = collect(sources)
    assert seen["k0"][0] == "ok"
    assert seen["k1"][:2] == ("missing", "no picture: column 'path' is null in row 1")
    assert seen["k2"][:2] == ("missing", "no picture: column 'path' is empty in row 2")
    assert seen["k3"][:2] == ("missing", "no picture: column 'path' is blank (' ') in row 3")
    assert seen["m.parquet/4"][:2] == ("missing", "no id: column 'key' is null in row 4")
    assert len(seen) == 5


def test_unparsable_rows_are_rows_too_and_counted(tmp_path: Path) -> None:
    one, two, three = write_images(tmp_path / "p", 3)
    table = tmp_path / "m.csv"
    table.write_text(f"path,id\n{one},a\nonly-one-field\n{two},b,extra\n{three},c\n")
    lines = tmp_path / "m.jsonl"
    lines.write_text(f'{{"path": "{one}"}}\n\nnot json\n[1, 2]\n{{"id": 3}}\n')
    for manifest, errors in ((table, 2), (lines, 3)):
        sources = open_sources([], files_from=str(manifest))
        entries = list(sources.readers[0].entries())
        assert sources.count() == len(entries) == 4
        assert sum(isinstance(e, RowFailure) for e in entries) == errors
        statuses = [s for s, _, _ in collect(sources).values()]
        assert sorted(statuses) == sorted(["missing"] * errors + ["ok"] * (4 - errors))


def test_a_path_is_data_never_a_command(tmp_path: Path) -> None:
    witness = tmp_path / "ran"
    manifest = write_manifest(tmp_path / "m.csv", [{"path": f"pipe:touch {witness}", "id": "x"}])
    seen = collect(open_sources([], files_from=str(manifest), id_column="id"))
    assert seen["x"][0] == "missing" and seen["x"][2] == f"pipe:touch {witness}"
    assert not witness.exists()


def test_ids_default_to_the_path_as_written_or_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_images(tmp_path / "p", 2)
    monkeypatch.chdir(tmp_path)
    manifest = write_manifest(tmp_path / "m.csv", [{"path": "p/img00000.jpg"}, {"path": "p/img00001.jpg"}])
    assert set(collect(open_sources([], files_from=str(manifest)))) == {"p/img00000.jpg", "p/img00001.jpg"}
    absolute = collect(open_sources([], files_from=str(manifest), id_from="absolute"))
    assert set(absolute) == {str(tmp_path / "p/img00000.jpg"), str(tmp_path / "p/img00001.jpg")}


def test_duplicate_ids_follow_the_duplicate_rule(tmp_path: Path) -> None:
    pictures = write_images(tmp_path / "p", 3)
    manifest = write_manifest(
        tmp_path / "m.jsonl",
        [
            {"path": str(pictures[0]), "id": 7},
            {"path": str(pictures[1]), "id": 7},
            {"path": None, "id": 8},
            {"path": str(pictures[2]), "id": 8},
        ],
    )
    sources = open_sources([], files_from=str(manifest), id_column="id").surveyed()
    assert sources.repeated == {"7", "8"}
    seen = collect(sources, workers=2)
    assert {k: v[0] for k, v in seen.items()} == {
        "7": "ok",
        "7#2": "duplicate_id",
        "8": "missing",
        "8#2": "duplicate_id",
    }
    assert seen["7#2"][2] == str(pictures[1]) and str(pictures[0]) in (seen["7#2"][1] or "")


@pytest.mark.parametrize("workers", [0, 2])
def test_shards_cover_every_row_exactly_once(tmp_path: Path, workers: int) -> None:
    pictures = write_images(tmp_path / "p", 4)
    rows = [{"path": str(pictures[i % 4]) if i % 5 else None, "id": f"r{i}"} for i in range(23)]
    manifest = write_manifest(tmp_path / "m.parquet", rows)
    sources = open_sources([], files_from=str(manifest), id_column="id").surveyed()
    union: dict[str, tuple[str, str | None, str]] = {}
    for index in range(3):
        part = collect(sources, workers=workers, shard_index=index, shard_count=3)
        assert sources.count(index, 3) == len(part)
        assert not set(part) & set(union)
        union.update(part)
    assert set(union) == {f"r{i}" for i in range(23)}
    assert sum(s == "missing" for s, _, _ in union.values()) == 5


def test_a_resumed_read_skips_what_is_done(tmp_path: Path) -> None:
    pictures = write_images(tmp_path / "p", 3)
    manifest = write_manifest(tmp_path / "m.tsv", [{"path": str(p), "id": p.stem} for p in pictures])
    sources = open_sources([], files_from=str(manifest), id_column="id")
    first = collect(sources)
    st = pictures[0].stat()
    done = {pictures[0].stem: (st.st_size, st.st_mtime_ns)}
    assert set(collect(sources, done=done)) == set(first) - {pictures[0].stem}


def test_a_spreadsheet_csv_with_a_bom_and_a_name_that_is_not_utf8(tmp_path: Path) -> None:
    manifest = tmp_path / "m.csv"
    manifest.write_bytes(b"\xef\xbb\xbfpath,id\na.jpg,1\n\xff\xfe.jpg,2\n")
    entries = list(open_sources([], files_from=str(manifest)).readers[0].entries())
    assert [e.item.source for e in entries] == ["a.jpg", b"\xff\xfe.jpg".decode("utf-8", "surrogateescape")]


def test_rows_streamed_block_by_block_are_all_read_and_counted(tmp_path: Path) -> None:
    manifest = tmp_path / "m.csv"
    body = "".join(f"p{i:06d}.jpg,{i}\n" for i in range(70_000))  # more than one block of the CSV reader
    manifest.write_text(f"path,id\n{body}broken-after-the-first-block\nlast.jpg,x\n")
    reader = open_sources([], files_from=str(manifest), id_column="id").readers[0]
    entries = list(reader.entries())
    assert len(entries) == reader.count() == 70_002
    failures = [e for e in entries if isinstance(e, RowFailure)]
    assert len(failures) == 1 and "broken-after-the-first-block" in failures[0].error
    assert {e.item.id for e in entries if isinstance(e, FileEntry)} == {*map(str, range(70_000)), "x"}
