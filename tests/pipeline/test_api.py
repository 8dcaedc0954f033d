"""The Python API: ``batchcap.load_model`` / ``caption`` / ``caption_stream`` and ``batchcap.run``."""

from __future__ import annotations

import inspect
import io
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import click
import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import write_images
from PIL import Image

import batchcap
from batchcap.config import UsageError
from batchcap.pipeline.api import ImageCaptioner

REPO = Path(__file__).resolve().parents[2]
FAST = {"device": "cpu", "precision": "fp32", "backend": "torch"}  # no OpenVINO conversion in unit tests


@pytest.fixture(scope="module")
def captioner(tiny_model_path: Path) -> ImageCaptioner:
    return batchcap.load_model(tiny_model_path, beam=3, **FAST)


def test_import_batchcap_is_light_and_exports_the_api_lazily() -> None:
    code = (
        "import sys, batchcap; assert 'torch' not in sys.modules, 'import batchcap loaded torch';"
        "assert {'load_model', 'run', 'CaptionResult'} <= set(dir(batchcap));"
        "batchcap.load_model; assert 'torch' in sys.modules; print(batchcap.__version__)"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == batchcap.__version__
    with pytest.raises(AttributeError):
        batchcap.no_such_name  # noqa: B018


def test_caption_takes_paths_bytes_pillow_and_arrays_in_order(
    captioner: ImageCaptioner, tmp_path: Path, one_torch_thread: None
) -> None:
    paths = write_images(tmp_path / "photos", 3, size=(48, 40))
    array = np.asarray(Image.open(paths[2]).convert("RGB"))
    results = captioner.caption([paths[0], str(paths[1]), paths[0].read_bytes(), Image.open(paths[1]), array])
    assert [r.status for r in results] == ["ok"] * 5
    assert all(r.caption and r.error is None and r.n_best is None for r in results)
    assert [(r.width, r.height) for r in results] == [(48, 40)] * 5
    # the same picture by path, by bytes or opened by Pillow is the same input
    assert results[2].caption == results[0].caption and results[2].score == pytest.approx(results[0].score)
    assert results[3].caption == results[1].caption and results[3].score == pytest.approx(results[1].score)
    assert set(results[0].as_dict()) == {
        "caption",
        "score",
        "logprob",
        "confidence",
        "n_best",
        "status",
        "error",
        "width",
        "height",
    }


def test_bad_items_become_results_not_exceptions(
    captioner: ImageCaptioner, tmp_path: Path, one_torch_thread: None
) -> None:
    good = write_images(tmp_path / "photos", 1)[0]
    items = [
        tmp_path / "missing.jpg",
        b"\xff\xd8\xff not really a jpeg",
        good,
        np.zeros((20, 30, 2), np.uint8),  # two channels
        np.zeros((20, 30, 3), np.float32),  # not uint8
        good.read_bytes()[:200],  # truncated
        b"",
    ]
    results = captioner.caption(items)
    assert [r.status for r in results] == [
        "missing",
        "unsupported",
        "ok",
        "unsupported",
        "unsupported",
        "corrupt",
        "corrupt",
    ]
    for r in results:
        assert (r.caption is None) == (r.status != "ok") and (r.error is None) == (r.status == "ok")
    assert "(20, 30, 2)" in results[3].error and "float32" in results[4].error
    with pytest.raises(TypeError, match="cannot caption a int"):
        captioner.caption([good, 7])  # a bug in the caller, not bad data
    with pytest.raises(TypeError, match=r"caption\(\[item\]\)\[0\]"):
        captioner.caption(str(good))  # one item, not a list: never captioned letter by letter


def test_the_in_memory_rules_are_runs_rules(
    captioner: ImageCaptioner, tiny_model_path: Path, tmp_path: Path, one_torch_thread: None
) -> None:
    small = batchcap.load_model(tiny_model_path, max_pixels=1000, background=(0, 0, 0), **FAST)
    big = small.caption([np.zeros((40, 30, 3), np.uint8), Image.new("RGB", (40, 30))])
    assert [r.status for r in big] == ["too_large"] * 2 and "1000" in big[0].error
    # EXIF orientation is applied to an opened picture as to a file: 6 turns a 48x40 photo upright
    photo = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 48, 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "turned.jpg"
    photo.save(path, exif=exif)
    by_path, by_pillow = captioner.caption([path, Image.open(path)])
    assert (by_path.width, by_path.height) == (by_pillow.width, by_pillow.height) == (40, 48)
    assert by_path.caption == by_pillow.caption
    # transparency is composited on the background, as in run
    clear = np.zeros((8, 8, 4), np.uint8)
    black = np.zeros((8, 8, 3), np.uint8)
    a, b = small.caption([clear, black])
    assert a.caption == b.caption and a.score == pytest.approx(b.score)


def test_n_best_lists_the_captions_best_first(captioner: ImageCaptioner, image_folder: Path) -> None:
    paths = sorted(image_folder.iterdir())[:2]
    one = captioner.caption(paths)
    three = captioner.caption(paths, n_best=3)
    for best, ranked in zip(one, three):
        assert len(ranked.n_best) == 3 and ranked.n_best[0] == {"caption": best.caption, "score": best.score}
        assert [h["score"] for h in ranked.n_best] == sorted((h["score"] for h in ranked.n_best), reverse=True)
    with pytest.raises(ValueError, match="beam=4"):
        captioner.caption(paths, n_best=4)


def test_caption_stream_batches_lazily_and_keeps_the_order(
    captioner: ImageCaptioner, tmp_path: Path, one_torch_thread: None
) -> None:
    paths = write_images(tmp_path / "photos", 7)
    items = [paths[0], b"junk", *paths[1:4], tmp_path / "gone.png", *paths[4:]]
    pulled: list[int] = []

    def source() -> Iterator[object]:
        for i, item in enumerate(items):
            pulled.append(i)
            yield item

    with pytest.raises(ValueError, match="beam=5"):
        captioner.caption_stream(source(), n_best=5)  # checked at the call, before any item is read
    assert pulled == []
    stream = captioner.caption_stream(source(), batch_size=3)
    first = next(stream)
    assert len(pulled) == 3  # one batch read, not the whole iterable
    streamed = [first, *stream]
    assert len(streamed) == len(items)
    assert [r.status for r in streamed] == ["ok", "unsupported", "ok", "ok", "ok", "missing", "ok", "ok", "ok"]
    whole = captioner.caption(items)  # one batch: the same results in the same order
    assert [r.caption for r in streamed] == [r.caption for r in whole]
    assert [r.score for r in streamed] == pytest.approx([r.score for r in whole], nan_ok=True)


def test_run_resumes_and_a_second_call_finds_nothing_to_do(
    tiny_model_path: Path, tmp_path: Path, one_torch_thread: None
) -> None:
    folder = tmp_path / "photos"
    write_images(folder, 5)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    out = tmp_path / "captions.parquet"
    options = dict(model=tiny_model_path, workers=0, batch_size=4, **FAST)
    log = io.StringIO()
    first = batchcap.run(folder, out, stream=log, **options)
    assert first.exit_code == 0, log.getvalue()
    assert first.summary["ok"] == 5 and first.summary["failed_total"] == 1
    rows = {r["id"]: r for r in pq.read_table(out).to_pylist()}
    assert len(rows) == 6 and rows["broken.jpg"]["status"] != "ok" and rows["broken.jpg"]["error"]

    again = batchcap.run([str(folder)], str(out), stream=io.StringIO(), **options)
    assert again.exit_code == 0 and again.summary["processed"] == 0 and again.summary["skipped"] == 6
    assert "nothing new to caption" in again.summary["note"]

    # run and the in-memory captioner decode and caption a file alike
    mine = batchcap.load_model(tiny_model_path, **FAST).caption([folder / "img00002.jpg"])[0]
    assert mine.caption == rows["img00002.jpg"]["caption"]
    assert mine.score == pytest.approx(rows["img00002.jpg"]["score"], abs=1e-4)


def test_run_refuses_what_the_command_refuses(tiny_model_path: Path, tmp_path: Path) -> None:
    out = tmp_path / "captions.parquet"
    with pytest.raises(UsageError, match="at least one SOURCE"):
        batchcap.run([], out, model=tiny_model_path)
    with pytest.raises(UsageError, match="max-failures"):
        batchcap.run(tmp_path, out, model=tiny_model_path, max_failures="lots")
    with pytest.raises(ValueError, match="--beam 3 or more"):
        batchcap.run(tmp_path, out, model=tiny_model_path, beam=2, n_best=3)
    assert not out.exists()


def test_the_run_command_and_batchcap_run_take_the_same_options_with_the_same_defaults() -> None:
    from batchcap.cli import run as run_command

    api = dict(inspect.signature(batchcap.run).parameters)
    # --ray and its settings are run_on_ray's own keywords; the rest it passes on to batchcap.run
    on_ray = inspect.signature(batchcap.run_on_ray).parameters
    api.update({name: p for name, p in on_ray.items() if p.kind == p.KEYWORD_ONLY and name not in api})
    options = [p for p in run_command.params if isinstance(p, click.Option)]
    assert {p.name for p in options} | {"sources", "stream"} == set(api)
    for param in options:
        assert param.opts[0] == "--" + param.name.replace("_", "-"), param.name  # --no-draft is no_draft
        if param.name == "tasks":
            assert api["tasks"].default is inspect.Parameter.empty  # required with --ray; the command says so
        elif not param.required:
            default = param.default is True if param.is_flag else param.default  # an unset flag is off
            assert api[param.name].default == default, param.name
