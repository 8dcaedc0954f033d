"""`batchcap run --ray`: shard tasks on a real local Ray, each into its own part, then the verified merge.

One Ray (2 CPUs, no dashboard) is started for the module and shut down after it; ``run_on_ray``
and the command join it instead of starting their own. The tests that need Ray skip when it is
not installed (``pip install "batchcap[ray]"``); the refusals run without it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from conftest import REPO, write_images

from batchcap.cli import cli
from batchcap.config import UsageError
from batchcap.outputs.lock import lock_path_for
from batchcap.outputs.store import work_dir_for
from batchcap.pipeline.ray_engine import TASKS_FILE, RayRunResult, ShardError, parts_dir_for, run_on_ray

#: Small, fast runs: in-process decoding, a commit every few rows.
FAST = {"workers": 0, "batch_size": 4, "commit_every": 4, "log_every": 600.0}


#: The tasks pass only small results: a small object store spares the machine's shared memory.
SMALL_STORE = 100 * 1024 * 1024
#: A test's Ray needs no token: Ray would otherwise write one to ~/.ray, shared by every Ray of the user.
NO_TOKEN = {"RAY_AUTH_MODE": "disabled"}


@pytest.fixture(scope="module")
def local_ray() -> Iterator[Any]:
    """A Ray of 2 CPUs on this machine for the module's tests (its workers inherit PYTHONPATH, so run this code)."""
    ray = pytest.importorskip("ray")
    before = {name: os.environ.get(name) for name in NO_TOKEN}
    os.environ.update(NO_TOKEN)
    ray.init(  # address="local": a Ray of its own, never one already running here
        address="local",
        num_cpus=2,
        num_gpus=0,
        object_store_memory=SMALL_STORE,
        include_dashboard=False,
        log_to_driver=False,
    )
    yield ray
    ray.shutdown()
    for name, value in before.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


def read_ids(out: Path) -> list[str]:
    return [str(v) for v in pq.read_table(out, columns=["id"]).column("id").to_pylist()]


def assert_every_picture_once(out: Path, folder: Path) -> None:
    ids = read_ids(out)
    assert len(ids) == len(set(ids)), "an id occurs twice"
    assert set(ids) == {p.name for p in folder.iterdir()}
    statuses = set(pq.read_table(out, columns=["status"]).column("status").to_pylist())
    assert statuses == {"ok"}


def test_three_tasks_write_three_parts_and_merge_every_picture_once(
    local_ray: Any, tmp_path: Path, tiny_model_path: Path
) -> None:
    folder = tmp_path / "photos"
    write_images(folder, 40)
    out = tmp_path / "captions.parquet"
    result = run_on_ray(folder, out, tasks=3, model=tiny_model_path, **FAST)
    assert isinstance(result, RayRunResult) and result.exit_code == 0
    parts = parts_dir_for(out)
    assert [Path(p).name for p in result.parts] == ["part-0.parquet", "part-1.parquet", "part-2.parquet"]
    assert all(Path(p).parent == parts for p in result.parts)
    assert_every_picture_once(out, folder)
    part_rows = [pq.read_metadata(p).num_rows for p in result.parts]
    assert sum(part_rows) == 40 and min(part_rows) > 0  # every task captioned its own share
    assert result.merge is not None and result.merge.rows == 40

    # The same call again resumes every part (nothing left to caption) and merges the same rows.
    again = run_on_ray(folder, out, tasks=3, model=tiny_model_path, **FAST)
    assert again.exit_code == 0
    assert [s.summary["ok"] for s in again.shards] == [0, 0, 0]
    assert [s.summary["skipped"] for s in again.shards] == part_rows
    assert_every_picture_once(out, folder)


def test_the_command_runs_on_ray_and_merges(local_ray: Any, tmp_path: Path, tiny_model_path: Path) -> None:
    folder = tmp_path / "photos"
    write_images(folder, 12, seed=1)
    out = tmp_path / "captions.parquet"
    parts = tmp_path / "shared" / "parts"
    args = ["run", str(folder), "--out", str(out), "--model", str(tiny_model_path), "--workers", "0"]
    args += ["--ray", "--tasks", "2", "--ray-cpus", "1", "--ray-retries", "1", "--ray-parts", str(parts)]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert {"part-0.parquet", "part-1.parquet"} <= set(os.listdir(parts))
    assert json.loads((parts / TASKS_FILE).read_text()) == {"tasks": 2}
    assert_every_picture_once(out, folder)
    assert "2 tasks (1 CPU, 0 GPU each, up to 1 retries)" in result.output


