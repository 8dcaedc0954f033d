"""End to end: ``batchcap run`` over URLs, against real servers on 127.0.0.1 (moto's S3, ``http.server``).

An S3 folder killed mid-run and run again is captioned exactly once; a tar shard in a bucket;
web-server pictures named alone, in a list and by folder, with a server that keeps failing
(an ``unreadable`` row after the retries) and a 404 (``missing``); a protocol whose package is
not installed, and an output URL, refused before any work.
"""

from __future__ import annotations

import importlib.util
import io
import re
import tarfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import write_images
from remote_servers import moto_s3, serve_folder
from test_resume import assert_exactly_once, command, moment_between_commits, reap_groups, run, run_and_kill

from batchcap.outputs.store import work_dir_for
from batchcap.pipeline.progress import EXIT_OK, EXIT_USAGE


def with_sources(cmd: list[str], *sources: str) -> list[str]:
    """``cmd`` (from :func:`test_resume.command` with no sources) with ``sources`` after ``run``."""
    at = cmd.index("run") + 1
    return [*cmd[:at], *sources, *cmd[at:]]


def test_an_interrupted_s3_run_resumes_and_captions_every_picture_once(tmp_path: Path, tiny_model_path: Path) -> None:
    import s3fs

    pictures = write_images(tmp_path / "pics", 96)
    ids = {f"{'deep/' if i % 3 == 0 else ''}{p.name}" for i, p in enumerate(pictures)}
    pgids: list[int] = []
    with moto_s3():
        fs = s3fs.S3FileSystem()
        fs.mkdir("bucket")
        for i, p in enumerate(pictures):
            fs.pipe(f"bucket/photos/{'deep/' if i % 3 == 0 else ''}{p.name}", p.read_bytes())
        try:
            for attempt in range(3):  # a run that finishes before the kill is followed by one on a fresh output
                out = tmp_path / f"captions-{attempt}.parquet"
                cmd = with_sources(command([], out, tiny_model_path), "s3://bucket/photos/")
                if run_and_kill(cmd, out, moment_between_commits(1, 0.0), pgids):
                    break
            else:
                pytest.fail("every run finished before it could be killed after its first commit")
            committed = sum(pq.read_metadata(part).num_rows for part in work_dir_for(out).glob("part-*.parquet"))
            assert 0 < committed < len(ids)
            proc = run(cmd)
        finally:
            reap_groups(pgids)  # orphaned DataLoader workers
    assert proc.returncode == EXIT_OK, proc.stdout
    assert re.search(rf"already done\W+{committed}\b", proc.stdout), proc.stdout  # by the listing's fingerprints
    rows = assert_exactly_once(out, ids)
    assert {r["source"] for r in rows} == {f"s3://bucket/photos/{i}" for i in ids}
    assert all(r["size"] and r["mtime_ns"] for r in rows)  # the listing's fingerprint, for the next resume


def test_a_tar_shard_in_a_bucket(tmp_path: Path, tiny_model_path: Path) -> None:
    import s3fs

    pictures = write_images(tmp_path / "pics", 3)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for p in pictures:
            info = tarfile.TarInfo(f"{p.stem}.jpg")
            info.size = p.stat().st_size
            tar.addfile(info, io.BytesIO(p.read_bytes()))
    out = tmp_path / "out" / "captions.parquet"
    with moto_s3():
        fs = s3fs.S3FileSystem()
        fs.mkdir("bucket")
        fs.pipe("bucket/shards/x.tar", buffer.getvalue())
        proc = run(with_sources(command([], out, tiny_model_path), "s3://bucket/shards/x.tar"))
    assert proc.returncode == EXIT_OK, proc.stdout
    assert_exactly_once(out, {f"x.tar/{p.stem}" for p in pictures})


def test_web_pictures_alone_in_a_list_and_by_folder_with_failures_as_rows(
    tmp_path: Path, tiny_model_path: Path
) -> None:
    site = tmp_path / "site"
    write_images(site / "photos", 3)
    write_images(site / "single", 1, prefix="one")
    out = tmp_path / "out" / "captions.parquet"
    with serve_folder(site) as served:
        listed = [served.url + "photos/img00001.jpg", served.url + "broken/photos/img00002.jpg"]
        gone = served.url + "photos/gone.jpg"
        (site / "list.txt").write_text("".join(u + "\n" for u in [*listed, gone]))
        cmd = command([], out, tiny_model_path, "--files-from", served.url + "list.txt", "--max-failures", "1.0")
        proc = run(with_sources(cmd, served.url + "photos/", served.url + "single/one00000.jpg"))
        assert served.requests["/broken/photos/img00002.jpg"] == 4  # the first read and three retries
        assert served.requests["/photos/gone.jpg"] == 1  # a 404 is not retried
    assert proc.returncode == EXIT_OK, proc.stdout
    rows = {r["id"]: r for r in pq.read_table(out).to_pylist()}
    assert {i: r["status"] for i, r in rows.items()} == {
        "photos/img00000.jpg": "ok",
        "photos/img00001.jpg": "ok",
        "photos/img00002.jpg": "ok",
        "single/one00000.jpg": "ok",  # relative to the sources' common parent, as local paths are
        listed[0]: "ok",  # list lines keep their ids as written
        listed[1]: "unreadable",
        gone: "missing",
    }
    assert "503" in rows[listed[1]]["error"] and "failed 4 times" in rows[listed[1]]["error"]


def test_a_listing_that_breaks_off_mid_run_is_one_line_and_a_rerun_completes(
    tmp_path: Path, tiny_model_path: Path
) -> None:
    site = tmp_path / "site"
    write_images(site / "photos", 3)
    write_images(site / "photos" / "sub", 3, prefix="deep")
    out = tmp_path / "out" / "captions.parquet"
    with serve_folder(site) as served:
        cmd = with_sources(command([], out, tiny_model_path), served.url + "photos/")
        served.failing.add("/photos/sub")  # the folder opens; a worker's walk then fails inside it
        proc = run(cmd)
        assert proc.returncode == EXIT_USAGE, proc.stdout
        assert "Traceback" not in proc.stdout
        assert "listing broke off after img00002.jpg" in proc.stdout and "rerun to resume" in proc.stdout
        served.failing.clear()
        proc = run(cmd)
    assert proc.returncode == EXIT_OK, proc.stdout
    assert_exactly_once(out, {f"img0000{i}.jpg" for i in range(3)} | {f"sub/deep0000{i}.jpg" for i in range(3)})


def test_a_protocol_whose_package_is_missing_names_the_extra(tmp_path: Path, tiny_model_path: Path) -> None:
    if importlib.util.find_spec("gcsfs") is not None:
        pytest.skip("gcsfs is installed here")
    out = tmp_path / "out" / "captions.parquet"
    proc = run(with_sources(command([], out, tiny_model_path), "gs://bucket/shards-{0000..0003}.tar"), 60)
    assert proc.returncode == EXIT_USAGE, proc.stdout
    assert "Traceback" not in proc.stdout and 'pip install "batchcap[gcs]"' in proc.stdout
    assert not (tmp_path / "out").exists()
