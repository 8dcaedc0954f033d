"""batchcap.pipeline.interrupt: real SIGTERM/SIGINT sent to this process (or a child) inside StopSignals."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from batchcap.pipeline.interrupt import STOP_SIGNALS, StopSignals

REPO = Path(__file__).resolve().parents[2]


def in_fresh_python(check: str, *args: object) -> None:
    """Run ``check(*args)`` of this module in a new interpreter.

    These checks send signals to their own process. In the test process, native libraries that
    earlier tests loaded (OpenVINO's thread pools) may receive them, and that crashes it; a fresh
    interpreter holds only what the check imports, as ``batchcap run``'s main process does.
    """
    call = f"{check}({', '.join(map(repr, args))})"
    code = f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); from test_interrupt import *; {call}"
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, f"{call} failed:\n{done.stdout}{done.stderr}"


@pytest.mark.parametrize("signum", STOP_SIGNALS, ids=lambda s: signal.Signals(s).name)
def test_first_signal_only_requests_a_stop(signum: int) -> None:
    in_fresh_python("check_first_signal_only_requests_a_stop", int(signum))


def test_the_first_signal_name_is_kept() -> None:
    in_fresh_python("check_the_first_signal_name_is_kept")


def test_previous_handlers_are_restored_on_exit() -> None:
    in_fresh_python("check_previous_handlers_are_restored_on_exit")


def test_the_first_signal_is_announced_on_the_stream(tmp_path: Path) -> None:
    in_fresh_python("check_the_first_signal_is_announced_on_the_stream", str(tmp_path))


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_ignores_the_inherited_handler() -> None:
    in_fresh_python("check_a_forked_child_ignores_the_inherited_handler")


def deliver(signum: int) -> None:
    """Send ``signum`` to this process and give the interpreter a moment to run the handler."""
    os.kill(os.getpid(), signum)
    time.sleep(0.01)


def check_first_signal_only_requests_a_stop(signum: int) -> None:
    with StopSignals(io.StringIO(), exit_code=75) as stop:
        assert stop.requested is None
        deliver(signum)
        assert stop.requested == signal.Signals(signum).name  # and we are still running
        deliver(signum)  # a repeat within the window is the same request
        assert stop.requested == signal.Signals(signum).name


def check_the_first_signal_name_is_kept() -> None:
    with StopSignals(io.StringIO(), exit_code=75) as stop:
        deliver(signal.SIGTERM)
        deliver(signal.SIGINT)  # within the window: ignored, not a new name
    assert stop.requested == "SIGTERM"


def check_previous_handlers_are_restored_on_exit() -> None:
    seen: list[int] = []

    def mine(signum: int, frame: object) -> None:
        seen.append(signum)

    before = {s: signal.signal(s, mine) for s in STOP_SIGNALS}
    try:
        with StopSignals(io.StringIO(), exit_code=75) as stop:
            assert all(signal.getsignal(s) != mine for s in STOP_SIGNALS)
            deliver(signal.SIGINT)
        assert seen == []  # the context had it
        assert all(signal.getsignal(s) is mine for s in STOP_SIGNALS)
        deliver(signal.SIGTERM)
        deliver(signal.SIGINT)
        assert seen == [signal.SIGTERM, signal.SIGINT]
        assert stop.requested == "SIGINT"  # the signals after the block did not reach it
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)


def test_handlers_are_restored_when_the_block_raises() -> None:
    before = {s: signal.getsignal(s) for s in STOP_SIGNALS}
    with pytest.raises(RuntimeError), StopSignals(io.StringIO(), exit_code=75):
        raise RuntimeError("boom")
    assert {s: signal.getsignal(s) for s in STOP_SIGNALS} == before


def test_outside_the_main_thread_it_does_nothing() -> None:
    before = {s: signal.getsignal(s) for s in STOP_SIGNALS}
    errors: list[BaseException] = []

    def body() -> None:
        try:
            with StopSignals(io.StringIO(), exit_code=75) as stop:
                assert {s: signal.getsignal(s) for s in STOP_SIGNALS} == before
                assert stop.requested is None
        except BaseException as exc:  # reported in the main thread
            errors.append(exc)

    thread = threading.Thread(target=body)
    thread.start()
    thread.join()
    assert errors == []
    assert {s: signal.getsignal(s) for s in STOP_SIGNALS} == before


def check_the_first_signal_is_announced_on_the_stream(folder: str) -> None:
    tmp_path = Path(folder)
    with open(tmp_path / "log", "w") as stream, StopSignals(stream, exit_code=75):
        deliver(signal.SIGTERM)
    text = (tmp_path / "log").read_text()
    assert text.startswith("batchcap: SIGTERM received: stopping after the current batch")
    assert "send it again to stop at once" in text


def check_a_forked_child_ignores_the_inherited_handler() -> None:
    """A DataLoader worker inherits the handler; only the main process decides."""
    with StopSignals(io.StringIO(), exit_code=75) as stop:
        pid = os.fork()
        if pid == 0:  # the child: a signal to it must neither request a stop nor exit
            try:
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(0.01)
                os._exit(0 if stop.requested is None else 1)
            finally:
                os._exit(2)
        _, status = os.waitpid(pid, 0)
        assert stop.requested is None
    assert os.waitstatus_to_exitcode(status) == 0


def _child(repeat_window: float) -> subprocess.CompletedProcess[str]:
    script = textwrap.dedent(
        f"""
        import os, signal, sys, time
        from batchcap.pipeline.interrupt import StopSignals
        with StopSignals(sys.stderr, exit_code=75, repeat_window={repeat_window}) as stop:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)
            print("requested", stop.requested, flush=True)
            time.sleep(0.05)
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
            print("still running", flush=True)
        """
    )
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=60)


def test_a_second_signal_after_the_window_exits_at_once_with_the_exit_code() -> None:
    done = _child(repeat_window=0.0)
    assert done.returncode == 75, done.stderr
    assert done.stdout == "requested SIGTERM\n"  # the block did not go on
    assert "SIGTERM received" in done.stderr
    assert "second SIGINT: stopping at once" in done.stderr


def test_a_second_signal_within_the_window_is_the_same_request() -> None:
    done = _child(repeat_window=60.0)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "requested SIGTERM\nstill running\n"
    assert "second" not in done.stderr
