"""OutputStore: parts, resume state, refusal, overwrite, incremental merge, atomic finalize."""

from __future__ import annotations

import datetime as dt
import json
import os
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from batchcap.outputs.schema import COLUMNS, SCHEMA, infer_format
from batchcap.outputs.store import OutputStore, ResumeRefused, meta_path_for, read_output_meta, work_dir_for

SETTINGS = {"model": "tiny@0123456789ab", "beam_size": 3, "max_len": 12, "min_len": 1, "n_best": 1}
CONFIG = {"sources": ["photos/"], "workers": 1, "resume_settings": SETTINGS}


def row(
    i: int, status: str = "ok", caption: str | None = None, size: int | None = 100, mtime_ns: int | None = 1_000
) -> dict[str, Any]:
    ok = status == "ok"
    return {
        "id": f"img{i:05d}.jpg",
        "source": f"photos/img{i:05d}.jpg",
        "caption": (caption or f"a dog number {i}") if ok else None,
        "score": -1.25 if ok else None,
        "n_best": [{"caption": "a dog", "score": -1.25}, {"caption": "a cat", "score": -2.5}] if ok else None,
        "status": status,
        "error": None if ok else f"{status}: boom",
        "width": 48,
        "height": 40,
        "size": size,
        "mtime_ns": mtime_ns,
        "model": SETTINGS["model"],
        "created_at": dt.datetime(2026, 1, 2, 3, 4, 5, 678000, tzinfo=dt.timezone.utc),
    }


def read_rows(out: Path, fmt: str) -> list[dict[str, Any]]:
    if fmt == "parquet":
        return pq.read_table(out).to_pylist()
    lines = out.read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines]


def open_store(
    out: Path, fmt: str, settings: dict[str, Any] = SETTINGS, overwrite: bool = False, commit_every: int = 4
) -> OutputStore:
    return OutputStore.open(out, fmt, settings, CONFIG, overwrite=overwrite, commit_every=commit_every)


