"""SIGTERM and SIGINT during ``batchcap run``: the first asks for a clean stop, a second stops at once.

Slurm (pre-emption, the time limit, ``scancel``), ``timeout``, cron wrappers and Ctrl-C all
send one of these. The first one only sets :attr:`StopSignals.requested`; nothing is
interrupted where it stands. The run loop sees it after the batch in hand (or the one it
is waiting for), takes no further batch, commits the rows already captioned and exits
with ``EXIT_INTERRUPTED``. (Raising out of the wait for a batch instead would cut a
tensor transfer from a DataLoader worker in half, which multiprocessing reports with a
traceback; a batch takes a second or so to arrive.)

A second signal exits at once without any clean-up, which is exactly as safe as
``kill -9``: parts and the final output are only ever renamed into place complete. A
repeat that arrives within ``repeat_window`` seconds of the first counts as the same
request, because one event is often delivered twice: Slurm's ``scancel`` signals every
process of a job, including the batch shell, whose trap forwards it again.

Before the run loop takes the signals over (imports, loading the model), :func:`startup_signal`
raises ``KeyboardInterrupt``, so the command stops before it writes anything. Python drops an
exception raised where it cannot propagate (a weak-reference callback inside the import
machinery prints "Exception ignored" and goes on), so the signal is also remembered:
:class:`StopSignals` starts with it as its request, and the run stops before its first batch.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from types import FrameType
from typing import Any, TextIO

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)

#: A stop signal received during start-up (its name), until a :class:`StopSignals` takes it over.
_startup_request: str | None = None


def startup_signal(signum: int, frame: FrameType | None) -> None:
    """The handler before the run loop's: remember the signal, then interrupt whatever is running."""
    global _startup_request
    _startup_request = signal.Signals(signum).name
    raise KeyboardInterrupt


def forget_startup_signal() -> None:
    """Start-up is over without a run loop (the command ended or stopped): nothing is pending any more."""
    global _startup_request
    _startup_request = None


class StopSignals:
    """Context manager: SIGTERM/SIGINT become a polite stop request for the ``with`` block.

    Outside the main thread signals cannot be handled, so there it does nothing.
    """

    def __init__(self, stream: TextIO, exit_code: int, repeat_window: float = 1.0) -> None:
        self.stream = stream
        self.exit_code = exit_code
        self.repeat_window = repeat_window
        self.requested: str | None = None  # the signal's name, once one arrived
        self._first_at = 0.0
        self._pid = os.getpid()
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        global _startup_request
        if threading.current_thread() is threading.main_thread():
            self._pid = os.getpid()
            for signum in STOP_SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
            if _startup_request is not None:  # arrived during start-up, where Python dropped its interrupt
                self.requested, self._first_at = _startup_request, time.monotonic()
                self._say(
                    f"batchcap: {_startup_request} received while starting: stopping before the first batch; "
                    "rerun the same command to resume\n"
                )
                _startup_request = None
        return self

    def __exit__(self, *exc: Any) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous.clear()

    def _say(self, text: str) -> None:
        """Write from a signal handler: straight to the descriptor, never through a buffer in use."""
        try:
            os.write(self.stream.fileno(), text.encode())
        except (AttributeError, OSError, ValueError):
            pass  # no descriptor (a test's StringIO): the summary says it all the same

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if os.getpid() != self._pid:
            return  # a forked DataLoader worker inherited this handler: the main process decides
        name = signal.Signals(signum).name
        now = time.monotonic()
        if self.requested is None:
            self.requested, self._first_at = name, now
            self._say(
                f"batchcap: {name} received: stopping after the current batch and committing the "
                f"captioned rows (send it again to stop at once)\n"
            )
            return
        if now - self._first_at < self.repeat_window:
            return  # the same event, delivered twice
        self._say(
            f"batchcap: second {name}: stopping at once; rows not yet committed are lost, "
            f"a rerun resumes from the last commit\n"
        )
        os._exit(self.exit_code)
