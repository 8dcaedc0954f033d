"""Faults a batch job meets, on the real CLI: SIGTERM and Ctrl-C, a full disk, a read-only output,
a damaged part file. Every test ends with a rerun that leaves every input in the output exactly once.

The disk tests mount small tmpfs file systems and so need root; they skip, saying why, without it.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import tmpfs, write_images
from test_resume import REPO, assert_exactly_once, command, ids_of, reap_groups, run

from batchcap.outputs.store import work_dir_for
from batchcap.pipeline.progress import EXIT_INTERRUPTED, EXIT_IO_ERROR, EXIT_OK, EXIT_USAGE

PAGE = 4096


class Running:
    """A ``batchcap run`` subprocess in its own session, its output collected line by line."""

    def __init__(self, cmd: list[str]) -> None:
        self.proc = subprocess.Popen(
            cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)

    @property
    def text(self) -> str:
        return "".join(self.lines)

    def captioned(self) -> int:
        """The ``ok=`` count of the latest progress line."""
        found = re.findall(r" ok=(\d+) ", self.text)
        return int(found[-1]) if found else 0

    def wait_until(self, check: Callable[[], bool], timeout: float = 240, what: str = "") -> None:
        deadline = time.monotonic() + timeout
        while not check():
            assert self.proc.poll() is None, f"exited ({self.proc.returncode}) before {what}:\n{self.text}"
            assert time.monotonic() < deadline, f"timed out waiting for {what}:\n{self.text}"
            time.sleep(0.02)

    def finish(self, timeout: float = 120) -> int:
        code = self.proc.wait(timeout=timeout)
        self._reader.join(timeout=10)
        return code


def signal_when(
    cmd: list[str], ready: Callable[[Running], bool], what: str, signum: int = signal.SIGTERM, group: bool = False
) -> Running:
    """Run ``cmd``; once ``ready(job)`` holds send ``signum`` to it (or its process group); wait for the end."""
    job = Running(cmd)
    try:
        job.wait_until(lambda: ready(job), what=what)
        (os.killpg if group else os.kill)(job.proc.pid, signum)
        job.finish()
    finally:
        reap_groups([job.proc.pid])  # orphaned DataLoader workers
    return job


def rerun_exactly_once(cmd: list[str], out: Path, folder: Path) -> subprocess.CompletedProcess[str]:
    """Run ``cmd`` to the end; every picture of ``folder`` must then be in ``out`` once."""
    again = run(cmd)
    assert again.returncode == EXIT_OK, again.stdout
    assert_exactly_once(out, ids_of(folder))
    assert not work_dir_for(out).exists() or (work_dir_for(out) / "damaged").is_dir()
    return again


def parts_of(out: Path) -> int:
    return len(list(work_dir_for(out).glob("part-*.parquet")))


def committed_rows(out: Path) -> int:
    return sum(pq.read_metadata(p).num_rows for p in work_dir_for(out).glob("part-*.parquet"))


def summary_count(text: str, key: str) -> int:
    found = re.findall(rf"^  {re.escape(key)}:\s+(\d+)", text, re.MULTILINE)
    assert found, f"no {key!r} in the summary:\n{text}"
    return int(found[-1])


def assert_clean_stop(text: str) -> None:
    assert "Traceback" not in text and "Aborted!" not in text, text


def worker_pids(pid: int) -> list[int]:
    """The children of ``pid`` (its DataLoader workers)."""
    children: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            children += [int(c) for c in (task / "children").read_text().split()]
    return children


# -- signals ---------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("how", ["SIGTERM to the process", "Ctrl-C (SIGINT to the process group)"])
def test_signal_commits_captioned_rows_and_rerun_resumes(tmp_path: Path, tiny_model_path: Path, how: str) -> None:
    folder = tmp_path / "photos"
    write_images(folder, 600)  # a quiet machine captions 120 before a signal sent at 8 takes effect
    out = tmp_path / "not" / "yet" / "there" / "captions.parquet"  # a missing folder is created
    # No commit would happen before the end: whatever is committed, the stop committed.
    cmd = command(
        [folder],
        out,
        tiny_model_path,
        "--batch-size",
        "4",
        "--commit-every",
        "100000",
        "--commit-seconds",
        "100000",
        "--log-every",
        "0.1",
    )
    name = "SIGTERM" if how.startswith("SIGTERM") else "SIGINT"
    # Ctrl-C: what a terminal does, the decoding workers get it too
    job = signal_when(
        cmd, lambda job: job.captioned() >= 8, "8 captions", getattr(signal, name), group=name == "SIGINT"
    )
    assert job.proc.returncode == EXIT_INTERRUPTED, job.text
    assert_clean_stop(job.text)
    assert f"{name} received" in job.text and re.search(r"interrupted:\s+by " + name, job.text), job.text
    assert "rerun the same command to resume" in job.text
    assert not out.exists()  # nothing finalised
    assert temp_files(out) == []
    ok = summary_count(job.text, "captioned now")
    assert 8 <= ok < 600 and committed_rows(out) == ok  # every captioned row was committed

    again = rerun_exactly_once(cmd, out, folder)
    assert summary_count(again.stdout, "already done") == ok


def check_signal_after_the_last_batch(folder: str, out: str, model: str) -> None:
    """In a fresh interpreter: run_job with a real SIGTERM sent as finalize begins (the one moment a
    subprocess cannot aim at); see the test below."""
    import io

    from batchcap.config import BeamConfig, ImagePolicy, RunConfig
    from batchcap.outputs.store import OutputStore
    from batchcap.pipeline.runner import run_job
    from batchcap.pipeline.settings import runtime_config

    finalize = OutputStore.finalize

    def signalled_finalize(store: OutputStore):  # a real SIGTERM, then the real finalize
        os.kill(os.getpid(), signal.SIGTERM)
        return finalize(store)

    OutputStore.finalize = signalled_finalize  # type: ignore[method-assign]
    stream = io.StringIO()
    result = run_job(
        RunConfig(sources=(folder,), out=out, log_every=0),
        Path(model),
        BeamConfig(beam_size=2, max_len=8),
        runtime_config("cpu", "fp32", 4, "0", "torch"),
        ImagePolicy(),
        stream=stream,
    )
    assert result.exit_code == EXIT_OK, stream.getvalue()
    assert result.summary["note"] == "SIGTERM arrived after the last batch: the output was finished first"
    assert "SIGTERM" in stream.getvalue()


def test_signal_after_the_last_batch_finishes_the_output_and_says_so(tmp_path: Path, tiny_model_path: Path) -> None:
    """A SIGTERM that lands once every row is captioned (here: as finalize begins) ends in a finished
    output, exit 0 and a note, not in an unfinalised output that a rerun must finish.

    The signal goes to the process that runs ``run_job``: a fresh interpreter, as ``batchcap run``
    is, not the test process, where native libraries loaded by earlier tests (OpenVINO's graph
    conversion) may receive it and crash the suite.
    """
    folder = tmp_path / "photos"
    write_images(folder, 6)
    out = tmp_path / "captions.parquet"
    code = (
        f"import sys; sys.path[:0] = [{str(Path(__file__).parent)!r}, {str(Path(__file__).parents[1])!r}]; "
        "from test_faults import check_signal_after_the_last_batch as check; "
        f"check({str(folder)!r}, {str(out)!r}, {str(tiny_model_path)!r})"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert done.returncode == 0, done.stdout + done.stderr
    assert_exactly_once(out, ids_of(folder))
    assert not work_dir_for(out).exists()
    again = run(command([folder], out, tiny_model_path, "--beam", "2", "--max-len", "8"))  # nothing left to do
    assert again.returncode == EXIT_OK and "nothing new to caption" in again.stdout, again.stdout


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_signal_before_captioning_began_is_exit_6_not_aborted(
    tmp_path: Path, tiny_model_path: Path, signum: int
) -> None:
    """Stopped while reading --files-from - (before run_job takes the signals): no click ``Aborted!``."""
    folder = tmp_path / "photos"
    write_images(folder, 4)
    out = tmp_path / "captions.parquet"
    cmd = command([], out, tiny_model_path, "--files-from", "-")
    proc = subprocess.Popen(
        cmd,
        cwd=REPO,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        syscall = Path(f"/proc/{proc.pid}/syscall")
        deadline = time.monotonic() + 240
        while not syscall.read_text().startswith("0 0x0 "):  # read(0, ...): waiting for the list
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        os.killpg(proc.pid, signum)
        text, _ = proc.communicate(timeout=60)
    finally:
        reap_groups([proc.pid])
    assert proc.returncode == EXIT_INTERRUPTED, text
    assert "interrupted before captioning began" in text
    assert_clean_stop(text)
    again = subprocess.run(
        cmd,
        cwd=REPO,
        input="".join(f"{p}\n" for p in sorted(folder.iterdir())),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert again.returncode == EXIT_OK, again.stderr
    assert_exactly_once(out, {str(p) for p in folder.iterdir()})


@pytest.mark.slow
def test_second_signal_exits_at_once(tmp_path: Path, tiny_model_path: Path) -> None:
    """A decode worker hangs (SIGSTOP: a dead NFS server), so the clean stop waits; a second TERM ends it."""
    folder = tmp_path / "photos"
    write_images(folder, 300)  # enough left after 8 captions that the run is still going when the signals come
    out = tmp_path / "captions.jsonl"
    cmd = command([folder], out, tiny_model_path, "--batch-size", "4", "--commit-every", "8", "--log-every", "0.1")
    job = Running(cmd)
    stopped: list[int] = []
    try:
        job.wait_until(lambda: job.captioned() >= 8, what="8 captions")
        stopped = worker_pids(job.proc.pid)
        assert stopped, "no decode worker found"
        for pid in stopped:
            os.kill(pid, signal.SIGSTOP)
        os.kill(job.proc.pid, signal.SIGTERM)
        time.sleep(2.0)
        assert job.proc.poll() is None, f"the first signal should wait for the worker:\n{job.text}"
        os.kill(job.proc.pid, signal.SIGTERM)
        code = job.finish(timeout=15)
    finally:
        for pid in stopped:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        reap_groups([job.proc.pid])
    assert code == EXIT_INTERRUPTED, job.text
    assert "second SIGTERM: stopping at once" in job.text, job.text
    assert "Traceback" not in job.text
    assert not out.exists()
    rerun_exactly_once(cmd, out, folder)


@pytest.mark.slow
def test_parts_are_committed_by_time_and_survive_kill_9(tmp_path: Path, tiny_model_path: Path) -> None:
    """--commit-seconds commits a slow run's rows long before --commit-every is reached."""
    folder = tmp_path / "photos"
    write_images(folder, 1200)  # the tiny model captions ~100/s when the machine is quiet: ~12 s of work
    out = tmp_path / "captions.parquet"
    cmd = command(
        [folder],
        out,
        tiny_model_path,
        "--batch-size",
        "2",
        "--commit-every",
        "100000",
        "--commit-seconds",
        "0.3",
        "--log-every",
        "0.1",
    )
    signal_when(cmd, lambda job: parts_of(out) >= 2, "two timed commits", signal.SIGKILL)
    kept = committed_rows(out)
    assert 0 < kept < 1200
    again = rerun_exactly_once(cmd, out, folder)
    assert summary_count(again.stdout, "already done") == kept


