"""batchcap.pipeline.runner: run_job in-process on a few generated pictures, and its small contracts."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import write_images

from batchcap.config import BeamConfig, ImagePolicy, RunConfig, to_dict
from batchcap.model.modelfile import read_metadata
from batchcap.outputs.store import FinalizeSummary, read_output_meta, work_dir_for
from batchcap.pipeline.progress import EXIT_OK, EXIT_TOO_MANY_FAILURES
from batchcap.pipeline.runner import RunResult, model_identity, output_summary, resume_settings, run_job
from batchcap.pipeline.settings import runtime_config

BEAM = BeamConfig(beam_size=2, max_len=6)


def run(folder: Path, out: Path, model: Path, beam: BeamConfig = BEAM, **cfg: object) -> tuple[RunResult, str]:
    stream = io.StringIO()
    result = run_job(
        RunConfig(sources=(str(folder),), out=str(out), log_every=0, **cfg),  # type: ignore[arg-type]
        model,
        beam,
        runtime_config("cpu", "fp32", 4, "0", "torch"),
        ImagePolicy(),
        stream=stream,
    )
    return result, stream.getvalue()


def rows(out: Path) -> dict[str, dict]:
    return {r["id"]: r for r in pq.read_table(out).to_pylist()}


def test_model_identity_is_name_at_twelve_hex_digits(tiny_model_path: Path) -> None:
    meta = read_metadata(tiny_model_path)
    assert model_identity(meta) == f"tiny@{meta['tensors_sha256'][:12]}"
    assert model_identity({"name": "m", "tensors_sha256": "0123456789abcdef"}) == "m@0123456789ab"
    assert model_identity({}) == "batchcap-model@"


def test_resume_settings_hold_what_a_resumed_run_must_share() -> None:
    meta = {"name": "m", "tensors_sha256": "ab" * 32, "preprocess": {"resize": "squash"}}
    settings = resume_settings(meta, BEAM)
    assert settings == {
        "model": "m@" + "ab" * 6,
        "preprocess": {"resize": "squash"},
        "beam": to_dict(BEAM),
        "id_from": "relative",
        "id_column": None,
    }
    json.dumps(settings)
    # the id scheme is shared by every attempt; --min-confidence is not (it only relabels rows)
    assert resume_settings(meta, BEAM, "source-relative")["id_from"] == "source-relative"
    assert resume_settings(meta, BEAM, "source-relative") != resume_settings(meta, BEAM, "absolute")
    assert resume_settings(meta, BEAM, id_column="sku") != resume_settings(meta, BEAM)  # ids from another column
    assert resume_settings(meta, BEAM) != resume_settings(meta, BeamConfig(beam_size=3, max_len=6))
    other = {**meta, "tensors_sha256": "cd" * 32}
    assert resume_settings(meta, BEAM) != resume_settings(other, BEAM)


def test_output_summary_tells_earlier_attempts_from_this_run() -> None:
    final = FinalizeSummary("o.parquet", rows_total=400, rows_new=400, rows_replaced=0, rewritten=True)
    assert output_summary(final, processed=272) == {
        "rows in output": 400,
        "added to output": 400,
        "replaced rows": 0,
        "from earlier attempts": "128 (committed before an interruption, now in the output)",
    }
    assert "from earlier attempts" not in output_summary(final, processed=400)
    replaced = FinalizeSummary("o.parquet", rows_total=10, rows_new=2, rows_replaced=3, rewritten=True)
    summary = output_summary(replaced, processed=5)
    assert (summary["added to output"], summary["replaced rows"]) == (2, 3)
    assert "from earlier attempts" not in summary
    assert "from earlier attempts" not in output_summary(replaced, processed=9)  # never negative


def test_run_job_captions_every_picture_and_a_rerun_does_nothing(tmp_path: Path, tiny_model_path: Path) -> None:
    folder = tmp_path / "photos"
    write_images(folder, 5)
    out = tmp_path / "captions.parquet"
    result, log = run(folder, out, tiny_model_path)
    assert result.exit_code == EXIT_OK, log
    s = result.summary
    assert (s["ok"], s["failed_total"], s["processed"], s["skipped"]) == (5, 0, 5, 0)
    assert (s["rows in output"], s["added to output"], s["replaced rows"]) == (5, 5, 0)
    assert s["output"] == str(out)
    assert "captioned now" in log
    got = rows(out)
    assert sorted(got) == sorted(p.name for p in folder.iterdir())
    identity = model_identity(read_metadata(tiny_model_path))
    for row in got.values():
        assert row["status"] == "ok" and row["error"] is None
        assert isinstance(row["caption"], str)
        assert row["model"] == identity
        assert (row["width"], row["height"]) == (48, 40)
    meta = read_output_meta(out)
    assert meta is not None
    assert meta["resume_settings"] == json.loads(json.dumps(resume_settings(read_metadata(tiny_model_path), BEAM)))
    assert meta["run_config"]["beam"] == to_dict(BEAM) and meta["run_config"]["model"] == identity
    assert not work_dir_for(out).exists()

    again, log = run(folder, out, tiny_model_path)
    assert again.exit_code == EXIT_OK
    assert (again.summary["processed"], again.summary["skipped"]) == (0, 5)
    assert again.summary["note"] == "nothing new to caption: every input is already in the output"
    assert rows(out) == got


def test_a_corrupt_picture_becomes_a_failure_row(tmp_path: Path, tiny_model_path: Path) -> None:
    folder = tmp_path / "photos"
    write_images(folder, 3)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a JPEG at all")
    out = tmp_path / "captions.parquet"
    result, log = run(folder, out, tiny_model_path)
    assert result.exit_code == EXIT_OK, log  # 1 of 4 is within the default --max-failures 0.5
    assert (result.summary["ok"], result.summary["failed_total"]) == (3, 1)
    assert result.summary["failed"] == {"corrupt": 1}
    got = rows(out)
    assert len(got) == 4
    bad = next(r for r in got.values() if r["id"].endswith("broken.jpg"))
    assert bad["status"] == "corrupt" and bad["caption"] is None and bad["score"] is None
    assert bad["error"] and "\n" not in bad["error"]
    assert sum(r["status"] == "ok" for r in got.values()) == 3


def test_too_many_failures_finish_the_output_but_exit_with_their_code(tmp_path: Path, tiny_model_path: Path) -> None:
    folder = tmp_path / "photos"
    write_images(folder, 1)
    for i in range(2):
        (folder / f"broken{i}.png").write_bytes(b"not a picture")
    out = tmp_path / "captions.parquet"
    result, log = run(folder, out, tiny_model_path, max_failures="1")
    assert result.exit_code == EXIT_TOO_MANY_FAILURES
    assert "2 of 3 inputs failed" in log
    assert len(rows(out)) == 3  # the output is complete all the same


@pytest.mark.parametrize("n_best", [1, 2])
def test_n_best_rows_follow_the_beam_config(tmp_path: Path, tiny_model_path: Path, n_best: int) -> None:
    folder = tmp_path / "photos"
    write_images(folder, 2)
    out = tmp_path / "captions.parquet"
    result, _ = run(folder, out, tiny_model_path, beam=BeamConfig(beam_size=2, max_len=6, n_best=n_best))
    assert result.exit_code == EXIT_OK
    for row in rows(out).values():
        if n_best == 1:
            assert row["n_best"] is None
        else:
            assert len(row["n_best"]) == 2 and row["n_best"][0]["caption"] == row["caption"]