def _names(folder: Path) -> list[str]:
    try:
        return os.listdir(folder)
    except FileNotFoundError:
        return []


def _lock_is_held(part: Path) -> bool:
    """Whether a run holds ``part``'s lock now (tried without waiting, released at once)."""
    try:
        fd = os.open(lock_path_for(part), os.O_RDWR)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing also releases a lock this test took
    return False


def _kill_a_task_after_its_first_commit(
    parts: Path, tasks: int, deadline: float, signum: int
) -> tuple[int, int] | None:
    """Send ``signum`` to the Ray worker running a shard that has committed rows and not finished: (shard, pid)."""
    while time.monotonic() < deadline:
        for index in range(tasks):
            part = parts / f"part-{index}.parquet"
            if not any(n.startswith("part-") for n in _names(work_dir_for(part))) or not _lock_is_held(part):
                continue
            pid = json.loads(lock_path_for(part).read_text())["pid"]  # the holder: the task's worker
            os.kill(pid, signum)
            return index, pid
        time.sleep(0.005)
    return None


@pytest.mark.parametrize(
    "signum",
    [
        signal.SIGKILL,  # the worker dies (a lost node, an OOM kill): Ray retries the task elsewhere
        signal.SIGTERM,  # the run commits and exits 6; the task raises and Ray retries it (retry_exceptions)
    ],
    ids=["SIGKILL", "SIGTERM"],
)
def test_a_killed_task_is_retried_and_resumes_its_part(
    local_ray: Any, tmp_path: Path, tiny_model_path: Path, signum: int
) -> None:
    folder = tmp_path / "photos"
    write_images(folder, 90, seed=2)
    out = tmp_path / "captions.parquet"
    results: list[RayRunResult] = []
    slow = dict(FAST, batch_size=1, commit_every=1)  # a commit per row: a wide window between first and last
    driver = threading.Thread(
        target=lambda: results.append(run_on_ray(folder, out, tasks=3, model=tiny_model_path, ray_retries=2, **slow))
    )
    driver.start()
    killed = _kill_a_task_after_its_first_commit(parts_dir_for(out), 3, time.monotonic() + 120, signum)
    driver.join(timeout=300)
    assert not driver.is_alive()
    assert killed is not None, "no task was seen between its first commit and its end"
    shard, pid = killed
    assert results and results[0].exit_code == 0
    assert_every_picture_once(out, folder)
    outcome = results[0].shards[shard]
    # Another attempt finished the part, starting from the rows the stopped one committed (a first
    # attempt starts from none); after SIGKILL it ran in another worker.
    part = Path(outcome.part)
    assert outcome.summary["skipped"] > 0
    if signum == signal.SIGKILL:
        assert json.loads(lock_path_for(part).read_text())["pid"] != pid
    assert outcome.summary["rows in output"] == pq.read_metadata(part).num_rows


def test_overwrite_starts_every_part_over(local_ray: Any, tmp_path: Path, tiny_model_path: Path) -> None:
    folder = tmp_path / "photos"
    write_images(folder, 10, seed=3)
    out = tmp_path / "captions.jsonl"
    first = run_on_ray(folder, out, tasks=2, model=tiny_model_path, **FAST)
    assert first.exit_code == 0 and [Path(p).name for p in first.parts] == ["part-0.jsonl", "part-1.jsonl"]
    again = run_on_ray(folder, out, tasks=2, model=tiny_model_path, overwrite=True, **FAST)
    assert again.exit_code == 0
    assert sum(s.summary["ok"] for s in again.shards) == 10 and all(s.summary["skipped"] == 0 for s in again.shards)
    ids = [json.loads(line)["id"] for line in out.read_text().splitlines()]
    assert sorted(ids) == sorted(p.name for p in folder.iterdir())


