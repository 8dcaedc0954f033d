"""batchcap merge: combine part outputs, refuse (and write nothing) when they are incomplete."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batchcap.outputs.merge import MergeError, MergeReport, merge_outputs, read_listing

# Written out on purpose: the output schema is a promise to users (README "Output"), and
# test_output_schema_is_stable fails if the sink's drifts from it.
SCHEMA_V1 = pa.schema(
    [
        ("id", pa.string()),
        ("source", pa.string()),
        ("caption", pa.string()),
        ("score", pa.float64()),
        ("n_best", pa.list_(pa.struct([("caption", pa.string()), ("score", pa.float64())]))),
        ("status", pa.string()),
        ("error", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("size", pa.int64()),
        ("mtime_ns", pa.int64()),
        ("model", pa.string()),
        ("created_at", pa.timestamp("ms", tz="UTC")),
    ]
)
# Version 2 appends the per-token log-probability and the calibrated confidence.
SCHEMA = pa.schema(list(SCHEMA_V1) + [pa.field("logprob", pa.float64()), pa.field("confidence", pa.float64())])
CONFIG = {"model": "tiny@abc123", "beam_size": 3, "max_len": 12, "precision": "fp32", "version": "0.1.0"}


def test_output_schema_is_stable() -> None:
    from batchcap.outputs.schema import SCHEMA as SINK_SCHEMA

    assert SINK_SCHEMA.remove_metadata().equals(SCHEMA), SINK_SCHEMA


def rows(ids: list[str], model: str = "tiny@abc123", status: str = "ok") -> list[dict[str, Any]]:
    """Rows in the output schema, as `batchcap run` writes them."""
    now = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
    return [
        {
            "id": i,
            "source": f"/data/{i}",
            "caption": "a dog runs",
            "score": -1.5,
            "n_best": [{"caption": "a dog runs", "score": -1.5}],
            "status": status,
            "error": None if status == "ok" else "decode: broken",
            "width": 48,
            "height": 40,
            "size": 1234,
            "mtime_ns": 1,
            "model": model,
            "created_at": now,
        }
        for i in ids
    ]


def write_parquet(
    path: Path,
    ids: list[str],
    shard: int = 0,
    row_group_size: int = 4,
    config: dict[str, Any] | None = None,
    schema: pa.Schema = SCHEMA,
    **kw: Any,
) -> Path:
    config = dict(config or CONFIG, shard=f"{shard}/3", out=str(path))
    table = pa.Table.from_pylist(rows(ids, **kw), schema=schema)
    table = table.replace_schema_metadata({b"batchcap": json.dumps(config).encode()})
    pq.write_table(table, path, row_group_size=row_group_size)
    return path


def write_jsonl(path: Path, ids: list[str], shard: int = 0, config: dict[str, Any] | None = None, **kw: Any) -> Path:
    with open(path, "w") as f:
        for row in rows(ids, **kw):
            row["created_at"] = row["created_at"].isoformat()
            f.write(json.dumps(row) + "\n")
    Path(str(path) + ".meta.json").write_text(json.dumps(dict(config or CONFIG, shard=f"{shard}/3")))
    return path


def ids_of(start: int, stop: int) -> list[str]:
    return [f"img{i:05d}.jpg" for i in range(start, stop)]


@pytest.fixture
def parquet_parts(tmp_path: Path) -> list[Path]:
    return [write_parquet(tmp_path / f"part-{k}.parquet", ids_of(10 * k, 10 * k + 10), shard=k) for k in range(3)]


def test_parquet_parts_merge_in_order_with_metadata(parquet_parts: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "merged.parquet"
    report = merge_outputs(
        [str(p) for p in parquet_parts], str(out), expected_parts=3, expected_count=30, expected_ids=ids_of(0, 30)
    )
    assert isinstance(report, MergeReport)
    assert report.rows == 30 and report.part_rows == (10, 10, 10)
    assert report.statuses == (("ok", 30),) and report.models == ("tiny@abc123",)
    table = pq.read_table(out)
    assert table.column("id").to_pylist() == ids_of(0, 30)
    assert table.schema.remove_metadata().equals(SCHEMA)
    meta = json.loads(table.schema.metadata[b"batchcap"])
    assert meta["beam_size"] == 3 and "shard" not in meta
    assert meta["merge"]["parts"] == ["part-0.parquet", "part-1.parquet", "part-2.parquet"]
    assert pq.ParquetFile(out).num_row_groups > 1  # streamed a row group at a time
    assert "rows=30" in report.summary()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp left


def test_jsonl_parts_merge_lines_verbatim(tmp_path: Path) -> None:
    parts = [write_jsonl(tmp_path / f"part-{k}.jsonl", ids_of(5 * k, 5 * k + 5), shard=k) for k in range(3)]
    parts[1].write_text(parts[1].read_text() + "\n")  # a blank line is not a row
    out = tmp_path / "all.jsonl"
    report = merge_outputs([str(p) for p in parts], str(out), expected_parts=3)
    lines = out.read_text().splitlines()
    assert report.rows == len(lines) == 15
    assert [json.loads(line)["id"] for line in lines] == ids_of(0, 15)
    assert lines[0] == parts[0].read_text().splitlines()[0]
    meta = json.loads(Path(str(out) + ".meta.json").read_text())
    assert meta["model"] == "tiny@abc123" and meta["merge"]["rows"] == 15


def test_failed_rows_count_as_rows(tmp_path: Path) -> None:
    a = write_parquet(tmp_path / "part-0.parquet", ids_of(0, 3))
    b = write_parquet(tmp_path / "part-1.parquet", ids_of(3, 5), shard=1, status="decode_error")
    report = merge_outputs([str(a), str(b)], str(tmp_path / "m.parquet"), expected_count=5)
    assert dict(report.statuses) == {"ok": 3, "decode_error": 2}


def assert_refused(parts: list[Path | str], out: Path, match: str, **kw: Any) -> MergeError:
    with pytest.raises(MergeError, match=match) as info:
        merge_outputs([str(p) for p in parts], str(out), **kw)
    assert not out.exists()
    assert not Path(str(out) + ".meta.json").exists()
    assert not [p for p in out.parent.iterdir() if ".merge-" in p.name]
    return info.value


def test_missing_part_is_named(parquet_parts: list[Path], tmp_path: Path) -> None:
    present = [parquet_parts[0], parquet_parts[2]]  # what the glob part-*.parquet finds
    err = assert_refused(present, tmp_path / "m.parquet", "missing", expected_parts=3)
    assert "part-1.parquet" in str(err)


def test_nonexistent_part_and_unmatched_glob(parquet_parts: list[Path], tmp_path: Path) -> None:
    assert_refused(
        [parquet_parts[0], tmp_path / "part-*.parquet"],
        tmp_path / "m.parquet",
        r"missing.*part-\*\.parquet",
        expected_parts=2,
    )


def test_part_beyond_expected_count_is_refused(parquet_parts: list[Path], tmp_path: Path) -> None:
    assert_refused(parquet_parts, tmp_path / "m.parquet", "part-2.parquet", expected_parts=2)


def test_unreadable_part_is_named(parquet_parts: list[Path], tmp_path: Path) -> None:
    data = parquet_parts[1].read_bytes()
    parquet_parts[1].write_bytes(data[: len(data) // 2])  # truncated
    assert_refused(parquet_parts, tmp_path / "m.parquet", "part-1.parquet is unreadable")


def test_damaged_jsonl_line_is_named(tmp_path: Path) -> None:
    part = write_jsonl(tmp_path / "part-0.jsonl", ids_of(0, 3))
    part.write_text(part.read_text() + '{"id": "img9", "capt')
    assert_refused([part], tmp_path / "m.jsonl", "part-0.jsonl line 4 is not valid JSON")
    part.write_bytes(part.read_bytes().replace(b'"img00001.jpg"', b'"img\xff0001.jpg"'))
    assert_refused([part], tmp_path / "m.jsonl", "part-0.jsonl line 2 is not UTF-8 text")


def test_duplicate_id_names_id_and_parts(tmp_path: Path) -> None:
    a = write_parquet(tmp_path / "part-0.parquet", ids_of(0, 5))
    b = write_parquet(tmp_path / "part-1.parquet", ids_of(4, 8), shard=1)
    err = assert_refused([a, b], tmp_path / "m.parquet", "more than once", expected_parts=2)
    assert "'img00004.jpg' in part-0.parquet, part-1.parquet" in str(err)


def test_duplicate_within_one_part(tmp_path: Path) -> None:
    a = write_jsonl(tmp_path / "part-0.jsonl", ["x", "y", "x"])
    assert_refused([a], tmp_path / "m.jsonl", "'x' in part-0.jsonl, part-0.jsonl")


def test_count_mismatch(parquet_parts: list[Path], tmp_path: Path) -> None:
    assert_refused(parquet_parts, tmp_path / "m.parquet", "30 rows but 31 were expected", expected_count=31)


def test_listing_mismatch_names_ids(parquet_parts: list[Path], tmp_path: Path) -> None:
    listing = tmp_path / "listing.txt"
    listing.write_text("\n".join(ids_of(1, 31)) + "\n\n")
    err = assert_refused(parquet_parts, tmp_path / "m.parquet", "listing", expected_ids=read_listing(listing))
    assert "'img00030.jpg'" in str(err) and "'img00000.jpg'" in str(err)


def test_model_mismatch_in_column(tmp_path: Path) -> None:
    a = write_parquet(tmp_path / "part-0.parquet", ids_of(0, 5))
    b = write_parquet(tmp_path / "part-1.parquet", ids_of(5, 9), shard=1, model="other@def456")
    err = assert_refused([a, b], tmp_path / "m.parquet", "different models")
    assert "other@def456" in str(err) and "part-1.parquet" in str(err)


def test_settings_mismatch_in_metadata(tmp_path: Path) -> None:
    a = write_parquet(tmp_path / "part-0.parquet", ids_of(0, 5))
    b = write_parquet(tmp_path / "part-1.parquet", ids_of(5, 9), shard=1, config=dict(CONFIG, beam_size=5))
    assert_refused([a, b], tmp_path / "m.parquet", "different settings: --beam: 3 vs 5")


def test_settings_mismatch_jsonl(tmp_path: Path) -> None:
    a = write_jsonl(tmp_path / "part-0.jsonl", ids_of(0, 5))
    b = write_jsonl(tmp_path / "part-1.jsonl", ids_of(5, 9), shard=1, config=dict(CONFIG, precision="fp16"))
    assert_refused([a, b], tmp_path / "m.jsonl", "precision")


def test_refusal_keeps_an_existing_output(parquet_parts: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "m.parquet"
    merge_outputs([str(p) for p in parquet_parts], str(out))
    before = out.read_bytes()
    with pytest.raises(MergeError):
        merge_outputs([str(p) for p in parquet_parts], str(out), expected_count=99)
    assert out.read_bytes() == before


def test_mixed_formats_and_output_among_parts_refused(parquet_parts: list[Path], tmp_path: Path) -> None:
    j = write_jsonl(tmp_path / "part-3.jsonl", ids_of(40, 41))
    assert_refused([parquet_parts[0], j], tmp_path / "m.parquet", "jsonl but the output is parquet")
    with pytest.raises(MergeError, match="also given as a part"):
        merge_outputs([str(p) for p in parquet_parts], str(parquet_parts[0]))


@pytest.mark.parametrize("fmt", ["parquet", "jsonl"])
def test_parts_written_by_the_sink(tmp_path: Path, fmt: str) -> None:
    """Real part outputs: per-shard run_config differs, resume_settings must agree."""
    sink = pytest.importorskip("batchcap.outputs.store")

    def part(k: int, ids: list[str], beam: int = 3, min_confidence: float | None = None) -> Path:
        out = tmp_path / f"part-{k}.{fmt}"
        store = sink.OutputStore.open(
            out,
            None,
            resume_settings={"model": "tiny@abc123", "beam_size": beam},
            run_config={"shard": f"{k}/2", "input": "/data"},
            commit_every=2,
            min_confidence=min_confidence,
        )
        store.add({key: value for key, value in row.items() if key != "created_at"} for row in rows(ids))
        store.finalize()
        return out

    parts = [part(0, ids_of(0, 5)), part(1, ids_of(5, 9))]
    out = tmp_path / f"merged.{fmt}"
    report = merge_outputs([str(p) for p in parts], str(out), expected_parts=2, expected_count=9)
    assert report.rows == 9
    meta = sink.read_output_meta(out)
    assert meta["resume_settings"]["beam_size"] == 3 and "shard" not in meta["run_config"]
    part(2, ids_of(9, 10), beam=5)
    assert_refused([*parts, tmp_path / f"part-2.{fmt}"], tmp_path / f"m2.{fmt}", "--beam: 3 vs 5")
    # --min-confidence labels rows: parts labelled with different thresholds would mix.
    part(3, ids_of(10, 11), min_confidence=0.3)
    assert_refused([*parts, tmp_path / f"part-3.{fmt}"], tmp_path / f"m3.{fmt}", "--min-confidence: None vs 0.3")


def test_same_file_names_in_two_folders_are_named_by_path(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a = write_parquet(tmp_path / "a" / "part-0.parquet", ids_of(0, 3))
    b = write_parquet(tmp_path / "b" / "part-0.parquet", ids_of(2, 4))
    err = assert_refused([a, b], tmp_path / "m.parquet", "more than once")
    assert f"in {a}, {b}" in str(err)


def test_parts_of_the_previous_schema_version_merge_among_themselves(tmp_path: Path) -> None:
    old = dict(CONFIG, schema_version=1)
    parts = [
        write_parquet(tmp_path / f"part-{k}.parquet", ids_of(5 * k, 5 * k + 5), shard=k, config=old, schema=SCHEMA_V1)
        for k in range(2)
    ]
    out = tmp_path / "merged.parquet"
    merge_outputs([str(p) for p in parts], str(out))
    merged = pq.read_table(out)
    assert merged.num_rows == 10 and merged.schema.remove_metadata().equals(SCHEMA_V1)
    assert json.loads(merged.schema.metadata[b"batchcap"])["schema_version"] == 1


@pytest.mark.parametrize("fmt", ["parquet", "jsonl"])
def test_parts_of_two_schema_versions_are_refused(tmp_path: Path, fmt: str) -> None:
    if fmt == "parquet":
        old = write_parquet(
            tmp_path / "part-0.parquet", ids_of(0, 5), config=dict(CONFIG, schema_version=1), schema=SCHEMA_V1
        )
        new = write_parquet(tmp_path / "part-1.parquet", ids_of(5, 10), shard=1, config=dict(CONFIG, schema_version=2))
    else:
        old = write_jsonl(tmp_path / "part-0.jsonl", ids_of(0, 5), config=dict(CONFIG, schema_version=1))
        new = write_jsonl(tmp_path / "part-1.jsonl", ids_of(5, 10), shard=1, config=dict(CONFIG, schema_version=2))
    out = tmp_path / f"merged.{fmt}"
    with pytest.raises(MergeError, match=r"different output schema versions \(version 1: part-0.*version 2: part-1"):
        merge_outputs([str(old), str(new)], str(out))
    assert not out.exists()
