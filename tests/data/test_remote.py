"""URL sources through fsspec, against real servers on 127.0.0.1: ``http.server`` and moto's S3.

Pictures, lists, folders, tar shards and Parquet tables at URLs; ids under each ``--id-from``;
transient failures retried, then an ``unreadable`` row; a 404 ``missing`` at once; DataLoader
workers (forked) reading with filesystems of their own.
"""

from __future__ import annotations

import io
import tarfile
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import write_images
from remote_servers import moto_s3, serve_folder

from batchcap.config import ImagePolicy, Preprocess
from batchcap.data.image_decode import CORRUPT, MISSING, OK, TOO_LARGE, UNREADABLE, Decoded, decode_file, read_file
from batchcap.data.inputs import FileEntry, Ignored, SourceError
from batchcap.data.loader import iter_batches
from batchcap.data.remote import RemoteUnreadable, fetch
from batchcap.data.sources import SourceSet, TarReader, UrlFolderReader, open_sources

PRE = Preprocess(input_size=(3, 16, 16), resize="squash", interpolation="bilinear")


def collect(sources: SourceSet, workers: int = 0, done: dict[str, Any] | None = None) -> dict[str, tuple[str, Any]]:
    """id -> (status, error) of every input, each seen once; ``done`` as a resumed run passes it."""
    rows: dict[str, tuple[str, Any]] = {}
    for batch in iter_batches(sources, PRE, ImagePolicy(), batch_size=4, workers=workers, done=done):
        for r in batch.ok + batch.failed:
            assert r.item.id not in rows, r.item.id
            rows[r.item.id] = (r.status, r.error)
    return rows


@pytest.fixture
def site(tmp_path: Path) -> Path:
    """A folder to serve: photos/ (three pictures, one nested, a hidden one and a text file)."""
    write_images(tmp_path / "photos", 2)
    write_images(tmp_path / "photos" / "sub", 1, prefix="deep")
    write_images(tmp_path / "photos" / ".cache", 1)
    (tmp_path / "photos" / "notes.txt").write_text("not a picture")
    return tmp_path


# -- HTTP ------------------------------------------------------------------------------------


def test_a_picture_url_is_one_input_whose_id_is_the_url(site: Path) -> None:
    with serve_folder(site) as served:
        url = served.url + "photos/img00000.jpg"
        sources = open_sources([url])
        assert collect(sources) == {url: (OK, None)}
        assert collect(open_sources([url], id_from="absolute")) == {url: (OK, None)}


def test_a_list_of_urls_given_by_url(site: Path) -> None:
    with serve_folder(site) as served:
        urls = [served.url + "photos/img00001.jpg", served.url + "photos/sub/deep00000.jpg"]
        (site / "list.txt").write_text("".join(u + "\n" for u in urls))
        sources = open_sources([], files_from=served.url + "list.txt")
        assert collect(sources) == {u: (OK, None) for u in urls}
        assert collect(open_sources([], files_from=served.url + "list.txt", id_from="absolute")) == {
            u: (OK, None) for u in urls
        }


def test_a_local_manifest_may_name_pictures_at_urls_but_a_manifest_at_a_url_is_refused(site: Path) -> None:
    with serve_folder(site) as served:
        urls = [served.url + "photos/img00001.jpg", served.url + "photos/missing.jpg"]
        manifest = site / "manifest.csv"
        manifest.write_text("sku,path\n" + "".join(f"k{i},{u}\n" for i, u in enumerate(urls)))
        rows = collect(open_sources([], files_from=str(manifest), id_column="sku"))
        assert {k: status for k, (status, _) in rows.items()} == {"k0": OK, "k1": MISSING}
        by_url = collect(open_sources([], files_from=str(manifest), id_from="absolute"))
        assert sorted(by_url) == sorted(urls)  # a URL is absolute already: not joined to the working folder
        with pytest.raises(SourceError, match="manifest is read from a local or network disk"):
            open_sources([], files_from=served.url + "manifest.csv")


def test_a_folder_url_is_walked_with_relative_ids_and_the_same_ignored_names(site: Path) -> None:
    with serve_folder(site) as served:
        sources = open_sources([served.url + "photos/"])
        (reader,) = sources.readers
        assert isinstance(reader, UrlFolderReader)
        entries = list(reader.entries())
        assert [e.item.id for e in entries if isinstance(e, FileEntry)] == [
            "img00000.jpg",
            "img00001.jpg",
            "sub/deep00000.jpg",
        ]
        assert sorted((e.path, e.kind) for e in entries if isinstance(e, Ignored)) == [
            (".cache/img00000.jpg", "hidden"),
            ("notes.txt", ""),
        ]
        assert sources.count() is None  # not listed before captioning: the run shows no total
        expected = {i: (OK, None) for i in ("img00000.jpg", "img00001.jpg", "sub/deep00000.jpg")}
        assert collect(sources) == expected
        assert collect(sources, workers=2) == expected  # forked workers, each its own filesystem
        absolute = collect(open_sources([served.url + "photos/"], id_from="absolute"))
        assert set(absolute) == {served.url + "photos/" + i for i in expected}