# -- disks: full, read-only ----------------------------------------------------------------------


def leave_free(folder: Path, pages: int) -> Path:
    """Fill ``folder``'s file system until exactly ``pages`` pages are free; returns the filler."""
    filler = folder / "filler"
    stat = os.statvfs(folder)
    free = stat.f_bavail * stat.f_frsize
    with open(filler, "wb") as f:
        f.write(b"\0" * (free - pages * PAGE))
    stat = os.statvfs(folder)
    assert stat.f_bavail * stat.f_frsize == pages * PAGE
    return filler


def temp_files(out: Path) -> list[str]:
    names = [p.name for p in out.parent.iterdir() if ".tmp-" in p.name]
    if work_dir_for(out).is_dir():
        names += [p.name for p in work_dir_for(out).iterdir() if p.name.startswith(".tmp-")]
    return names


def assert_one_line_error(text: str, *needles: str) -> str:
    errors = [line for line in text.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "Traceback" not in text, text
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


@pytest.mark.slow
def test_disk_full_during_part_commit_then_rerun_resumes(tmp_path: Path, tiny_model_path: Path) -> None:
    folder = tmp_path / "photos"
    write_images(folder, 60)
    with tmpfs(tmp_path / "disk") as disk:
        out = disk / "captions.parquet"
        # lock file + run.json take a page each; a part of 4 rows about two: room for two parts
        filler = leave_free(disk, 6)
        cmd = command([folder], out, tiny_model_path, "--batch-size", "4", "--commit-every", "4")
        full = run(cmd)
        assert full.returncode == EXIT_IO_ERROR, full.stdout
        assert_one_line_error(
            full.stdout, f"cannot write {work_dir_for(out)}", "No space left on device", "free space and rerun"
        )
        assert temp_files(out) == []
        kept = committed_rows(out)
        assert kept >= 4 and not out.exists()

        filler.unlink()
        again = rerun_exactly_once(cmd, out, folder)
        assert summary_count(again.stdout, "already done") == kept


@pytest.mark.slow
def test_disk_full_during_finalize_keeps_the_old_output(tmp_path: Path, tiny_model_path: Path) -> None:
    folder = tmp_path / "photos"
    write_images(folder, 300)
    with tmpfs(tmp_path / "disk") as disk:
        out = disk / "captions.parquet"
        cmd = command([folder], out, tiny_model_path, "--commit-every", "512")
        assert run(cmd).returncode == EXIT_OK
        before = out.read_bytes()
        assert len(before) > 2 * PAGE  # rewriting it needs more pages than will be left

        write_images(folder, 2, seed=5, prefix="new")
        filler = leave_free(disk, 4)  # run.json, the new part; not the rewritten output
        full = run(cmd)
        assert full.returncode == EXIT_IO_ERROR, full.stdout
        assert_one_line_error(full.stdout, f"cannot write {out}:", "No space left on device", "free space and rerun")
        assert temp_files(out) == []
        assert out.read_bytes() == before  # the finished output is untouched
        assert committed_rows(out) == 2  # the new rows are committed, waiting

        filler.unlink()
        again = rerun_exactly_once(cmd, out, folder)
        assert summary_count(again.stdout, "captioned now") == 0  # nothing captioned twice: only merged


@pytest.mark.slow
def test_read_only_output_is_refused_before_any_work(tmp_path: Path, tiny_model_path: Path) -> None:
    folder = tmp_path / "photos"
    write_images(folder, 6)
    with tmpfs(tmp_path / "ro", options="ro") as ro:
        for out, message in [
            (ro / "captions.parquet", f"cannot write in {ro}: Read-only file system"),
            (ro / "sub" / "captions.parquet", f"cannot create the output folder {ro / 'sub'}"),
        ]:
            proc = run(command([folder], out, tiny_model_path))
            assert proc.returncode == EXIT_USAGE, proc.stdout
            assert_one_line_error(proc.stdout, message)
            assert "done=" not in proc.stdout  # no image was touched

        subprocess.run(["mount", "-o", "remount,rw", str(ro)], check=True)
        rerun_exactly_once(command([folder], ro / "captions.parquet", tiny_model_path), ro / "captions.parquet", folder)


def test_unwritable_work_folder_is_refused(tmp_path: Path, tiny_model_path: Path) -> None:
    """The output's folder is writable but an unfinished run's work folder is on a read-only mount."""
    folder = tmp_path / "photos"
    write_images(folder, 3)
    out = tmp_path / "captions.parquet"
    with tmpfs(work_dir_for(out), options="ro"):
        proc = run(command([folder], out, tiny_model_path))
        assert proc.returncode == EXIT_USAGE, proc.stdout
        assert_one_line_error(proc.stdout, f"cannot write in {work_dir_for(out)}")
    rerun_exactly_once(command([folder], out, tiny_model_path), out, folder)


# -- a damaged part --------------------------------------------------------------------------------


@pytest.mark.slow
def test_truncated_part_is_set_aside_and_its_rows_redone(tmp_path: Path, tiny_model_path: Path) -> None:
    folder = tmp_path / "photos"
    write_images(folder, 80)
    out = tmp_path / "captions.parquet"
    cmd = command([folder], out, tiny_model_path, "--batch-size", "4", "--commit-every", "8", "--log-every", "0.1")
    job = signal_when(cmd, lambda job: parts_of(out) >= 3, "three parts")
    assert job.proc.returncode == EXIT_INTERRUPTED, job.text
    parts = sorted(work_dir_for(out).glob("part-*.parquet"))
    kept = committed_rows(out)
    damaged = parts[1]
    lost = pq.read_metadata(damaged).num_rows
    damaged.write_bytes(damaged.read_bytes()[: damaged.stat().st_size // 2])  # a copy cut short

    again = rerun_exactly_once(cmd, out, folder)
    assert f"part {damaged.name} is damaged" in again.stdout
    assert re.search(r"damaged parts:\s+1 set aside in .*damaged; their rows were captioned again", again.stdout)
    assert summary_count(again.stdout, "already done") == kept - lost
    assert summary_count(again.stdout, "captioned now") == 80 - kept + lost
    aside = work_dir_for(out) / "damaged"
    assert (aside / damaged.name).exists()
    note = (aside / (damaged.name + ".why.txt")).read_text()
    assert "Parquet" in note and "captioned again" in note
    assert sorted(p.name for p in work_dir_for(out).iterdir()) == ["damaged"]  # the rest is cleaned up


def test_merge_refuses_a_truncated_part(tmp_path: Path, tiny_model_path: Path) -> None:
    folder = tmp_path / "photos"
    write_images(folder, 6)
    parts = [tmp_path / f"part-{i}.parquet" for i in range(2)]
    for i, part in enumerate(parts):
        assert run(command([folder], part, tiny_model_path, "--shard", f"{i}/2")).returncode == EXIT_OK
    good = parts[1].read_bytes()
    parts[1].write_bytes(good[:-100])
    merge = [sys.executable, "-m", "batchcap", "merge", *map(str, parts), "--out", str(tmp_path / "all.parquet")]
    proc = subprocess.run(merge, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == EXIT_USAGE, proc.stderr
    assert f"part {parts[1]} is unreadable" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "all.parquet").exists()

    parts[1].write_bytes(good)  # copied again
    assert subprocess.run(merge, cwd=REPO, capture_output=True, timeout=120).returncode == EXIT_OK
    assert_exactly_once(tmp_path / "all.parquet", ids_of(folder))


def run_with_import_hook(cmd: list[str], hook_body: str) -> subprocess.CompletedProcess[str]:
    """``batchcap`` with the arguments of ``cmd``, in a Python whose every import first runs ``hook_body``
    (indented code that sees ``name``, ``seen`` (a list) and ``Held`` (a class to make weak references to))."""
    code = (
        "import builtins, signal, sys, weakref\n"
        "real, seen = builtins.__import__, []\n"
        "class Held: pass\n"
        "def hook(name, *a, **k):\n"
        f"{hook_body}"
        "    return real(name, *a, **k)\n"
        "builtins.__import__ = hook\n"
        "from batchcap.cli import main\n"
        f"sys.argv = {['batchcap', *cmd[3:]]!r}\n"
        "main()\n"
    )
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)


def test_signal_while_torch_is_importing_is_exit_6_not_a_crash(tmp_path: Path, tiny_model_path: Path) -> None:
    """A signal can cut ``import torch`` short (seen on a loaded Slurm node): the error handling must
    not import it again, which segfaulted. Simulated: the first import of torch is interrupted, any
    later one fails as a half-imported module would."""
    folder = tmp_path / "photos"
    write_images(folder, 2)
    cmd = command([folder], tmp_path / "captions.parquet", tiny_model_path)
    proc = run_with_import_hook(
        cmd,
        "    if name == 'torch' or name.startswith('torch.'):\n"
        "        if not seen:\n"
        "            seen.append(name); raise KeyboardInterrupt\n"
        "        raise SystemError('torch is half imported')\n",
    )
    assert proc.returncode == EXIT_INTERRUPTED, proc.stderr
    assert "interrupted before captioning began" in proc.stderr and "Traceback" not in proc.stderr


def test_a_signal_python_drops_during_start_up_still_stops_the_run(tmp_path: Path, tiny_model_path: Path) -> None:
    """Slurm's time-limit warning reached a task while it was importing, inside a weak-reference callback of
    the import machinery: Python printed "Exception ignored" for the interrupt and went on, and the run
    captioned everything instead of stopping. Simulated: the handler in place at the first import of torch
    runs inside such a callback. The run must still stop, commit nothing, and resume completely."""
    folder = tmp_path / "photos"
    write_images(folder, 6)
    out = tmp_path / "captions.parquet"
    cmd = command([folder], out, tiny_model_path)
    proc = run_with_import_hook(
        cmd,
        "    if name == 'torch' and not seen:\n"
        "        seen.append(name)\n"
        "        handler = signal.getsignal(signal.SIGTERM)\n"
        "        held = Held()\n"
        "        ref = weakref.ref(held, lambda _: handler(signal.SIGTERM, None))\n"
        "        del held  # the callback runs now; an exception it raises is printed and dropped\n",
    )
    assert "Exception ignored" in proc.stderr  # the interrupt itself was dropped, as on the Slurm node
    assert proc.returncode == EXIT_INTERRUPTED, proc.stderr
    assert "SIGTERM received while starting" in proc.stderr
    assert not out.exists()  # not finalised: nothing was captioned
    again = run(cmd, 120)
    assert again.returncode == EXIT_OK, again.stdout
    assert_exactly_once(out, ids_of(folder))


# -- sources and outputs batchcap cannot use ------------------------------------------------


@pytest.mark.parametrize("url", ["anything://x/y.tar", "nosuch://bucket/photos/"])
def test_a_url_no_filesystem_reads_is_refused_at_once(tmp_path: Path, tiny_model_path: Path, url: str) -> None:
    """Such a source used to print a worker's traceback and then hang until Ctrl-C."""
    out = tmp_path / "out" / "captions.parquet"
    proc = run([*command([], out, tiny_model_path)[:4], url, *command([], out, tiny_model_path)[4:]], 60)
    assert proc.returncode == EXIT_USAGE, proc.stdout
    assert "Traceback" not in proc.stdout
    assert "fsspec knows no such protocol" in proc.stdout and url.split("://")[0] + "://" in proc.stdout
    assert not (tmp_path / "out").exists()  # nothing made: no output folder, no lock, no work folder


@pytest.mark.parametrize("url", ["s3://bucket/captions.parquet", "gs://bucket/captions.jsonl"])
def test_url_output_is_refused_before_any_work(tmp_path: Path, tiny_model_path: Path, url: str) -> None:
    """It used to caption everything, fail at the first commit and leave a folder named ``s3:``."""
    folder = tmp_path / "photos"
    write_images(folder, 2)
    cmd = command([folder], Path("x"), tiny_model_path)
    cmd[cmd.index("--out") + 1] = url
    proc = subprocess.run(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=60)
    assert proc.returncode == EXIT_USAGE, proc.stdout
    assert "Traceback" not in proc.stdout
    assert "not to a URL" in proc.stdout and "flock" in proc.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["photos"]


@pytest.mark.parametrize(
    "failure, says",
    [
        ("raise RuntimeError('a reader bug, raised in a worker')", "a reader bug, raised in a worker"),
        ("os.kill(os.getpid(), signal.SIGKILL)", "exited unexpectedly"),
    ],
    ids=["raises", "killed"],
)
def test_a_reader_failing_in_a_worker_ends_the_run_promptly(
    tmp_path: Path, tiny_model_path: Path, failure: str, says: str
) -> None:
    """A reader's bug raising in a DataLoader worker, or a worker killed (the OOM killer): a crash with
    its traceback, never a hang.

    The traceback kept the loader, and so its workers (which ignore SIGTERM), alive until exit, where
    multiprocessing's exit handler waited for them for ever.
    """
    folder = tmp_path / "photos"
    write_images(folder, 4)
    cmd = command([folder], tmp_path / "captions.parquet", tiny_model_path)
    code = (
        "import os, signal, sys\n"
        "from torch.utils.data import get_worker_info\n"
        "from batchcap.data import sources\n"
        "listed = sources.FolderReader.entries\n"
        "def entries(self):\n"
        "    if get_worker_info() is not None:\n"
        f"        {failure}\n"
        "    return listed(self)\n"
        "sources.FolderReader.entries = entries\n"
        "from batchcap.cli import main\n"
        f"sys.argv = {['batchcap', *cmd[3:]]!r}\n"
        "main()\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = proc.communicate(timeout=90)
    except subprocess.TimeoutExpired:
        pytest.fail("the run hung after a worker failed")
    finally:
        reap_groups([proc.pid])
    assert proc.returncode == 1, output  # a bug is a crash, with the worker's traceback
    assert says in output


def test_a_signal_while_the_finished_command_shuts_down_keeps_its_exit_status() -> None:
    """Slurm's time-limit warning can reach a task just as batchcap ends: the status stays the command's."""
    code = (
        "import atexit, os, signal, sys, time\n"
        "atexit.register(lambda: (os.kill(os.getpid(), signal.SIGTERM), time.sleep(0.2)))  # during shutdown\n"
        "sys.argv = ['batchcap', '--version']\n"
        "from batchcap.cli import main\n"
        "main()\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == EXIT_OK, (done.returncode, done.stderr)
    assert "batchcap" in done.stdout
