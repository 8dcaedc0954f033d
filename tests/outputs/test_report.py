"""The HTML report: hand-written Parquet/JSONL outputs with real pictures, checked as text and in chromium."""

from __future__ import annotations

import base64
import html
import io
import json
import os
import re
import shutil
import subprocess
import tarfile
from datetime import datetime, timezone
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner, Result
from conftest import write_images
from PIL import Image

from batchcap.outputs.report import ReportError, ReportSummary, write_report

EVIL = '<script>alert("x")</script> & a dog'
META = {
    "model": "tiny@0123456789ab",
    "beam": {"beam_size": 3, "max_len": 12, "length_penalty": 0.0, "n_best": 2},
    "runtime": {"precision": "fp32", "device": "cpu"},
    "batchcap_version": "0.1.0",
    "started_at": "2026-01-02T03:04:05+00:00",
    "finished_at": "2026-01-02T03:06:15+00:00",
}
NBEST_TYPE = pa.list_(pa.struct([("caption", pa.string()), ("score", pa.float64())]))
SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("source", pa.string()),
        ("caption", pa.string()),
        ("score", pa.float64()),
        ("n_best", NBEST_TYPE),
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


def make_rows(tmp_path: Path, n_ok: int = 6) -> list[dict]:
    """``n_ok`` captioned pictures (one EXIF-rotated, one caption with a script tag) and 3 failures."""
    paths = write_images(tmp_path / "photos", n_ok, size=(64, 48))
    rotated = paths[1]
    img = Image.open(rotated)
    exif = img.getexif()
    exif[0x0112] = 6
    img.save(rotated, exif=exif)
    created = datetime(2026, 1, 2, 3, 5, tzinfo=timezone.utc)
    rows = []
    for i, path in enumerate(paths):
        caption = EVIL if i == 2 else f"caption number {i} of a red ball"
        rows.append(
            {
                "id": path.name,
                "source": str(path),
                "caption": caption,
                "score": -0.2 - 0.3 * i,
                "n_best": [
                    {"caption": caption, "score": -0.2 - 0.3 * i},
                    {"caption": f"alternative {i} <b>bold</b>", "score": -1.5 - 0.3 * i},
                ],
                "status": "ok",
                "error": None,
                "width": 64,
                "height": 48,
                "size": path.stat().st_size,
                "mtime_ns": path.stat().st_mtime_ns,
                "model": META["model"],
                "created_at": created,
            }
        )
    failures = [
        ("broken.jpg", "corrupt", "image file is truncated <bytes>"),
        ("huge.png", "too_large", "50000x50000 exceeds --max-pixels"),
        ("gone.jpg", "missing", "listed but not found"),
    ]
    for name, status, error in failures:
        (tmp_path / "photos" / name).write_bytes(b"not really an image")
        rows.append(
            {
                "id": name,
                "source": str(tmp_path / "photos" / name),
                "caption": None,
                "score": None,
                "n_best": None,
                "status": status,
                "error": error,
                "width": None,
                "height": None,
                "size": None,
                "mtime_ns": None,
                "model": META["model"],
                "created_at": created,
            }
        )
    return rows


def write_parquet(path: Path, rows: list[dict], meta: dict | None = META) -> Path:
    table = pa.Table.from_pylist(rows, schema=SCHEMA)
    if meta is not None:
        table = table.replace_schema_metadata({"batchcap": json.dumps(meta)})
    pq.write_table(table, path)
    return path