def test_a_worker_reads_pictures_at_urls_ahead_several_at_once(tmp_path: Path) -> None:
    write_images(tmp_path / "photos", 12)
    with serve_folder(tmp_path) as served:
        served.delay_s = 0.2  # each picture's GET takes this long: in turn, 12 would take 2.4 s
        rows = collect(open_sources([served.url + "photos/"]))
    assert len(rows) == 12 and all(status == OK for status, _ in rows.values())
    assert served.most_at_once > 1


def test_a_folder_url_beside_a_local_folder_gets_source_relative_ids(site: Path, tmp_path: Path) -> None:
    local = tmp_path / "local" / "cam"
    write_images(local, 1)
    with serve_folder(site) as served:
        rows = collect(open_sources([served.url + "photos/", str(local)]))
    assert set(rows) == {"photos/img00000.jpg", "photos/img00001.jpg", "photos/sub/deep00000.jpg", "cam/img00000.jpg"}


def test_a_folder_url_that_cannot_be_listed_is_refused_before_any_work(site: Path) -> None:
    with serve_folder(site) as served:
        with pytest.raises(SourceError, match="cannot list the folder: FileNotFoundError"):
            open_sources([served.url + "nothing/"])
        with pytest.raises(SourceError, match="a web server's folder URL ends in /"):
            open_sources([served.url + "photos"])


def test_a_listing_that_breaks_off_stops_the_run_with_a_clear_error(site: Path) -> None:
    with serve_folder(site) as served:
        reader = UrlFolderReader(served.url + "broken/photos/")  # as if the server failed after the run began
        with pytest.raises(SourceError, match=r"listing broke off at the start: .*503.*rerun to resume"):
            list(reader.entries())


def test_the_same_folder_url_twice_is_refused(site: Path) -> None:
    with serve_folder(site) as served:
        with pytest.raises(SourceError, match="read twice"):
            open_sources([served.url + "photos/", served.url + "photos/sub/"])


def test_a_tar_shard_at_a_web_url(site: Path) -> None:
    (site / "x.tar").write_bytes(_tar({"k.jpg": (site / "photos" / "img00000.jpg").read_bytes()}))
    with serve_folder(site) as served:
        assert collect(open_sources([served.url + "x.tar"])) == {"x.tar/k": (OK, None)}
        rows = collect(open_sources([served.url + "broken/x.tar"]))
    assert rows["x.tar"][0] == "shard_error" and "Error: " in rows["x.tar"][1] and "broken/x.tar" in rows["x.tar"][1]


def test_a_transient_503_is_retried_with_backoff_until_it_reads(site: Path) -> None:
    waits: list[float] = []
    with serve_folder(site, fail_first=2) as served:
        data = fetch(served.url + "flaky/photos/img00000.jpg", backoff_s=0.01, sleep=waits.append)
        assert data == (site / "photos" / "img00000.jpg").read_bytes()
        assert served.requests["/flaky/photos/img00000.jpg"] == 3
    assert len(waits) == 2 and waits[1] > waits[0]  # exponential: 0.01 s then about 0.02 s


def test_a_server_that_keeps_failing_gives_an_unreadable_row_after_the_tries(site: Path) -> None:
    with serve_folder(site) as served:
        url = served.url + "broken/photos/img00000.jpg"
        with pytest.raises(RemoteUnreadable, match="failed 3 times"):
            fetch(url, tries=3, backoff_s=0.001)
        assert served.requests["/broken/photos/img00000.jpg"] == 3
        outcome = decode_file(url, PRE, ImagePolicy())  # the run's path: default tries and backoff
        assert outcome.status == UNREADABLE and "503" in (outcome.error or "") and "failed 4 times" in outcome.error
        assert served.requests["/broken/photos/img00000.jpg"] == 3 + 4
        rows = collect(open_sources([], files_from=_listing(site, [url, served.url + "photos/img00001.jpg"])))
    assert rows[url][0] == UNREADABLE and rows[served.url + "photos/img00001.jpg"] == (OK, None)


def test_a_404_is_missing_at_once_without_retries(site: Path) -> None:
    with serve_folder(site) as served:
        outcome = decode_file(served.url + "photos/gone.jpg", PRE, ImagePolicy())
        assert outcome.status == MISSING and "gone.jpg" in (outcome.error or "")
        assert served.requests["/photos/gone.jpg"] == 1


