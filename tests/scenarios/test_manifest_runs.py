"""Manifests on the real CLI: captions join back to the user's table, shards and resumes cover every row once."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.parquet as pq
from conftest import write_images
from test_resume import command, moment_new_part, read_rows, reap_groups, run, run_and_kill

from batchcap.outputs.schema import METADATA_KEY
from batchcap.pipeline.progress import EXIT_OK, EXIT_RESUME_REFUSED, EXIT_USAGE


def test_captions_join_back_to_the_manifest_on_its_ids(tmp_path: Path, tiny_model_path: Path) -> None:
    pictures = write_images(tmp_path / "photos", 4)
    manifest = tmp_path / "products.csv"
    with open(manifest, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["sku", "title", "image"])
        writer.writerows([["0001", "mug", pictures[0]], ["0002", "lamp", pictures[1]], ["0003", "chair", ""]])
        writer.writerows([["0004", "desk", pictures[2]], ["0004", "desk, again", pictures[3]]])
    out = tmp_path / "captions.parquet"
    cmd = command([], out, tiny_model_path, "--files-from", str(manifest), "--path-column", "image")
    proc = run([*cmd, "--id-column", "sku", "--max-failures", "10"])
    assert proc.returncode == EXIT_OK, proc.stdout

    products = pcsv.read_csv(manifest, convert_options=pcsv.ConvertOptions(column_types={"sku": pa.string()}))
    captions = pq.read_table(out, columns=["id", "source", "caption", "status", "error"])
    joined = products.join(captions, keys="sku", right_keys="id", join_type="left outer").to_pylist()
    by_title = {r["title"]: r for r in joined}
    assert len(joined) == 5 and captions.num_rows == 5  # one row per manifest row, the duplicate under 0004#2
    assert [by_title[t]["status"] for t in ("mug", "lamp", "desk")] == ["ok"] * 3
    assert by_title["mug"]["source"] == str(pictures[0]) and by_title["mug"]["caption"]
    assert by_title["chair"]["status"] == "missing" and "column 'image' is empty" in by_title["chair"]["error"]
    duplicate = {r["id"]: r for r in captions.to_pylist()}["0004#2"]
    assert duplicate["status"] == "duplicate_id" and duplicate["source"] == str(pictures[3])


def test_a_missing_column_is_a_usage_error_that_names_the_columns(tmp_path: Path, tiny_model_path: Path) -> None:
    manifest = tmp_path / "m.jsonl"
    manifest.write_text('{"picture": "a.jpg", "key": "k"}\n')
    out = tmp_path / "o.parquet"
    proc = run(command([], out, tiny_model_path, "--files-from", str(manifest)))
    assert proc.returncode == EXIT_USAGE, proc.stdout
    assert "no path column" in proc.stdout and "'picture', 'key'" in proc.stdout and "--path-column" in proc.stdout
    proc = run(
        command(
            [], out, tiny_model_path, "--files-from", str(manifest), "--path-column", "picture", "--id-column", "id"
        )
    )
    assert proc.returncode == EXIT_USAGE and "no column 'id' for --id-column" in proc.stdout, proc.stdout
    assert not out.exists()


def test_shards_cover_every_manifest_row_exactly_once(tmp_path: Path, tiny_model_path: Path) -> None:
    pictures = write_images(tmp_path / "photos", 12)
    manifest = tmp_path / "m.ndjson"
    manifest.write_text("".join(json.dumps({"filepath": str(p), "id": i}) + "\n" for i, p in enumerate(pictures)))
    seen: list[str] = []
    for index in range(3):
        out = tmp_path / f"part-{index}.parquet"
        cmd = command([], out, tiny_model_path, "--files-from", str(manifest), "--id-column", "id")
        proc = run([*cmd, "--shard", f"{index}/3"])
        assert proc.returncode == EXIT_OK, proc.stdout
        seen += [r["id"] for r in read_rows(out)]
    assert sorted(seen, key=int) == [str(i) for i in range(12)]


def test_an_interrupted_run_resumes_exactly_once_and_keeps_its_id_column(tmp_path: Path, tiny_model_path: Path) -> None:
    pictures = write_images(tmp_path / "photos", 80, size=(32, 24))
    manifest = tmp_path / "m.parquet"
    pq.write_table(
        pa.table({"path": [str(p) for p in pictures], "key": [f"k{i}" for i in range(80)]}), manifest, row_group_size=16
    )
    out = tmp_path / "o.parquet"
    cmd = command([], out, tiny_model_path, "--files-from", str(manifest), "--id-column", "key", "--workers", "0")
    pgids: list[int] = []
    try:
        killed = run_and_kill(cmd, out, moment_new_part(), pgids)
    finally:
        reap_groups(pgids)
    proc = run(cmd)
    assert proc.returncode == EXIT_OK, proc.stdout
    rows = read_rows(out)
    assert sorted(r["id"] for r in rows) == sorted(f"k{i}" for i in range(80))
    assert all(r["status"] == "ok" for r in rows)
    if killed:
        assert not re.search(r"captioned now:\s+80\n", proc.stdout), proc.stdout

    # ids from another column would caption every picture again: refused, naming the option
    proc = run(command([], out, tiny_model_path, "--files-from", str(manifest)))
    assert proc.returncode == EXIT_RESUME_REFUSED, proc.stdout
    assert "--id-column" in proc.stdout and "pass --id-column key" in proc.stdout

    # an output written before --id-column was recorded resumes as before
    table = pq.read_table(out)
    meta = json.loads(table.schema.metadata[METADATA_KEY.encode()])
    del meta["resume_settings"]["id_column"]
    pq.write_table(table.replace_schema_metadata({METADATA_KEY: json.dumps(meta)}), out)
    proc = run(cmd)
    assert proc.returncode == EXIT_OK and re.search(r"captioned now:\s+0\n", proc.stdout), proc.stdout
