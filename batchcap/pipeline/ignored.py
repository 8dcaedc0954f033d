"""The files a run passed over (not pictures, hidden, unreadable folders), named instead of only counted.

The summary counts them by extension or kind and shows the first few; the full list goes to
``<out>.ignored.txt`` beside the output, one path a line after its category and a tab. It is
written to a temp file as batches arrive (memory stays flat) and renamed into place when the
run has seen every input; a run that ignored nothing removes an old list, so the file always
describes the latest complete pass. An interrupted run leaves the previous list as it was.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import TextIO

IGNORED_SUFFIX = ".ignored.txt"
SHOWN = 3  # paths named in the summary


def ignored_list_for(out: str | os.PathLike[str]) -> Path:
    """Where the full list of ``out``'s ignored files is written."""
    return Path(str(out) + IGNORED_SUFFIX)


class IgnoredFiles:
    """Counts, first names and the streamed full list of the ignored files of one run."""

    def __init__(self, out: str | os.PathLike[str]) -> None:
        self.path = ignored_list_for(out)
        # Named like the output's other temp files, so a killed run's leftover is removed on the next open.
        self._tmp = self.path.with_name(f"{Path(out).name}.tmp-ignored-{secrets.token_hex(6)}")
        self.by_category: Counter[str] = Counter()
        self.first: list[str] = []
        self._file: TextIO | None = None

    @property
    def count(self) -> int:
        return sum(self.by_category.values())

    def add(self, entries: Iterable[tuple[str, str]]) -> None:
        """Record ``(category, path)`` pairs (``Batch.ignored_paths``)."""
        for category, path in entries:
            if self._file is None:
                self._file = open(self._tmp, "w", encoding="utf-8", errors="surrogateescape", newline="\n")
            self._file.write(f"{category}\t{path}\n")
            self.by_category[category] += 1
            if len(self.first) < SHOWN:
                self.first.append(path)

    def finish(self) -> str:
        """Put the full list in place (or remove a stale one); returns the summary's note, "" if none."""
        if self._file is None:
            self.path.unlink(missing_ok=True)
            return ""
        self._file.close()
        os.replace(self._tmp, self.path)
        return self.note()

    def discard(self) -> None:
        """An unfinished pass: drop the partial list, keep the last complete one."""
        if self._file is not None:
            self._file.close()
            with contextlib.suppress(OSError):
                self._tmp.unlink()
        self._file = None

    def note(self) -> str:
        """``.heic 4, .txt 1; e.g. a/1.heic, a/2.heic, a/3.heic; all in x.parquet.ignored.txt``."""
        counts = ", ".join(f"{c} {n}" for c, n in sorted(self.by_category.items(), key=lambda kv: (-kv[1], kv[0])))
        more = ", …" if self.count > len(self.first) else ""
        return f"{counts}; e.g. {', '.join(self.first)}{more}; all listed in {self.path}"
