"""Progress reporting, the end-of-run summary, ``--max-failures`` and exit codes.

On a terminal a rich progress bar; off a terminal (cron, Slurm logs) one ``key=value``
line every ``log_every`` seconds with no control characters; always a plain summary at
the end.
"""

from __future__ import annotations

import datetime as dt
import math
import re
import sys
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TextIO

# Exit codes of ``batchcap run``; cron and Slurm scripts branch on them.
EXIT_OK = 0  # every input has a row; failures within --max-failures
EXIT_CRASH = 1  # a bug: an uncaught exception and its traceback (Python's own 1)
EXIT_USAGE = 2  # the command cannot run as given: bad option (click's 2), missing source or model
EXIT_LOCKED = 3  # another run is writing this output; nothing was done
EXIT_RESUME_REFUSED = 4  # the existing output was made with other settings; nothing was done
EXIT_TOO_MANY_FAILURES = 5  # the output is complete, but more inputs failed than --max-failures
EXIT_INTERRUPTED = 6  # stopped by SIGTERM/SIGINT; captioned rows are committed: rerun to resume
EXIT_IO_ERROR = 7  # writing the output failed (disk full, I/O error); committed rows kept: fix, rerun


@dataclass(frozen=True)
class MaxFailures:
    """How many failed inputs a run tolerates: a ``count``, or a ``fraction`` of those processed."""

    count: int | None = None
    fraction: float | None = None

    def exceeded(self, failed: int, processed: int) -> bool:
        """True when ``failed`` of ``processed`` inputs is more than allowed."""
        if self.count is not None:
            return failed > self.count
        assert self.fraction is not None
        return processed > 0 and failed / processed > self.fraction

    def __str__(self) -> str:
        return str(self.count) if self.count is not None else f"{self.fraction:g} of processed inputs"


_INT = re.compile(r"^\d+$")


def parse_max_failures(text: str) -> MaxFailures:
    """``"10"`` is a count, ``"0.05"`` or ``"5%"`` a fraction of the inputs processed."""
    raw = str(text).strip()
    hint = (
        "--max-failures takes a count (e.g. 10), a fraction between 0 and 1 (e.g. 0.05) "
        f"or a percentage (e.g. 5%), not {text!r}"
    )
    if _INT.match(raw):
        return MaxFailures(count=int(raw))
    percent = raw.endswith("%")
    try:
        value = float(raw[:-1] if percent else raw)
    except ValueError:
        raise ValueError(hint) from None
    if percent:
        value /= 100.0
    if not math.isfinite(value) or not 0.0 <= value <= 1.0:
        raise ValueError(hint)
    return MaxFailures(fraction=value)