def test_too_many_failures_in_a_shard_still_merges_and_exits_5(
    local_ray: Any, tmp_path: Path, tiny_model_path: Path
) -> None:
    folder = tmp_path / "photos"
    write_images(folder, 12, seed=4)
    for i in range(4):
        (folder / f"broken{i}.jpg").write_bytes(b"not a picture")
    out = tmp_path / "captions.parquet"
    result = run_on_ray(folder, out, tasks=2, model=tiny_model_path, max_failures="0", **FAST)
    assert result.exit_code == 5  # as `batchcap run`: the output is complete, with more failures than allowed
    ids = read_ids(out)
    assert sorted(ids) == sorted(p.name for p in folder.iterdir())
    statuses = dict(zip(ids, pq.read_table(out, columns=["status"]).column("status").to_pylist()))
    assert {statuses[f"broken{i}.jpg"] for i in range(4)} == {"unsupported"}  # a row each, with its status


def test_bad_input_in_a_task_is_reported_not_retried(local_ray: Any, tmp_path: Path) -> None:
    write_images(tmp_path / "photos", 4)
    not_a_model = tmp_path / "model.safetensors"
    not_a_model.write_bytes(b"plain text, not a model file")
    out = tmp_path / "captions.parquet"
    with pytest.raises(ShardError) as caught:
        run_on_ray(tmp_path / "photos", out, tasks=2, model=not_a_model, ray_retries=3, **FAST)
    assert caught.value.exit_code == 2
    message = str(caught.value)
    assert "model.safetensors" in message and "nothing was merged" in message
    assert "attempts" not in message  # reported by the task itself, not a crash Ray retried
    assert not out.exists()


def test_parts_of_another_task_count_are_not_resumed(local_ray: Any, tmp_path: Path, tiny_model_path: Path) -> None:
    out = tmp_path / "captions.parquet"
    parts = parts_dir_for(out)
    parts.mkdir()
    (parts / TASKS_FILE).write_text('{"tasks": 4}\n')
    with pytest.raises(UsageError, match=r"cut into 4 shards; rerun with --tasks 4"):
        run_on_ray(tmp_path, out, tasks=3, model=tiny_model_path, **FAST)
    assert not out.exists()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def ray_head() -> Iterator[dict[str, str]]:
    """A one-node Ray cluster (`ray start --head`) on 127.0.0.1 for the module: its GCS and Ray Client addresses."""
    pytest.importorskip("ray")
    port, client_port = _free_port(), _free_port()
    temp = tempfile.mkdtemp(prefix="bcray")  # short: Ray's socket paths must fit in 107 bytes
    env = dict(os.environ, PYTHONPATH=str(REPO), **NO_TOKEN)
    command = [str(Path(sys.executable).parent / "ray"), "start", "--head", "--block", f"--port={port}"]
    command += ["--node-ip-address=127.0.0.1", "--num-cpus=2", "--num-gpus=0", "--include-dashboard=false"]
    command += [f"--object-store-memory={SMALL_STORE}"]
    command += ["--disable-usage-stats", f"--temp-dir={temp}", f"--ray-client-server-port={client_port}"]
    log = open(Path(temp) / "head.log", "w")  # noqa: SIM115 -- open for the head's lifetime
    head = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 90
        while True:
            assert head.poll() is None, (Path(temp) / "head.log").read_text()
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
                break
            assert time.monotonic() < deadline, "the Ray head did not open its port in 90 s"
            time.sleep(0.5)
        yield {"gcs": f"127.0.0.1:{port}", "client": f"ray://127.0.0.1:{client_port}", "temp": temp}
    finally:
        os.killpg(head.pid, signal.SIGTERM)  # `ray start --block` stops what it started; its group is the rest
        try:
            head.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        with contextlib.suppress(ProcessLookupError):
            os.killpg(head.pid, signal.SIGKILL)
        head.wait()
        log.close()
        shutil.rmtree(temp, ignore_errors=True)


def _client_server_logs(temp: str) -> str:
    """The Ray Client servers' own logs, which the head's teardown deletes: what a failed connection says."""
    logs = sorted({log.resolve() for log in Path(temp).glob("session_*/logs/ray_client_server*")})
    return "".join(f"\n--- {log.name}\n{log.read_text(errors='replace')[-2000:]}" for log in logs)