def write_jsonl(path: Path, rows: list[dict], meta: dict | None = META) -> Path:
    with open(path, "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps({**row, "created_at": row["created_at"].isoformat()}) + "\n")
    if meta is not None:
        Path(str(path) + ".meta.json").write_text(json.dumps(meta))
    return path


def data_uris(text: str) -> list[str]:
    return re.findall(r'src="data:image/jpeg;base64,([A-Za-z0-9+/=]+)"', text)


def card_ids(page: Path) -> list[str]:
    """The ids of the cards on ``page``, in display order."""
    return re.findall(r'<p class="id" title="[^"]*">([^<]*)</p>', page.read_text("utf-8"))


def check_page(text: str, rows: list[dict]) -> None:
    """Every caption (escaped), every ok picture, the filter, and every failure with its error."""
    assert "<script>alert" not in text
    for row in rows:
        if row["caption"]:
            assert html.escape(row["caption"]) in text
        else:
            assert html.escape(row["error"]) in text
    assert len(data_uris(text)) == sum(r["status"] == "ok" for r in rows)
    assert 'id="status-filter"' in text
    for status in ("ok", "corrupt", "too_large", "missing"):
        assert f'<option value="{status}">' in text
    assert 'id="failures"' in text and "alternative 0 &lt;b&gt;bold&lt;/b&gt;" in text
    assert "beam size 3" in text and "tiny@0123456789ab" in text and "took 2 min 10 s" in text
    assert "http://" not in text and "https://" not in text  # self-contained


@pytest.mark.parametrize("fmt", ["parquet", "jsonl"])
def test_report_contains_everything(tmp_path: Path, fmt: str) -> None:
    rows = make_rows(tmp_path)
    out = tmp_path / f"captions.{fmt}"
    (write_parquet if fmt == "parquet" else write_jsonl)(out, rows)
    summary = write_report(out, tmp_path / "report.html")
    text = (tmp_path / "report.html").read_text("utf-8")
    check_page(text, rows)
    assert isinstance(summary, ReportSummary)
    assert summary.total_rows == 9 and summary.shown == 9 and summary.thumbnails == 6
    assert summary.status_counts == {"ok": 6, "corrupt": 1, "too_large": 1, "missing": 1}
    assert summary.failures_listed == 3


def test_order_and_thumbnails(tmp_path: Path) -> None:
    rows = make_rows(tmp_path)
    out = write_parquet(tmp_path / "c.parquet", rows)
    write_report(out, tmp_path / "r.html", thumb_size=40)
    text = (tmp_path / "r.html").read_text("utf-8")
    ids = card_ids(tmp_path / "r.html")
    assert ids[:6] == [r["id"] for r in reversed(rows[:6])]  # lowest score first, failures last
    thumbs = [Image.open(io.BytesIO(base64.b64decode(uri))) for uri in data_uris(text)]
    assert all(max(t.size) <= 40 for t in thumbs)
    rotated = thumbs[ids.index(rows[1]["id"])]
    assert rotated.height > rotated.width  # EXIF orientation 6 applied
    write_report(out, tmp_path / "by_id.html", order="id")
    assert card_ids(tmp_path / "by_id.html") == sorted(r["id"] for r in rows)


def test_limit_and_sample(tmp_path: Path) -> None:
    rows = make_rows(tmp_path)
    out = write_parquet(tmp_path / "c.parquet", rows)
    summary = write_report(out, tmp_path / "r.html", limit=2)
    text = (tmp_path / "r.html").read_text("utf-8")
    assert summary.shown == 2 and summary.thumbnails == 2 and len(data_uris(text)) == 2
    assert html.escape(rows[5]["caption"]) in text and html.escape(rows[0]["caption"]) not in text
    assert summary.failures_listed == 3 and "listed but not found" in text  # failures always listed
    first = write_report(out, tmp_path / "s1.html", sample=4, seed=7, limit=None)
    again = write_report(out, tmp_path / "s2.html", sample=4, seed=7, limit=None)
    ids = [card_ids(tmp_path / name) for name in ("s1.html", "s2.html")]
    assert first.shown == again.shown == 4 and ids[0] == ids[1] and len(set(ids[0])) == 4
    assert write_report(out, tmp_path / "s3.html", sample=100).shown == 9
    assert write_report(out, tmp_path / "f.html", failure_cap=1).failures_listed == 1


def test_link_images(tmp_path: Path) -> None:
    rows = make_rows(tmp_path)
    out = write_parquet(tmp_path / "c.parquet", rows)
    summary = write_report(out, tmp_path / "r.html", link_images=True)
    text = (tmp_path / "r.html").read_text("utf-8")
    assert summary.thumbnails == 0 and not data_uris(text)
    for row in rows[:6]:
        assert f'src="photos/{row["id"]}"' in text  # relative: the report sits beside the photos
    write_report(out, tmp_path / "elsewhere" / "r.html", link_images=True)
    assert Path(rows[0]["source"]).as_uri() in (tmp_path / "elsewhere" / "r.html").read_text("utf-8")


def test_unopenable_pictures_become_placeholders(tmp_path: Path) -> None:
    rows = make_rows(tmp_path, n_ok=3)
    Path(rows[0]["source"]).write_bytes(b"\xff\xd8\xff garbage")  # says ok, but is not a JPEG any more
    Path(rows[1]["source"]).unlink()
    rows[2]["source"] = "pipe:curl -s http://example.invalid/shard.tar"
    out = write_parquet(tmp_path / "c.parquet", rows)
    summary = write_report(out, tmp_path / "r.html")
    text = (tmp_path / "r.html").read_text("utf-8")
    assert summary.thumbnails == 0 and summary.placeholders == 6
    assert "cannot preview" in text and "file not found" in text and "remote shard" in text


def test_webdataset_members(tmp_path: Path) -> None:
    """Thumbnails come from the member of a local tar; the id is ``<shard name>/<key>``."""
    shard = tmp_path / "shard-000.tar"
    pictures = write_images(tmp_path / "src", 3, size=(30, 20))
    with tarfile.open(shard, "w") as tf:
        for i, pic in enumerate(pictures):
            tf.add(pic, arcname=f"sample{i}.jpg")
            info = tarfile.TarInfo(f"sample{i}.txt")
            info.size = 2
            tf.addfile(info, io.BytesIO(b"hi"))
    rows = make_rows(tmp_path, n_ok=3)[:3]
    for i, row in enumerate(rows):
        row.update(id=f"shard-000.tar/sample{i}", source=str(shard))
    rows[2]["id"] = "shard-000.tar/absent"
    out = write_jsonl(tmp_path / "c.jsonl", rows, meta=None)
    summary = write_report(out, tmp_path / "r.html")
    assert summary.thumbnails == 2 and summary.placeholders == 1
    assert "not found in its shard" in (tmp_path / "r.html").read_text("utf-8")


def test_rows_of_parquet_tables(tmp_path: Path) -> None:
    """Thumbnails come from the row of an img2dataset table (id: ``key``) or a Hugging Face one (``<file>/<row>``)."""
    pictures = [p.read_bytes() for p in write_images(tmp_path / "src", 3, size=(30, 20))]
    laion = tmp_path / "00000.parquet"
    pq.write_table(pa.table({"key": ["k0", "k1"], "jpg": pictures[:2], "caption": ["a", "b"]}), laion)
    hf = tmp_path / "train.parquet"
    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    pq.write_table(pa.table({"image": pa.array([None, {"bytes": pictures[2], "path": "x.jpg"}], type=image)}), hf)
    rows = make_rows(tmp_path, n_ok=4)[:4]
    for row, (rid, source) in zip(rows, [("k0", laion), ("k1", laion), ("train.parquet/1", hf), ("k9", laion)]):
        row.update(id=rid, source=str(source))
    out = write_jsonl(tmp_path / "c.jsonl", rows, meta=None)
    summary = write_report(out, tmp_path / "r.html")
    assert summary.thumbnails == 3 and summary.placeholders == 1
    assert "not found in its table" in (tmp_path / "r.html").read_text("utf-8")


def test_tolerant_of_missing_columns_and_damage(tmp_path: Path) -> None:
    pq.write_table(
        pa.table({"id": ["a", "b"], "caption": ["one", None], "status": ["ok", "corrupt"]}), tmp_path / "bare.parquet"
    )
    summary = write_report(tmp_path / "bare.parquet", tmp_path / "bare.html")
    assert summary.total_rows == 2 and summary.placeholders == 2
    jsonl = tmp_path / "damaged.jsonl"
    jsonl.write_text(
        '{"id": "a", "caption": "fine", "status": "ok", "score": "-0.5", "n_best": 3}\n'
        '{"id": "b", "capt\n[1, 2]\n\n{"id": "c\\ud800", "status": "ok", "caption": "x"}\n'
    )
    with pytest.raises(ReportError, match=r"damaged.jsonl line 2 is not valid JSON: the file is damaged"):
        write_report(jsonl, tmp_path / "damaged.html")
    assert not (tmp_path / "damaged.html").exists()
    summary = write_report(jsonl, tmp_path / "damaged.html", skip_bad_lines=True)
    assert summary.total_rows == 2 and summary.bad_lines == 2 and summary.bad_line_numbers == (2, 3)
    assert "2 JSONL lines could not be parsed (line 2, 3)" in (tmp_path / "damaged.html").read_text("utf-8")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert write_report(empty, tmp_path / "empty.html").total_rows == 0
    with pytest.raises(ReportError):
        write_report(tmp_path / "nope.parquet", tmp_path / "x.html")
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(ReportError):
        write_report(tmp_path / "bad.parquet", tmp_path / "x.html")
    with pytest.raises(ValueError):
        write_report(tmp_path / "bare.parquet", tmp_path / "x.html", order="random")


def _chromium(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    chromium = shutil.which("chromium")
    profile = tmp_path / f"profile-{len(list(tmp_path.glob('profile-*')))}"
    return subprocess.run(
        [
            chromium,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={profile}",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )


@pytest.mark.browser
@pytest.mark.skipif(
    shutil.which("chromium") is None, reason="Debian's chromium is not installed (apt-get install chromium)"
)
def test_report_in_headless_chromium(tmp_path: Path) -> None:
    rows = make_rows(tmp_path)
    out = write_parquet(tmp_path / "captions.parquet", rows)
    page = tmp_path / "report.html"
    write_report(out, page)
    dom = _chromium(tmp_path, "--dump-dom", page.as_uri()).stdout
    check_page(dom, rows)
    assert "6 of 9 shown" not in dom and "9 of 9 shown" in dom  # the script ran and counted the cards
    assert dom.count('<article class="card') == 9
    filtered = _chromium(tmp_path, "--dump-dom", page.as_uri() + "#status=corrupt&q=truncated").stdout
    assert "1 of 9 shown" in filtered
    assert len(re.findall(r'<article class="card[^"]*"', filtered)) == 9
    assert len(re.findall(r'<article class="card [^"]*hidden"', filtered)) == 8  # only the corrupt one left
    shot = tmp_path / "report.png"
    _chromium(tmp_path, f"--screenshot={shot}", "--window-size=1280,1600", "--hide-scrollbars", page.as_uri())
    with Image.open(shot) as png:
        assert png.size == (1280, 1600)
        assert len(png.convert("L").getcolors(1 << 16) or range(1 << 16)) > 50  # not a blank page
    if os.environ.get("BATCHCAP_REPORT_SCREENSHOT"):  # keep the picture, e.g. as a CI artefact
        shutil.copy(shot, os.environ["BATCHCAP_REPORT_SCREENSHOT"])


@pytest.mark.parametrize("fmt", ["parquet", "jsonl"])
def test_reads_what_the_real_sink_writes(tmp_path: Path, fmt: str) -> None:
    """Rows written through ``batchcap.outputs.store.OutputStore`` (its schema, its metadata layout) render."""
    from batchcap.outputs.store import OutputStore

    rows = make_rows(tmp_path, n_ok=3)
    out = tmp_path / f"captions.{fmt}"
    store = OutputStore.open(
        out,
        None,
        resume_settings={"model": META["model"], "beam": META["beam"]},
        run_config={"runtime": META["runtime"], "started_at": META["started_at"], "finished_at": META["finished_at"]},
    )
    store.add(rows)
    store.finalize()
    summary = write_report(out, tmp_path / "r.html")
    text = (tmp_path / "r.html").read_text("utf-8")
    assert summary.total_rows == 6 and summary.thumbnails == 3
    check_page(text, rows)
    assert "bf16" not in text and "fp32" in text and "batchcap 0." in text


def test_cli_default_pages_of_parquet_and_jsonl_outputs_do_not_collide(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from batchcap.cli import cli

    pq.write_table(pa.table({"id": ["p"], "caption": ["from parquet"], "status": ["ok"]}), tmp_path / "wds.parquet")
    (tmp_path / "wds.jsonl").write_text(json.dumps({"id": "j", "caption": "from jsonl", "status": "ok"}) + "\n")
    runner = CliRunner()
    for name in ("wds.jsonl", "wds.parquet"):
        result = runner.invoke(cli, ["report", str(tmp_path / name)])
        assert result.exit_code == 0, result.output
        assert f"wrote {tmp_path / name}.html:" in result.output
    assert "from jsonl" in (tmp_path / "wds.jsonl.html").read_text("utf-8")
    assert "from parquet" in (tmp_path / "wds.parquet.html").read_text("utf-8")
    assert not (tmp_path / "wds.html").exists()


def test_cli_refuses_a_damaged_jsonl_output_naming_the_line(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from batchcap.cli import cli

    jsonl = tmp_path / "out.jsonl"
    jsonl.write_text(json.dumps({"id": "a", "caption": "fine", "status": "ok"}) + '\n{"id": "b", "capt\n')
    runner = CliRunner()
    result = runner.invoke(cli, ["report", str(jsonl)])
    assert result.exit_code == 2 and "line 2 is not valid JSON" in result.output
    assert "--skip-bad-lines" in result.output and not (tmp_path / "out.jsonl.html").exists()
    result = runner.invoke(cli, ["report", str(jsonl), "--skip-bad-lines"])
    assert result.exit_code == 0 and "1 line(s) are not rows and were left out (line 2)" in result.output


def with_confidence(rows: list[dict]) -> list[dict]:
    """Schema-2 rows: confidence falling with i, the two least confident set aside as low_confidence."""
    out = []
    for i, row in enumerate(rows):
        if row["status"] != "ok":
            out.append({**row, "logprob": None, "confidence": None})
            continue
        confidence = round(0.9 - 0.15 * ((i * 2) % 6), 2)  # not in score order
        out.append(
            {
                **row,
                "logprob": row["score"] / 4,
                "confidence": confidence,
                "status": "low_confidence" if confidence < 0.4 else "ok",
            }
        )
    return out


@pytest.mark.parametrize("fmt", ["parquet", "jsonl"])
def test_confidence_order_filter_and_low_confidence_rows(tmp_path: Path, fmt: str) -> None:
    from batchcap.outputs.store import OutputStore

    rows = with_confidence(make_rows(tmp_path))
    out = tmp_path / f"captions.{fmt}"
    store = OutputStore.open(out, None, resume_settings={"model": META["model"]}, run_config={})
    store.add(rows)
    store.finalize()
    low = [r for r in rows if r["status"] == "low_confidence"]
    assert low

    summary = write_report(out, tmp_path / "all.html", order="confidence")
    text = (tmp_path / "all.html").read_text("utf-8")
    captioned = sorted((r for r in rows if r["confidence"] is not None), key=lambda r: r["confidence"])
    assert card_ids(tmp_path / "all.html")[: len(captioned)] == [r["id"] for r in captioned]
    assert summary.failures_listed == 3  # set-aside rows are not failures
    assert summary.thumbnails == len(captioned)  # and they show their picture
    assert summary.status_counts["low_confidence"] == len(low)
    assert f"{low[0]['confidence']:.0%} sure" in text and '<option value="low_confidence">' in text
    assert re.search(rf'<div class="num">{len(low)}</div><div class="lbl">Low confidence', text)

    write_report(out, tmp_path / "low.html", status="low_confidence")
    assert sorted(card_ids(tmp_path / "low.html")) == sorted(r["id"] for r in low)


def test_previous_schema_version_score_reads_as_per_token_logprob(tmp_path: Path) -> None:
    rows = make_rows(tmp_path, n_ok=2)
    out = write_parquet(tmp_path / "v1.parquet", rows, meta={**META, "schema_version": 1})
    write_report(out, tmp_path / "v1.html")
    text = (tmp_path / "v1.html").read_text("utf-8")
    # schema 1's score was the mean log-probability per token: exp(-0.2) = 0.82 per token
    assert "per-token probability 0.82" in text and "sure</span>" not in text


def _cli_report(*args: str) -> Result:
    from batchcap.cli import cli

    return CliRunner().invoke(cli, ["report", *args])


@pytest.mark.parametrize("fmt", ["parquet", "jsonl"])
def test_cli_default_order_is_confidence_and_falls_back_to_score(tmp_path: Path, fmt: str) -> None:
    from batchcap.outputs.store import OutputStore

    rows = with_confidence(make_rows(tmp_path))
    out = tmp_path / f"captions.{fmt}"
    store = OutputStore.open(out, None, resume_settings={"model": META["model"], "beam": META["beam"]}, run_config={})
    store.add(rows)
    store.finalize()
    result = _cli_report(str(out), "--html", str(tmp_path / "conf.html"))
    assert result.exit_code == 0, result.output
    captioned = sorted((r for r in rows if r["confidence"] is not None), key=lambda r: r["confidence"])
    assert card_ids(tmp_path / "conf.html")[: len(captioned)] == [r["id"] for r in captioned]
    text = (tmp_path / "conf.html").read_text("utf-8")
    assert "lowest confidence first" in text and "lowest score first" not in text
    assert "ranks captions better than the score" in text

    # An output without confidence values: lowest score first, and the page says why.
    plain = (write_parquet if fmt == "parquet" else write_jsonl)(tmp_path / f"plain.{fmt}", make_rows(tmp_path))
    result = _cli_report(str(plain), "--html", str(tmp_path / "plain.html"))
    assert result.exit_code == 0, result.output
    text = (tmp_path / "plain.html").read_text("utf-8")
    assert "lowest score first (this output has no confidence values" in text and "% sure" not in text
    scored = sorted((r for r in make_rows(tmp_path) if r["score"] is not None), key=lambda r: r["score"])
    assert card_ids(tmp_path / "plain.html")[: len(scored)] == [r["id"] for r in scored]


def test_page_says_what_the_score_is_for_the_outputs_length_penalty(tmp_path: Path) -> None:
    rows = make_rows(tmp_path, n_ok=2)
    write_report(write_parquet(tmp_path / "lp0.parquet", rows), tmp_path / "lp0.html")
    text = (tmp_path / "lp0.html").read_text("utf-8")
    assert "length-normalised" not in text  # at length penalty 0 the score is a plain sum
    assert "the sum of its words&#x27; log-probabilities" in text and "(length penalty 0), not normalised" in text
    tuned = {**META, "beam": {**META["beam"], "length_penalty": 0.7}}
    write_report(write_parquet(tmp_path / "lp7.parquet", rows, meta=tuned), tmp_path / "lp7.html")
    assert "divided by its length^0.7 (length penalty 0.7)" in (tmp_path / "lp7.html").read_text("utf-8")
    write_report(write_parquet(tmp_path / "v1.parquet", rows, meta={**META, "schema_version": 1}), tmp_path / "v1.html")
    assert "mean log-probabilities per word" in (tmp_path / "v1.html").read_text("utf-8")


def test_help_and_docs_say_what_the_report_does() -> None:
    root = Path(__file__).resolve().parents[2]
    help_text = " ".join(_cli_report("--help").output.split())
    assert "[default: confidence;" in help_text and "Lowest-confidence captions come first" in help_text
    cli_md = (root / "docs" / "cli.md").read_text(encoding="utf-8")
    assert "| `--order confidence\\|score\\|id` | confidence |" in cli_md
    for page in ("docs/cli.md", "docs/outputs.md", "README.md", "batchcap/outputs/report_template.html"):
        text = (root / page).read_text(encoding="utf-8")
        assert "length-normalised log-prob" not in text, page  # false at the default length penalty 0
    recipe = (root / "docs" / "outputs.md").read_text(encoding="utf-8")
    assert 'sort_values("score")' not in recipe and 'sort_values("confidence")' in recipe


@pytest.mark.parametrize("fmt", ["parquet", "jsonl"])
def test_cli_refuses_a_file_batchcap_did_not_write(tmp_path: Path, fmt: str) -> None:
    foreign = tmp_path / f"sales.{fmt}"
    if fmt == "parquet":
        pq.write_table(pa.table({"region": ["north", "south"], "revenue": [1.5, 2.5]}), foreign)
    else:
        foreign.write_text('{"region": "north", "revenue": 1.5}\n{"region": "south", "revenue": 2.5}\n')
    result = _cli_report(str(foreign))
    assert result.exit_code == 2, result.output
    assert "is not a batchcap output" in result.output and "region, revenue" in result.output
    assert "lack id, status, caption" in result.output
    assert not Path(f"{foreign}.html").exists()