def test_an_object_listed_too_large_is_refused_unread_and_an_empty_one_is_corrupt(site: Path) -> None:
    (site / "photos" / "empty.jpg").write_bytes(b"")
    with serve_folder(site) as served:
        outcome = read_file(served.url + "photos/img00000.jpg", ImagePolicy(), size=1 << 40)  # size from a listing
        assert isinstance(outcome, Decoded) and outcome.status == TOO_LARGE
        assert served.requests["/photos/img00000.jpg"] == 0
        empty = decode_file(served.url + "photos/empty.jpg", PRE, ImagePolicy())
        assert empty.status == CORRUPT and "empty file" in (empty.error or "")


def _listing(folder: Path, lines: list[str]) -> str:
    path = folder / "urls.txt"
    path.write_text("".join(line + "\n" for line in lines))
    return str(path)


# -- S3 (moto) -------------------------------------------------------------------------------


def _tar(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


@pytest.fixture
def bucket(tmp_path: Path) -> Any:
    """``s3://bucket`` on a moto server: photos/ (two pictures and a nested one), shards/x.tar, tables/t.parquet."""
    import s3fs

    pictures = write_images(tmp_path / "pics", 3)
    with moto_s3():
        fs = s3fs.S3FileSystem()
        fs.mkdir("bucket")
        fs.pipe("bucket/photos/a.jpg", pictures[0].read_bytes())
        fs.pipe("bucket/photos/b.jpg", pictures[1].read_bytes())
        fs.pipe("bucket/photos/more/c.jpg", pictures[2].read_bytes())
        fs.pipe("bucket/photos/.hidden.jpg", pictures[2].read_bytes())
        fs.pipe("bucket/photosx/not-in-the-folder.jpg", pictures[2].read_bytes())
        fs.pipe(
            "bucket/shards/x.tar",
            _tar({"k1.jpg": pictures[0].read_bytes(), "k1.txt": b"one", "k2.jpg": pictures[1].read_bytes()}),
        )
        fs.pipe("bucket/shards/r-0.tar", _tar({"a.jpg": pictures[0].read_bytes()}))
        fs.pipe("bucket/shards/r-1.tar", _tar({"a.jpg": pictures[1].read_bytes()}))
        table = pa.table({"key": ["r0", "r1"], "jpg": [pictures[0].read_bytes(), pictures[1].read_bytes()]})
        sink = io.BytesIO()
        pq.write_table(table, sink)
        fs.pipe("bucket/tables/t.parquet", sink.getvalue())
        yield fs


def test_an_s3_folder_is_listed_by_prefix_with_fingerprints(bucket: Any) -> None:
    for spec in ("s3://bucket/photos/", "s3://bucket/photos"):
        sources = open_sources([spec])
        (reader,) = sources.readers
        entries = [e for e in reader.entries() if isinstance(e, FileEntry)]  # type: ignore[union-attr]
        assert [e.item.id for e in entries] == ["a.jpg", "b.jpg", "more/c.jpg"]
        assert [e.item.source for e in entries] == [
            "s3://bucket/photos/a.jpg",
            "s3://bucket/photos/b.jpg",
            "s3://bucket/photos/more/c.jpg",
        ]
        assert all(e.item.size and e.item.mtime_ns for e in entries)
    expected = {i: (OK, None) for i in ("a.jpg", "b.jpg", "more/c.jpg")}
    assert collect(open_sources(["s3://bucket/photos/"]), workers=2) == expected


def test_an_unchanged_s3_object_is_done_and_a_changed_one_is_read_again(bucket: Any) -> None:
    sources = open_sources(["s3://bucket/photos/"])
    (reader,) = sources.readers
    listed = {e.item.id: (e.item.size, e.item.mtime_ns) for e in reader.entries() if isinstance(e, FileEntry)}  # type: ignore[union-attr]
    done = dict(listed)
    done["b.jpg"] = (1, 1)  # captioned when it had other bytes
    assert collect(sources, done=done) == {"b.jpg": (OK, None)}


def test_an_s3_tar_shard_and_an_s3_table(bucket: Any) -> None:
    shard = open_sources(["s3://bucket/shards/x.tar"])
    assert isinstance(shard.readers[0], TarReader)
    assert collect(shard) == {"x.tar/k1": (OK, None), "x.tar/k2": (OK, None)}
    assert collect(open_sources(["s3://bucket/shards/r-{0..1}.tar"]), workers=2) == {
        "r-0.tar/a": (OK, None),
        "r-1.tar/a": (OK, None),
    }
    assert collect(open_sources(["s3://bucket/tables/t.parquet"])) == {"r0": (OK, None), "r1": (OK, None)}


def test_a_missing_s3_object_or_folder(bucket: Any) -> None:
    assert collect(open_sources(["s3://bucket/photos/nope.jpg"]))["s3://bucket/photos/nope.jpg"][0] == MISSING
    with pytest.raises(SourceError, match="not a folder"):
        open_sources(["s3://bucket/nothing-here"])
    with pytest.raises(SourceError, match="no such folder, or it is empty"):
        open_sources(["s3://bucket/nothing-here/"])