@pytest.mark.slow
@pytest.mark.parametrize("address", ["gcs", "client"])
def test_the_command_joins_a_cluster_by_address_with_relative_paths(
    ray_head: dict[str, str], address: str, tmp_path: Path, tiny_model_path: Path
) -> None:
    if address == "client":
        pytest.importorskip("grpc", reason='ray:// (Ray Client) needs grpcio, which "batchcap[ray]" installs')
    write_images(tmp_path / "photos", 16, seed=5)
    shutil.copy(tiny_model_path, tmp_path / "tiny.safetensors")
    command = [sys.executable, "-m", "batchcap", "run", "photos", "--out", "out/captions.parquet"]
    command += ["--model", "tiny.safetensors", "--commit-every", "4", "--ray", ray_head[address], "--tasks", "2"]
    env = dict(os.environ, PYTHONPATH=str(REPO), **NO_TOKEN)
    # Run from tmp_path: the workers, started elsewhere, must read the paths relative to it.
    proc = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:] + _client_server_logs(ray_head["temp"])
    assert_every_picture_once(tmp_path / "out" / "captions.parquet", tmp_path / "photos")
    assert "merged parts=2 rows=16 ok=16" in proc.stderr
    assert "Started a local Ray instance" not in proc.stderr  # it joined the head, not a Ray of its own


@pytest.mark.slow
def test_ctrl_c_of_the_command_keeps_the_committed_rows_and_a_rerun_resumes(
    ray_head: dict[str, str], tmp_path: Path, tiny_model_path: Path
) -> None:
    folder = tmp_path / "photos"
    write_images(folder, 60, seed=6)
    out = tmp_path / "captions.parquet"
    command = [sys.executable, "-m", "batchcap", "run", str(folder), "--out", str(out), "--model", str(tiny_model_path)]
    command += ["--commit-every", "1", "--batch-size", "1", "--workers", "0", "--ray", ray_head["gcs"], "--tasks", "2"]
    env = dict(os.environ, PYTHONPATH=str(REPO), **NO_TOKEN)
    parts = parts_dir_for(out)
    driver = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    while not any(n.startswith("part-") for i in range(2) for n in _names(work_dir_for(parts / f"part-{i}.parquet"))):
        assert driver.poll() is None, driver.communicate()[0][-3000:]
        assert time.monotonic() < deadline, "no task committed in 120 s"
        time.sleep(0.01)
    driver.send_signal(signal.SIGINT)
    output, _ = driver.communicate(timeout=120)
    assert driver.returncode == 6, output[-3000:]
    assert "interrupted; committed rows are kept" in output
    assert not out.exists()

    # Ray stops the cancelled tasks' workers on its own time; a rerun starts once their locks are free.
    deadline = time.monotonic() + 60
    while any(_lock_is_held(parts / f"part-{i}.parquet") for i in range(2)):
        assert time.monotonic() < deadline, "the cancelled tasks still hold their parts after 60 s"
        time.sleep(0.2)
    rerun = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert_every_picture_once(out, folder)


# -- refusals: these need no Ray ---------------------------------------------------------------


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--ray", "--tasks", "0"], "0 is not in the range x>=1"),
        (["--ray"], "--ray needs --tasks N"),
        (["--tasks", "3"], "--tasks: only with --ray"),
        (["--ray-cpus", "4"], "--ray-cpus: only with --ray"),
        (["--ray", "--tasks", "2", "--shard", "0/2"], "--shard and --ray do not go together"),
        (["--ray", "--tasks", "2", "--device", "cuda:1"], "use --device cuda"),
        (["--ray", "--tasks", "2", "--files-from", "-"], "cannot reach Ray workers"),
    ],
)
def test_bad_ray_options_are_refused(tmp_path: Path, extra: list[str], message: str) -> None:
    out = tmp_path / "captions.parquet"
    result = CliRunner().invoke(cli, ["run", str(tmp_path), "--out", str(out), *extra])
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert not out.exists() and not parts_dir_for(out).exists()


def test_without_ray_installed_the_command_says_what_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError, as where it is not installed
    out = tmp_path / "captions.parquet"
    result = CliRunner().invoke(cli, ["run", str(tmp_path), "--out", str(out), "--ray", "--tasks", "2"])
    assert result.exit_code == 2, result.output
    assert 'pip install "batchcap[ray]"' in result.output
    assert not out.exists()


def test_import_and_help_do_not_import_ray() -> None:
    code = (
        "import sys, batchcap;"
        "from click.testing import CliRunner;"
        "from batchcap.cli import cli;"
        "assert CliRunner().invoke(cli, ['--help']).exit_code == 0;"
        "assert '--ray' in CliRunner().invoke(cli, ['run', '--help']).output;"
        "batchcap.run_on_ray;"
        "assert 'ray' not in sys.modules, 'ray was imported'"
    )
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
