"""Parquet tables of pictures as a source, laid out as img2dataset and Hugging Face ``datasets`` write them."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from PIL import Image

from batchcap.config import ImagePolicy, Preprocess
from batchcap.data.inputs import SourceError
from batchcap.data.loader import iter_batches
from batchcap.data.sources import open_sources
from batchcap.data.tables import TableReader

PREPROCESS = Preprocess(input_size=(3, 32, 32), resize="squash", interpolation="bilinear")


def jpeg(seed: int, size: tuple[int, int] = (40, 30)) -> bytes:
    array = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG")
    return buffer.getvalue()


def write_img2dataset(folder: Path, shards: int = 2, per_shard: int = 5, row_group_size: int = 2) -> list[str]:
    """img2dataset's ``--output_format parquet``: ``{shard:05d}.parquet`` with key, jpg and metadata, plus stats."""
    folder.mkdir(parents=True, exist_ok=True)
    keys = []
    for shard in range(shards):
        rows = []
        for i in range(per_shard):
            key = f"{shard:05d}{i:04d}"
            keys.append(key)
            rows.append(
                {
                    "key": key,
                    "jpg": jpeg(shard * 100 + i),
                    "caption": f"picture {key}",
                    "url": f"https://example.org/{key}.jpg",
                    "width": 40,
                    "height": 30,
                    "original_width": 400,
                    "original_height": 300,
                    "status": "success",
                    "error_message": None,
                    "exif": "{}",
                    "sha256": "0" * 64,
                }
            )
        table = pa.Table.from_pylist(rows)
        pq.write_table(table, folder / f"{shard:05d}.parquet", row_group_size=row_group_size)
        (folder / f"{shard:05d}_stats.json").write_text(json.dumps({"count": per_shard, "successes": per_shard}))
    return keys


def write_hf(path: Path, cells: list[dict | None], labels: list[int]) -> None:
    """A ``datasets`` Parquet file: an ``Image`` feature (struct of bytes and path) and a label; no id column."""
    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    table = pa.table({"image": pa.array(cells, type=image), "label": pa.array(labels, type=pa.int64())})
    features = {"image": {"_type": "Image"}, "label": {"_type": "Value", "dtype": "int64"}}
    table = table.replace_schema_metadata({"huggingface": json.dumps({"info": {"features": features}})})
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, row_group_size=2)


def outcomes(sources, **kwargs) -> dict[str, tuple[str, str | None]]:
    seen: dict[str, tuple[str, str | None]] = {}
    for batch in iter_batches(sources, PREPROCESS, ImagePolicy(), batch_size=3, workers=0, **kwargs):
        for r in batch.ok + batch.failed:
            assert r.item.id not in seen, f"{r.item.id} twice"
            seen[r.item.id] = (r.status, r.error)
    return seen


def test_an_img2dataset_folder_is_read_by_row_groups_with_key_as_the_id(tmp_path: Path) -> None:
    keys = write_img2dataset(tmp_path / "laion")
    sources = open_sources([str(tmp_path / "laion")])
    (reader,) = sources.readers
    assert isinstance(reader, TableReader)
    assert [t.name for t in reader.tables] == ["00000.parquet", "00001.parquet"]
    assert {(t.image, t.id_column, t.group_rows) for t in reader.tables} == {("jpg", "key", (2, 2, 1))}
    assert sources.count() == 10
    assert outcomes(sources) == {k: ("ok", None) for k in keys}
    # job shards split the row groups: disjoint, and together every row once
    halves = [outcomes(sources, shard_index=i, shard_count=2) for i in range(2)]
    assert not set(halves[0]) & set(halves[1]) and set(halves[0]) | set(halves[1]) == set(keys)
    assert [sources.count(i, 2) for i in range(2)] == [len(h) for h in halves]


def test_a_file_a_pattern_and_a_brace_range_name_tables_too(tmp_path: Path) -> None:
    write_img2dataset(tmp_path / "laion", shards=3, per_shard=2)
    for spec in ("laion/00001.parquet", "laion/*.parquet", "laion/{00000..00002}.parquet"):
        (reader,) = open_sources([str(tmp_path / spec)]).readers
        assert isinstance(reader, TableReader), spec
    assert len(open_sources([str(tmp_path / "laion/*.parquet")]).readers[0].tables) == 3


