"""Progress lines, the summary, --max-failures parsing, exit codes."""

from __future__ import annotations

import io
import re

import pytest

from batchcap.pipeline import progress
from batchcap.pipeline.progress import MaxFailures, Progress, parse_max_failures


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")  # anything but \t and \n


def test_non_tty_logs_plain_key_value_lines_every_n_seconds() -> None:
    stream, clock = io.StringIO(), FakeClock()
    with Progress(100, tty=False, log_every=30.0, stream=stream, clock=clock) as bar:
        bar.advance(ok=10, failed={"corrupt": 1})
        assert stream.getvalue() == ""  # not yet 30 s
        clock.now += 31
        bar.advance(ok=9, failed={}, skipped=20)
        clock.now += 5
        bar.advance(ok=10)
        clock.now += 30
        bar.advance(ok=10, ignored=2)
        summary = bar.summary("out/captions.parquet")
    text = stream.getvalue()
    assert not CONTROL.search(text)
    lines = text.splitlines()
    logs = [line for line in lines if line.startswith("time=")]
    assert len(logs) == 2
    fields = dict(item.split("=", 1) for item in logs[0].split())
    assert fields["done"] == "40" and fields["total"] == "100" and fields["ok"] == "19"
    assert fields["failed"] == "1" and fields["rate"] == "0.65/s" and fields["eta"] == "1m33s"
    assert summary == {
        "ok": 39,
        "failed": {"corrupt": 1},
        "failed_total": 1,
        "skipped": 20,
        "ignored": 2,
        "processed": 40,
        "wall_s": 66.0,
        "images_per_s": 0.61,
        "output": "out/captions.parquet",
    }
    assert "failed now:             1 (corrupt 1)" in text
    assert "already done:           20" in text and "output:                 out/captions.parquet" in text


def test_unknown_total_and_summary_extras() -> None:
    stream, clock = io.StringIO(), FakeClock()
    with Progress(None, tty=False, log_every=0, stream=stream, clock=clock) as bar:
        clock.now += 2
        bar.advance(ok=4, failed={"corrupt": 1, "too_large": 2})
        result = bar.summary(extra={"new rows": 4}, echo=True)
    assert "total=? " in stream.getvalue() and "eta=?" in stream.getvalue()
    assert result["failed"] == {"corrupt": 1, "too_large": 2} and result["new rows"] == 4
    assert "new rows:               4" in stream.getvalue()


def test_tty_draws_a_rich_bar() -> None:
    stream = io.StringIO()
    with Progress(10, tty=True, stream=stream) as bar:
        bar.advance(ok=3, failed={"corrupt": 1})
        bar.summary("x.parquet")
    text = stream.getvalue()
    assert "\x1b[" in text and "ok 3" in text and "failed 1" in text and "img/s" in text


@pytest.mark.parametrize(
    "text,expected",
    [
        ("10", MaxFailures(count=10)),
        ("0", MaxFailures(count=0)),
        (" 7 ", MaxFailures(count=7)),
        ("0.05", MaxFailures(fraction=0.05)),
        ("5%", MaxFailures(fraction=0.05)),
        ("1.0", MaxFailures(fraction=1.0)),
        ("100%", MaxFailures(fraction=1.0)),
        (".5", MaxFailures(fraction=0.5)),
    ],
)
def test_parse_max_failures(text: str, expected: MaxFailures) -> None:
    assert parse_max_failures(text) == expected


@pytest.mark.parametrize("text", ["", "ten", "-1", "1.5", "150%", "nan", "inf", "5%%", "-0.1"])
def test_parse_max_failures_rejects_nonsense(text: str) -> None:
    with pytest.raises(ValueError, match="--max-failures takes a count"):
        parse_max_failures(text)


def test_max_failures_exceeded() -> None:
    assert not MaxFailures(count=2).exceeded(2, 10)
    assert MaxFailures(count=2).exceeded(3, 10)
    assert MaxFailures(count=0).exceeded(1, 1000)
    assert not MaxFailures(fraction=0.1).exceeded(1, 10)
    assert MaxFailures(fraction=0.1).exceeded(2, 10)
    assert not MaxFailures(fraction=0.0).exceeded(0, 0)  # nothing processed, nothing exceeded
    assert not MaxFailures(fraction=1.0).exceeded(10, 10)


def test_exit_codes_are_distinct() -> None:
    codes = [
        progress.EXIT_OK,
        progress.EXIT_CRASH,
        progress.EXIT_USAGE,
        progress.EXIT_LOCKED,
        progress.EXIT_RESUME_REFUSED,
        progress.EXIT_TOO_MANY_FAILURES,
    ]
    assert codes == [0, 1, 2, 3, 4, 5]
