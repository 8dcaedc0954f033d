"""The sink's own thread: rows go to the :class:`~batchcap.outputs.store.OutputStore` behind a bounded queue.

Committing a part (Parquet encode, write, two fsyncs) takes tens of milliseconds to
seconds on a slow or network disk; done inline it stalls the encoder each time. Here the
run loop only enqueues a batch's rows and goes on captioning; one thread does every
``OutputStore.add`` / ``commit``, so the store itself never sees two threads.

A part is committed when ``commit_every`` rows are buffered (the store's rule) and also
once the oldest uncommitted row is ``commit_seconds`` old, so a slow run (big pictures,
a CPU node) never holds much uncommitted work. Exactly-once is unchanged: the thread
writes parts the same way, and a ``kill -9`` loses at most the queued and buffered rows.

An exception in the thread (a full disk) is re-raised in the caller's thread by the next
:meth:`add` or by :meth:`close`, with the thread's traceback.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from typing import Any

_CLOSE = object()


class BackgroundWriter:
    """Feeds ``store`` from a thread; ``add`` rows, then ``close`` (commits the rest, joins)."""

    def __init__(
        self, store: Any, commit_seconds: float, max_pending: int = 4, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if commit_seconds <= 0:
            raise ValueError("commit_seconds must be positive")
        self.store = store
        self.commit_seconds = commit_seconds
        self._clock = clock
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=max_pending)
        self._error: BaseException | None = None
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="batchcap-writer", daemon=True)
        self._thread.start()

    def add(self, rows: list[dict[str, Any]]) -> None:
        """Queue one batch's rows; blocks while ``max_pending`` batches wait; raises the thread's error."""
        self._put(rows)

    def close(self) -> None:
        """Commit everything queued or buffered and stop the thread; raises the thread's error."""
        if not self._closed:
            self._closed = True
            if self._thread.is_alive():
                self._put(_CLOSE)
            self._thread.join()
        self._raise_if_failed()

    def _put(self, item: Any) -> None:
        while True:
            self._raise_if_failed()
            try:
                self._queue.put(item, timeout=0.2)
                return
            except queue.Full:
                continue

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise self._error

    def _run(self) -> None:
        store = self.store
        oldest: float | None = None  # when the oldest uncommitted row was added
        try:
            while True:
                timeout = None if oldest is None else max(0.0, oldest + self.commit_seconds - self._clock())
                try:
                    item = self._queue.get(timeout=timeout)
                except queue.Empty:
                    store.commit()  # the oldest row has waited commit_seconds
                    oldest = None
                    continue
                if item is _CLOSE:
                    store.commit()
                    return
                if not item:
                    continue
                parts = store.parts_committed
                store.add(item)
                if store.parts_committed != parts:
                    oldest = None  # the store committed (commit_every reached); buffer now empty
                    continue
                oldest = self._clock() if oldest is None else oldest
                if self._clock() - oldest >= self.commit_seconds:
                    store.commit()
                    oldest = None
        except BaseException as exc:  # surfaced in the caller's thread
            self._error = exc