def test_hugging_face_image_columns_and_row_ids(tmp_path: Path) -> None:
    (tmp_path / "hf" / "pics").mkdir(parents=True)
    (tmp_path / "hf" / "pics" / "on-disk.jpg").write_bytes(jpeg(9))
    cells = [
        {"bytes": jpeg(1), "path": "a.jpg"},
        {"bytes": b"\xff\xd8\xff not really a jpeg", "path": "b.jpg"},
        None,  # a null cell
        {"bytes": None, "path": "pics/on-disk.jpg"},  # bytes left on disk, path relative to the table
        {"bytes": None, "path": None},
    ]
    write_hf(tmp_path / "hf" / "train-00000-of-00001.parquet", cells, list(range(5)))
    got = outcomes(open_sources([str(tmp_path / "hf" / "train-00000-of-00001.parquet")]))
    name = "train-00000-of-00001.parquet"
    statuses = [got[f"{name}/{i}"][0] for i in range(5)]
    assert len(got) == 5 and statuses == ["ok", "unsupported", "unsupported", "ok", "unsupported"]
    assert "column 'image' is null in row 2" in got[f"{name}/2"][1]


def test_id_column_chooses_the_id_and_must_exist(tmp_path: Path) -> None:
    write_img2dataset(tmp_path / "laion", shards=1, per_shard=3)
    got = outcomes(open_sources([str(tmp_path / "laion")], id_column="url"))
    assert sorted(got) == [f"https://example.org/00000{i:04d}.jpg" for i in range(3)]
    with pytest.raises(SourceError, match="no column 'uid' for --id-column"):
        open_sources([str(tmp_path / "laion")], id_column="uid")


def test_a_table_without_pictures_is_a_source_error_naming_image_key(tmp_path: Path) -> None:
    pq.write_table(pa.table({"id": ["a"], "caption": ["a dog"]}), tmp_path / "captions.parquet")
    with pytest.raises(SourceError, match="--image-key"):
        open_sources([str(tmp_path / "captions.parquet")])
    pq.write_table(pa.table({"key": ["a"], "webp": [jpeg(3)]}), tmp_path / "webp.parquet")
    (reader,) = open_sources([str(tmp_path / "webp.parquet")], policy=ImagePolicy(image_keys=("webp",))).readers
    assert reader.tables[0].image == "webp"


def test_a_damaged_table_is_one_failure_row_and_the_next_goes_on(tmp_path: Path) -> None:
    keys = write_img2dataset(tmp_path / "laion", shards=1, per_shard=2)
    (tmp_path / "laion" / "00001.parquet").write_bytes(b"PAR1 cut short")
    got = outcomes(open_sources([str(tmp_path / "laion")]))
    assert got.pop("00001.parquet")[0] == "shard_error"
    assert got == {k: ("ok", None) for k in keys}


def test_a_damaged_row_group_is_one_failure_row_and_the_next_row_group_goes_on(tmp_path: Path) -> None:
    path = tmp_path / "damaged.parquet"
    pq.write_table(pa.table({"key": ["a", "b", "c", "d"], "jpg": [jpeg(i) for i in range(4)]}), path, row_group_size=2)
    first_chunk = pq.read_metadata(path).row_group(0).column(1)
    data = bytearray(path.read_bytes())
    data[first_chunk.data_page_offset : first_chunk.data_page_offset + 16] = b"\xff" * 16  # its page header
    path.write_bytes(bytes(data))
    got = outcomes(open_sources([str(path)]))
    assert got.pop("damaged.parquet#0")[0] == "shard_error"
    assert got == {"c": ("ok", None), "d": ("ok", None)}


def test_a_folder_of_pictures_with_a_parquet_beside_them_is_still_a_folder_of_pictures(tmp_path: Path) -> None:
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "a.jpg").write_bytes(jpeg(1))
    pq.write_table(pa.table({"key": ["x"], "jpg": [jpeg(2)]}), tmp_path / "photos" / "old.parquet")
    assert [r.kind for r in open_sources([str(tmp_path / "photos")]).readers] == ["folder"]


def test_run_captions_a_table_folder_into_itself_and_resumes(tmp_path: Path, tiny_model_path: Path) -> None:
    from batchcap.cli import cli

    keys = write_img2dataset(tmp_path / "laion", shards=2, per_shard=3)
    out = tmp_path / "laion" / "captions.parquet"  # inside the source folder: must not be read as a source
    args = ["run", str(tmp_path / "laion"), "--out", str(out), "--model", str(tiny_model_path)]
    args += ["--workers", "0", "--device", "cpu", "--precision", "fp32", "--backend", "torch", "--commit-every", "2"]
    first = CliRunner().invoke(cli, args)
    assert first.exit_code == 0, first.output
    rows = pq.read_table(out).to_pylist()
    assert sorted(r["id"] for r in rows) == keys and all(r["status"] == "ok" and r["caption"] for r in rows)
    again = CliRunner().invoke(cli, args)
    assert again.exit_code == 0, again.output
    assert "nothing new to caption" in again.output
    glob = CliRunner().invoke(cli, ["run", str(tmp_path / "laion" / "*.parquet"), *args[2:]])
    assert glob.exit_code == 0 and "nothing new to caption" in glob.output, glob.output