def _fmt_seconds(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m{secs:02d}s"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


class Progress:
    """Counts ok / failed / skipped / ignored inputs and reports them as the run goes.

    ``total`` counts everything that will be passed to ``advance`` (skipped and ignored
    included); ``None`` when unknown. ``tty=None`` asks ``stream.isatty()``.
    """

    def __init__(
        self,
        total: int | None,
        *,
        tty: bool | None = None,
        log_every: float = 30.0,
        stream: TextIO | None = None,
        clock: Any = time.monotonic,
    ) -> None:
        self.total = total
        self.stream = stream if stream is not None else sys.stderr
        self.tty = bool(tty if tty is not None else getattr(self.stream, "isatty", lambda: False)())
        self.log_every = log_every
        self._clock = clock
        self.ok = 0
        self.failed: Counter[str] = Counter()
        self.skipped = 0
        self.ignored = 0
        self.ignored_note = ""  # what the ignored files were (batchcap.pipeline.ignored), for the summary
        self._start = self._clock()
        self._last_log = self._start
        self._bar: Any = None
        self._task: Any = None

    # -- counts ----------------------------------------------------------------------

    @property
    def processed(self) -> int:
        """Inputs that went through the model or failed: the ones that cost work."""
        return self.ok + sum(self.failed.values())

    @property
    def done(self) -> int:
        return self.processed + self.skipped + self.ignored

    def rate(self) -> float:
        elapsed = self._clock() - self._start
        return self.processed / elapsed if elapsed > 0 else 0.0

    def eta(self) -> float | None:
        rate = self.rate()
        if self.total is None or rate <= 0:
            return None
        return max(self.total - self.done, 0) / rate

    # -- lifecycle -------------------------------------------------------------------

    def __enter__(self) -> Progress:
        self._start = self._last_log = self._clock()
        if self.tty:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
            from rich.progress import Progress as RichProgress

            console = Console(file=self.stream, force_terminal=True)
            self._bar = RichProgress(
                TextColumn("[bold]captioning"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[rate]:.1f} img/s"),
                TimeElapsedColumn(),
                TextColumn("eta {task.fields[eta]}"),
                TextColumn("[green]ok {task.fields[ok]}[/] [red]failed {task.fields[failed]}[/]"),
                console=console,
                transient=False,
            )
            self._bar.start()
            self._task = self._bar.add_task("captioning", total=self.total, ok=0, failed=0, rate=0.0, eta="?")
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None

    def advance(self, ok: int = 0, failed: Mapping[str, int] | None = None, skipped: int = 0, ignored: int = 0) -> None:
        """Count a batch: ``ok`` captions, ``failed`` by status, ``skipped`` as done, ``ignored``."""
        self.ok += ok
        if failed:
            self.failed.update({k: v for k, v in failed.items() if v})
        self.skipped += skipped
        self.ignored += ignored
        if self._bar is not None:
            self._bar.update(
                self._task,
                completed=self.done,
                ok=self.ok,
                failed=sum(self.failed.values()),
                rate=self.rate(),
                eta=_fmt_seconds(self.eta()),
            )
        elif not self.tty:
            now = self._clock()
            if now - self._last_log >= self.log_every:
                self._last_log = now
                self.log_line()

    def log_line(self) -> str:
        """Write (and return) one ``key=value`` status line."""
        stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        line = (
            f"time={stamp} done={self.done} total={self.total if self.total is not None else '?'} "
            f"ok={self.ok} failed={sum(self.failed.values())} skipped={self.skipped} "
            f"rate={self.rate():.2f}/s eta={_fmt_seconds(self.eta())}"
        )
        print(line, file=self.stream, flush=True)
        return line

    def summary(
        self, output: str | None = None, *, extra: Mapping[str, Any] | None = None, echo: bool = True
    ) -> dict[str, Any]:
        """The end-of-run figures as a dict; printed as plain lines to the stream unless ``echo=False``.

        The lines say what *this* process did: ``captioned now`` and ``failed now`` are the
        inputs it processed; ``already done`` were skipped because the output, or a part an
        interrupted earlier attempt committed, holds them already.
        """
        self.__exit__(None, None, None)  # the bar's last frame stays; the summary goes below it
        wall = self._clock() - self._start
        result: dict[str, Any] = {
            "ok": self.ok,
            "failed": dict(sorted(self.failed.items())),
            "failed_total": sum(self.failed.values()),
            "skipped": self.skipped,
            "ignored": self.ignored,
            "processed": self.processed,
            "wall_s": round(wall, 3),
            "images_per_s": round(self.processed / wall, 2) if wall > 0 else 0.0,
            "output": output,
        }
        if extra:
            result.update(extra)
        if echo:
            by_status = ", ".join(f"{k} {v}" for k, v in result["failed"].items())
            fields: list[tuple[str, Any]] = [
                ("captioned now", self.ok),
                ("failed now", f"{result['failed_total']}" + (f" ({by_status})" if by_status else "")),
                ("already done", self.skipped),
                ("ignored", f"{self.ignored}" + (f" ({self.ignored_note})" if self.ignored_note else "")),
                *(extra or {}).items(),
            ]
            if output:
                fields.append(("output", output))
            lines = [
                f"batchcap: {result['processed']} images in {_fmt_seconds(wall)} "
                f"({result['images_per_s']:.1f} images/s)"
            ]
            lines += [f"  {key + ':':<24}{value}" for key, value in fields]
            print("\n".join(lines), file=self.stream, flush=True)
        return result