@pytest.fixture(params=["parquet", "jsonl"])
def fmt(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def out(tmp_path: Path, fmt: str) -> Path:
    return tmp_path / f"captions.{fmt}"


def parts_of(out: Path) -> list[str]:
    return sorted(p.name for p in work_dir_for(out).glob("part-*.parquet"))


def test_commits_parts_and_reopen_knows_done(out: Path, fmt: str) -> None:
    store = open_store(out, fmt)
    assert store.done == {} and store.previous_rows == 0
    store.add([row(i) for i in range(3)])
    assert parts_of(out) == []  # below commit_every: still buffered
    store.add([row(3), row(4, status="corrupt")])
    assert len(parts_of(out)) == 1
    store.add([row(5)])  # buffered, lost by the "kill" below
    del store

    again = open_store(out, fmt)
    assert set(again.done) == {f"img{i:05d}.jpg" for i in range(5)}
    assert again.done["img00004.jpg"] == (100, 1_000)
    assert again.previous_rows == 5
    again.add([row(5)])
    again.commit()
    again.commit()  # nothing buffered: no empty part
    names = parts_of(out)
    assert len(names) == 2 and names[0].startswith("part-00000001-") and names[1].startswith("part-00000002-")


def test_finalize_writes_readable_output_and_cleans_up(out: Path, fmt: str) -> None:
    store = open_store(out, fmt)
    store.add([row(i) for i in range(10)] + [row(10, status="corrupt")])
    summary = store.finalize()
    assert (summary.rows_total, summary.rows_new, summary.rows_replaced) == (11, 11, 0)
    assert summary.path == str(out)
    assert not work_dir_for(out).exists()
    assert not list(out.parent.glob("*.tmp-*"))
    rows = read_rows(out, fmt)
    assert [r["id"] for r in rows] == [f"img{i:05d}.jpg" for i in range(11)]
    assert rows[10]["status"] == "corrupt" and rows[10]["caption"] is None and rows[10]["score"] is None
    assert rows[0]["n_best"] == [{"caption": "a dog", "score": -1.25}, {"caption": "a cat", "score": -2.5}]
    if fmt == "parquet":
        assert pq.read_schema(out).remove_metadata().equals(SCHEMA)
        assert rows[0]["created_at"] == dt.datetime(2026, 1, 2, 3, 4, 5, 678000, tzinfo=dt.timezone.utc)
    else:
        assert list(rows[0]) == list(COLUMNS)
        assert rows[0]["created_at"] == "2026-01-02T03:04:05.678Z"


def test_run_config_is_stored_with_the_output(out: Path, fmt: str) -> None:
    store = open_store(out, fmt)
    store.add([row(0)])
    store.finalize()
    if fmt == "parquet":
        meta = json.loads(pq.read_schema(out).metadata[b"batchcap"])
    else:
        meta = json.loads(meta_path_for(out).read_text())
        for line in out.read_text().splitlines():  # the .jsonl itself holds rows only
            assert set(json.loads(line)) == set(COLUMNS)
    assert meta["run_config"] == CONFIG
    assert meta["resume_settings"] == SETTINGS
    assert meta["format"] == fmt
    assert read_output_meta(out) == meta


def test_refuses_changed_settings_naming_them(out: Path, fmt: str) -> None:
    store = open_store(out, fmt)
    store.add([row(i) for i in range(4)])  # committed, run unfinished
    changed = {**SETTINGS, "beam_size": 5}
    with pytest.raises(ResumeRefused, match=r"--beam: 3 -> 5.*--overwrite"):
        open_store(out, fmt, changed)
    open_store(out, fmt).finalize()  # same settings: fine; now only the final output holds them
    assert not work_dir_for(out).exists()
    with pytest.raises(ResumeRefused, match=r"--beam: 3 -> 5"):
        open_store(out, fmt, changed)
    with pytest.raises(ResumeRefused, match=r"new option: null -> true"):
        open_store(out, fmt, {**SETTINGS, "new_option": True})


def test_refusal_names_the_nested_setting_that_changed(out: Path, fmt: str) -> None:
    nested = {"model": "tiny@0123456789ab", "beam": {"beam_size": 3, "max_len": 12}}
    open_store(out, fmt, nested).finalize()
    with pytest.raises(ResumeRefused, match=r"\(--beam: 3 -> 5\)"):
        open_store(out, fmt, {**nested, "beam": {"beam_size": 5, "max_len": 12}})


def test_an_output_from_before_the_word_rules_were_recorded_resumes_only_with_repeats_allowed(
    out: Path, fmt: str
) -> None:
    # Such an output was searched with the ending rule on and any word free to follow itself.
    before = {"model": "tiny@0123456789ab", "beam": {"beam_size": 3, "max_len": 12}}
    open_store(out, fmt, before).add([row(0)])
    now = {**before, "beam": {**before["beam"], "ending_rule": True, "allow_repeated_words": False}}
    with pytest.raises(ResumeRefused, match=r"\(--allow-repeated-words: true -> false\)"):
        open_store(out, fmt, now)
    with pytest.raises(ResumeRefused, match=r"\(the ending rule \(--no-ending-rule turns it off\): true -> false\)"):
        open_store(out, fmt, {**before, "beam": {**now["beam"], "ending_rule": False, "allow_repeated_words": True}})
    allowed = {**before, "beam": {**now["beam"], "allow_repeated_words": True}}
    open_store(out, fmt, allowed).finalize()


def test_an_output_from_before_caption_styles_resumes_with_style_auto_only(out: Path, fmt: str) -> None:
    before = {"model": "tiny@0123456789ab", "beam": {"beam_size": 3, "ending_rule": True}}
    open_store(out, fmt, before).add([row(0)])
    with pytest.raises(ResumeRefused, match=r"\(--style: \"?auto\"? -> \"?everyday\"?\)"):
        open_store(out, fmt, {**before, "beam": {**before["beam"], "style": "everyday"}})
    open_store(out, fmt, {**before, "beam": {**before["beam"], "style": "auto"}}).finalize()


def test_an_output_from_before_reranking_resumes_only_without_it(out: Path, fmt: str) -> None:
    # Such an output kept the search's own order: continuing it reranked would mix two searches.
    before = {"model": "tiny@0123456789ab", "beam": {"beam_size": 3, "ending_rule": True, "style": "auto"}}
    open_store(out, fmt, before).add([row(0)])
    with pytest.raises(ResumeRefused, match=r"\(--consensus-weight: 0.0 -> 1.0\)"):
        open_store(out, fmt, {**before, "beam": {**before["beam"], "consensus_weight": 1.0}})
    open_store(out, fmt, {**before, "beam": {**before["beam"], "consensus_weight": 0.0}}).finalize()


def test_refuses_foreign_or_unreadable_output(out: Path, fmt: str) -> None:
    out.write_text("not ours\n")
    with pytest.raises(ResumeRefused, match="--overwrite"):
        open_store(out, fmt)
    store = open_store(out, fmt, overwrite=True)
    assert store.done == {}


def test_overwrite_starts_over(out: Path, fmt: str) -> None:
    store = open_store(out, fmt)
    store.add([row(i) for i in range(6)])
    store.finalize()
    store = open_store(out, fmt)
    store.add([row(i) for i in range(6, 10)])  # an unfinished second run
    changed = {**SETTINGS, "beam_size": 5}
    fresh = open_store(out, fmt, changed, overwrite=True)
    assert fresh.done == {} and fresh.previous_rows == 0
    assert not out.exists() and parts_of(out) == []
    fresh.add([row(100)])
    fresh.finalize()
    assert [r["id"] for r in read_rows(out, fmt)] == ["img00100.jpg"]
    assert open_store(out, fmt, changed).done == {"img00100.jpg": (100, 1_000)}


def test_incremental_finalize_replaces_by_id(out: Path, fmt: str) -> None:
    store = open_store(out, fmt)
    store.add([row(i) for i in range(8)])
    store.finalize()

    store = open_store(out, fmt)
    assert len(store.done) == 8
    store.add([row(3, caption="a changed picture", size=200, mtime_ns=2_000), row(8), row(9)])
    summary = store.finalize()
    assert (summary.rows_total, summary.rows_new, summary.rows_replaced) == (10, 2, 1)
    rows = read_rows(out, fmt)
    ids = [r["id"] for r in rows]
    assert sorted(ids) == [f"img{i:05d}.jpg" for i in range(10)] and len(set(ids)) == 10
    changed = next(r for r in rows if r["id"] == "img00003.jpg")
    assert changed["caption"] == "a changed picture" and changed["size"] == 200
    assert open_store(out, fmt).done["img00003.jpg"] == (200, 2_000)


def test_later_part_replaces_earlier_row_of_same_id(out: Path, fmt: str) -> None:
    store = open_store(out, fmt, commit_every=1)
    store.add([row(1, status="unreadable")])
    assert "img00001.jpg" not in store.done  # retried next time
    store.add([row(1)])
    assert store.done["img00001.jpg"] == (100, 1_000)
    store.finalize()
    rows = read_rows(out, fmt)
    assert len(rows) == 1 and rows[0]["status"] == "ok"


@pytest.mark.parametrize(
    "status,done",
    [("missing", False), ("unreadable", False), ("shard_error", False), ("corrupt", True), ("too_large", True)],
)
def test_which_failures_count_as_done(out: Path, fmt: str, status: str, done: bool) -> None:
    store = open_store(out, fmt)
    store.add([row(0, status=status, size=None, mtime_ns=None)])
    store.finalize()
    again = open_store(out, fmt)
    assert ("img00000.jpg" in again.done) is done
    assert again.previous_rows == 1


def test_refinalize_after_kill_between_replace_and_cleanup(out: Path, fmt: str, monkeypatch) -> None:
    store = open_store(out, fmt)
    store.add([row(i) for i in range(5)])
    store.finalize()
    store = open_store(out, fmt)
    store.add([row(2, caption="replaced", size=7), row(5), row(6)])

    import batchcap.outputs.store as sink

    def killed(work: Path) -> None:
        raise KeyboardInterrupt("killed after os.replace")

    monkeypatch.setattr(sink, "_remove_work", killed)
    with pytest.raises(KeyboardInterrupt):
        store.finalize()
    monkeypatch.undo()
    assert parts_of(out)  # the clean-up never happened
    first = sorted(read_rows(out, fmt), key=lambda r: r["id"])

    again = open_store(out, fmt)
    assert again.done["img00002.jpg"] == (7, 1_000) and len(again.done) == 7
    again.finalize()
    second = sorted(read_rows(out, fmt), key=lambda r: r["id"])
    assert second == first
    assert [r["id"] for r in second] == [f"img{i:05d}.jpg" for i in range(7)]
    assert next(r for r in second if r["id"] == "img00002.jpg")["caption"] == "replaced"
    assert not work_dir_for(out).exists()


def test_temp_files_are_ignored_and_removed(out: Path, fmt: str) -> None:
    store = open_store(out, fmt)
    store.add([row(i) for i in range(4)])
    work = work_dir_for(out)
    (work / ".tmp-deadbeef.parquet").write_bytes(b"PAR1 half a part")  # a commit cut short
    stale_final = out.with_name(out.name + ".tmp-0123abcd")
    stale_final.write_bytes(b"half a final output")
    again = open_store(out, fmt)
    assert len(again.done) == 4
    assert not (work / ".tmp-deadbeef.parquet").exists() and not stale_final.exists()
    again.finalize()
    assert len(read_rows(out, fmt)) == 4


def test_finished_rerun_rewrites_nothing(out: Path, fmt: str) -> None:
    store = open_store(out, fmt)
    store.add([row(i) for i in range(5)])
    store.finalize()
    before = os.stat(out)
    again = open_store(out, fmt)
    summary = again.finalize()
    assert (summary.rows_total, summary.rows_new, summary.rewritten) == (5, 0, False)
    assert os.stat(out).st_ino == before.st_ino and not work_dir_for(out).exists()


def test_empty_run_writes_an_empty_valid_output(out: Path, fmt: str) -> None:
    summary = open_store(out, fmt).finalize()
    assert summary.rows_total == 0 and out.exists()
    assert read_rows(out, fmt) == []


def test_large_merge_streams_in_row_groups(out: Path, fmt: str, monkeypatch) -> None:
    import batchcap.outputs.store as sink

    monkeypatch.setattr(sink, "ROW_GROUP_ROWS", 50)
    store = open_store(out, fmt, commit_every=37)
    store.add([row(i) for i in range(300)])
    store.finalize()
    store = open_store(out, fmt, commit_every=37)
    store.add([row(i, caption="again") for i in range(250, 400)])
    summary = store.finalize()
    assert (summary.rows_total, summary.rows_new, summary.rows_replaced) == (400, 100, 50)
    rows = read_rows(out, fmt)
    assert len(rows) == 400 and len({r["id"] for r in rows}) == 400
    if fmt == "parquet":
        assert pq.ParquetFile(out).num_row_groups > 1


def test_rows_are_checked(out: Path, fmt: str) -> None:
    store = open_store(out, fmt)
    with pytest.raises(ValueError, match="unknown output columns"):
        store.add([{**row(0), "colour": "red"}])
    with pytest.raises(ValueError, match="string id"):
        store.add([{"status": "ok"}])


def test_infer_format() -> None:
    assert infer_format("a/b.parquet") == "parquet"
    assert infer_format("a/b.JSONL") == "jsonl"
    assert infer_format("a/b.out", "jsonl") == "jsonl"
    with pytest.raises(ValueError, match="--format"):
        infer_format("a/b.csv")
    with pytest.raises(ValueError, match="format must be"):
        infer_format("a/b.parquet", "csv")


def test_stale_retry_rows_are_dropped_when_not_emitted_again(out: Path, fmt: str) -> None:
    shard_error = {**row(99, status="shard_error", size=None, mtime_ns=None), "id": "train-0001.tar"}
    store = open_store(out, fmt, commit_every=1)
    store.add([row(0, size=None, mtime_ns=None), shard_error, row(1, status="missing")])
    store.finalize()
    assert len(read_rows(out, fmt)) == 3

    # The shard now reads to its end, the missing file is back: the next pass emits
    # no shard_error row, and an ok row for the file.
    store = open_store(out, fmt, commit_every=1)
    assert set(store.done) == {"img00000.jpg"}
    store.add([row(1)])
    store.commit()
    del store  # killed: this attempt's parts are now an earlier attempt's
    store = open_store(out, fmt, commit_every=1)
    summary = store.finalize()
    rows = {r["id"]: r["status"] for r in read_rows(out, fmt)}
    assert rows == {"img00000.jpg": "ok", "img00001.jpg": "ok"}
    assert (summary.rows_total, summary.rows_replaced, summary.rows_dropped) == (2, 1, 1)

    # A retry-status row emitted by the attempt that finalizes is kept.
    store = open_store(out, fmt, commit_every=1)
    store.add([{**shard_error, "id": "train-0002.tar"}])
    summary = store.finalize()
    assert {r["id"] for r in read_rows(out, fmt)} == {"img00000.jpg", "img00001.jpg", "train-0002.tar"}

    # ... until a finished rerun (no parts) no longer emits it: the output is rewritten without it.
    summary = open_store(out, fmt).finalize()
    assert summary.rewritten and summary.rows_dropped == 1 and summary.rows_total == 2
    assert not open_store(out, fmt).finalize().rewritten


def test_resume_summary_tells_this_run_from_an_interrupted_attempt(out: Path, fmt: str) -> None:
    from batchcap.pipeline.runner import output_summary

    first = open_store(out, fmt)
    first.add([row(i) for i in range(8)])  # committed in parts; then the process was killed
    resumed = open_store(out, fmt)
    assert len(resumed.done) == 8
    resumed.add([row(i) for i in range(8, 20)])  # what the resumed process captioned itself
    summary = output_summary(resumed.finalize(), processed=12)
    assert summary["rows in output"] == 20 and summary["added to output"] == 20
    assert summary["from earlier attempts"].startswith("8 ")
    rerun = open_store(out, fmt)
    rerun.add([row(i, caption="new") for i in (3, 20)])  # one changed file, one new one
    summary = output_summary(rerun.finalize(), processed=2)
    assert summary["added to output"] == 1 and summary["replaced rows"] == 1
    assert "from earlier attempts" not in summary


def test_outputs_read_back_in_pandas_and_duckdb_as_the_readme_shows(out: Path, fmt: str) -> None:
    # docs/outputs.md's three-line recipes, run on a real output (list-of-struct n_best, UTC timestamps).
    pd = pytest.importorskip("pandas")
    duckdb = pytest.importorskip("duckdb")
    store = open_store(out, fmt)
    store.add([row(i) for i in range(5)] + [row(5, status="corrupt")])
    store.finalize()
    df = pd.read_parquet(out) if fmt == "parquet" else pd.read_json(out, lines=True)
    assert len(df) == 6 and sorted(df["status"]) == ["corrupt"] + ["ok"] * 5
    assert df.loc[df["status"] == "ok", "n_best"].iloc[0][1]["caption"] == "a cat"
    table = f"'{out}'" if fmt == "parquet" else f"read_json_auto('{out}')"
    counts = duckdb.sql(f"SELECT status, count(*) AS n FROM {table} GROUP BY status ORDER BY status").fetchall()
    assert counts == [("corrupt", 1), ("ok", 5)]
    worst = duckdb.sql(f"SELECT id, caption, score FROM {table} WHERE status = 'ok' ORDER BY score, id LIMIT 2")
    assert [r[0] for r in worst.fetchall()] == ["img00000.jpg", "img00001.jpg"]


def _as_previous_version(out: Path, fmt: str) -> None:
    """Rewrite a finished output's metadata as schema version 1 wrote it."""
    meta = read_output_meta(out, fmt)
    assert meta is not None and meta["schema_version"] == 2
    meta["schema_version"] = 1
    if fmt == "parquet":
        table = pq.read_table(out)
        pq.write_table(table.replace_schema_metadata({"batchcap": json.dumps(meta)}), out)
    else:
        meta_path_for(out).write_text(json.dumps(meta))


def test_new_columns_are_last_and_round_trip(out: Path, fmt: str) -> None:
    assert COLUMNS[-2:] == ("logprob", "confidence")
    store = open_store(out, fmt)
    store.add([{**row(1), "logprob": -0.5, "confidence": 0.75}, row(2, "undecodable")])
    store.finalize()
    first, second = read_rows(out, fmt)
    assert (first["logprob"], first["confidence"]) == (-0.5, 0.75)
    assert second["logprob"] is None and second["confidence"] is None


def test_refuses_to_resume_into_an_output_of_the_previous_schema_version(out: Path, fmt: str) -> None:
    store = open_store(out, fmt)
    store.add([row(1)])
    store.finalize()
    _as_previous_version(out, fmt)
    before = out.read_bytes()
    with pytest.raises(ResumeRefused, match=r"output schema version 1, this batchcap writes version 2.*--overwrite"):
        open_store(out, fmt)
    assert out.read_bytes() == before  # nothing touched
    open_store(out, fmt, overwrite=True).finalize()  # --overwrite starts over


def test_refuses_an_unfinished_run_of_the_previous_schema_version(out: Path, fmt: str) -> None:
    store = open_store(out, fmt, commit_every=1)
    store.add([row(1)])  # committed as a part; the run is "killed" here
    run_json = work_dir_for(out) / "run.json"
    meta = json.loads(run_json.read_text())
    run_json.write_text(json.dumps({**meta, "schema_version": 1}))
    with pytest.raises(ResumeRefused, match="schema version 1"):
        open_store(out, fmt)


def test_interrupted_attempts_under_other_thresholds_are_relabelled_on_finalize(tmp_path: Path, fmt: str) -> None:
    """Each attempt may run with its own --min-confidence: the finished output carries the last one's labels."""
    out = tmp_path / f"c.{fmt}"
    confidences = [0.1, 0.6, 0.7, 0.9]
    rows = [{**row(i), "confidence": c} for i, c in enumerate(confidences)]
    first = OutputStore.open(out, fmt, SETTINGS, CONFIG, commit_every=1, min_confidence=0.8)
    first.add([{**r, "status": "low_confidence" if r["confidence"] < 0.8 else "ok"} for r in rows[:2]])
    first.commit()  # killed here: parts committed under 0.8, never finalised
    second = OutputStore.open(out, fmt, SETTINGS, CONFIG, commit_every=1, min_confidence=0.5)
    assert set(second.done) == {rows[0]["id"], rows[1]["id"]}
    second.add([{**r, "status": "low_confidence" if r["confidence"] < 0.5 else "ok"} for r in rows[2:]])
    final = second.finalize()
    statuses = {r["id"]: r["status"] for r in read_rows(out, fmt)}
    assert statuses == {r["id"]: "low_confidence" if r["confidence"] < 0.5 else "ok" for r in rows}
    assert final.rows_relabelled == 1 and final.rows_low_confidence == 1  # 0.6: low under 0.8, ok under 0.5
    assert read_output_meta(out)["min_confidence"] == 0.5
