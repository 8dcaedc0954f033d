"""Ray as the engine: ``batchcap run`` split into N shard tasks on a Ray cluster, then one verified merge.

It is the Slurm array (``jobs/slurm/caption-array.sbatch`` + ``merge.sbatch``) with Ray as the
scheduler. Task I runs ``batchcap.run(SOURCES, <parts>/part-I.<fmt>, shard="I/N")`` in a Ray
worker, so each part is an ordinary resumable output with its own lock: a task that Ray retries
after its worker died, or after it raised, resumes its own part where the last attempt committed,
and never writes an id twice. When every task has finished, :func:`merge_outputs` (what
``batchcap merge`` and ``merge.sbatch`` run) checks that every part is there and every id occurs
once, and writes ``out``. So the merged output holds each picture exactly once however often Ray
retried.

The part folder (``<out>.parts/`` unless given) must be on a POSIX file system that every worker
and the driver see at the same path (NFS, Lustre with ``-o flock``, a cluster's shared disk), the
same demand the Slurm array makes of ``OUT_DIR``. It keeps its name across reruns, so rerunning
the same command resumes every unfinished part and merges again.

Ray is an optional dependency (``pip install "batchcap[ray]"``), imported only when a run asks for it.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import socket
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from batchcap.config import OptionError, UsageError
from batchcap.data.sources import SourceError
from batchcap.encode.weights import EncoderError
from batchcap.fileio import atomic_write_bytes
from batchcap.hardware import HardwareError
from batchcap.model.modelfile import ModelFileError
from batchcap.outputs.lock import (
    LockHeld,
    OutputUnwritable,
    check_output_location,
    check_output_writable,
    hold_lock,
)
from batchcap.outputs.merge import MergeReport, merge_outputs
from batchcap.outputs.schema import infer_format
from batchcap.outputs.store import OutputIOError, ResumeRefused, meta_path_for, work_dir_for
from batchcap.pipeline.api import run
from batchcap.pipeline.progress import (
    EXIT_CRASH,
    EXIT_INTERRUPTED,
    EXIT_IO_ERROR,
    EXIT_LOCKED,
    EXIT_OK,
    EXIT_RESUME_REFUSED,
    EXIT_TOO_MANY_FAILURES,
    EXIT_USAGE,
)

__all__ = ["RayRunResult", "ShardError", "ShardInterrupted", "parts_dir_for", "run_on_ray"]

INSTALL_HINT = 'pip install "batchcap[ray]"'
PARTS_SUFFIX = ".parts"
#: Records the number of tasks the parts were cut into, so a rerun cannot mix two shardings.
TASKS_FILE = "tasks.json"

#: Errors that another attempt would meet again (bad input, another run's lock, a full disk):
#: a task reports them instead of raising, so Ray does not retry them. Anything else raised
#: inside a task (a crash, CUDA running out of memory) is retried, as is a worker that died.
_NOT_RETRIED: dict[type[Exception], int] = {
    UsageError: EXIT_USAGE,
    OptionError: EXIT_USAGE,
    SourceError: EXIT_USAGE,
    ModelFileError: EXIT_USAGE,
    EncoderError: EXIT_USAGE,
    HardwareError: EXIT_USAGE,
    OutputUnwritable: EXIT_USAGE,
    LockHeld: EXIT_LOCKED,
    ResumeRefused: EXIT_RESUME_REFUSED,
    OutputIOError: EXIT_IO_ERROR,
}


class ShardError(Exception):
    """A shard task could not finish; ``exit_code`` is what ``batchcap run --ray`` exits with.

    2: bad input, 3: a part's lock is held by another run, 4: a part was made with other settings,
    7: a part could not be written, 1: a task crashed (or its worker died) on every attempt.
    The parts that did finish are kept: rerunning the same command resumes the rest.
    """

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class ShardInterrupted(Exception):
    """A task's run was stopped by SIGTERM or SIGINT (exit 6) with its rows committed: Ray retries it."""


@dataclass(frozen=True)
class ShardJob:
    """What every shard task needs, pickled once by Ray and shipped to the workers."""

    sources: tuple[str, ...]
    parts_dir: str
    fmt: str
    tasks: int
    cwd: str
    options: dict[str, Any]

    def part(self, index: int) -> str:
        """The part file of shard ``index``: ``<parts_dir>/part-<index>.<fmt>``, as the Slurm array names it."""
        return os.path.join(self.parts_dir, f"part-{index}.{self.fmt}")


@dataclass(frozen=True)
class ShardOutcome:
    """How one shard task ended: its run's exit code and summary, or the error it reported."""

    index: int
    part: str
    host: str
    exit_code: int
    summary: dict[str, Any] = field(default_factory=dict)
    error: str | None = None


@dataclass(frozen=True)
class RayRunResult:
    """How ``batchcap run --ray`` ended: the exit code, each shard's outcome, and the merge."""

    exit_code: int
    out: str
    parts: tuple[str, ...]
    shards: tuple[ShardOutcome, ...]
    merge: MergeReport | None


def parts_dir_for(out: str | os.PathLike[str]) -> Path:
    """Where the part files of ``out`` go by default: ``<out>.parts/`` beside it."""
    return Path(os.path.abspath(os.fspath(out)) + PARTS_SUFFIX)


@contextlib.contextmanager
def _in_directory(path: str, sources: Sequence[str], files_from: str | None) -> Iterator[None]:
    """Run in the driver's working directory, so relative paths mean what they meant where batchcap started."""
    if not os.path.isdir(path):
        # a ":" marks a URL or pipe: command, which no working directory changes
        relative = [s for s in (*sources, files_from or "") if s and not os.path.isabs(s) and ":" not in s]
        if relative:
            raise UsageError(
                f"{relative[0]}: a relative path, but the directory batchcap was started in ({path}) does not exist "
                f"on Ray worker {socket.gethostname()}; give absolute paths on storage every worker mounts"
            )
        yield
        return
    before = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(before)


def caption_shard(job: ShardJob, index: int) -> ShardOutcome:
    """The body of one Ray task: caption shard ``index`` of ``job.tasks`` into its own resumable part."""
    part = job.part(index)
    host = socket.gethostname()
    print(
        f"batchcap-ray: shard {index}/{job.tasks} -> {part} host={host} pid={os.getpid()}", file=sys.stderr, flush=True
    )
    try:
        with _in_directory(job.cwd, job.sources, job.options.get("files_from")):
            result = run(list(job.sources), part, shard=f"{index}/{job.tasks}", stream=sys.stderr, **job.options)
    except tuple(_NOT_RETRIED) as exc:
        code = next(c for kind, c in _NOT_RETRIED.items() if isinstance(exc, kind))
        message = f"--{exc.option}: {exc.message}" if isinstance(exc, OptionError) else str(exc)
        return ShardOutcome(index, part, host, code, error=message)
    if result.exit_code == EXIT_INTERRUPTED:
        raise ShardInterrupted(f"shard {index}/{job.tasks} was stopped by a signal; its rows are committed")
    return ShardOutcome(index, part, host, result.exit_code, result.summary)


def _import_ray() -> Any:
    try:
        import ray  # the optional extra: only `--ray` needs it
    except ImportError:
        raise UsageError(f"--ray needs Ray, which is not installed: {INSTALL_HINT}") from None
    return ray


# Ray Client's server starts a process per session and can lose a race with it ("Initialization failure
# from server": psutil finds the launcher already a zombie); a new session usually starts. Seconds between tries:
CLIENT_SESSION_RETRY_WAITS = (1.0, 3.0)


def _connect(ray: Any, address: str | None, stream: TextIO | None = None) -> bool:
    """Join (or start) the Ray cluster; True when this call did so and must shut it down after."""
    if ray.is_initialized():
        return False
    target = None if address in (None, "", "auto") else address
    waits = list(CLIENT_SESSION_RETRY_WAITS) if target is not None and target.startswith("ray://") else []
    while True:
        try:
            ray.init(address=target)
            return True
        except ImportError as exc:  # ray:// without grpcio (Ray installed without its client)
            raise UsageError(f"--ray {address}: Ray cannot connect there without {exc.name}: {INSTALL_HINT}") from exc
        except (ConnectionError, ValueError, RuntimeError) as exc:
            if waits and "Initialization failure from server" in str(exc):
                wait = waits.pop(0)
                print(
                    f"batchcap: --ray {address}: the cluster's Ray Client server failed to start a session; "
                    f"trying again in {wait:g} s",
                    file=stream or sys.stderr,
                )
                time.sleep(wait)
                continue
            raise UsageError(
                f"--ray {address}: cannot connect to a Ray cluster there ({exc}); start one with `ray start --head` "
                "or give its address (HOST:6379, or ray://HOST:10001 from outside the cluster)"
            ) from exc


def _gpus_per_task(ray: Any, gpus: float | None, device: str) -> float:
    """GPUs per task: as given; else 1 for --device cuda, 0 for cpu, and for auto 1 where the cluster has GPUs."""
    if gpus is not None:
        return gpus
    if device.startswith("cuda"):
        return 1.0
    if device == "cpu":
        return 0.0
    return 1.0 if ray.cluster_resources().get("GPU", 0) >= 1 else 0.0


def _check_tasks_file(parts_dir: Path, tasks: int, overwrite: bool) -> None:
    """Refuse to resume parts cut into another number of shards (their ids would overlap)."""
    path = parts_dir / TASKS_FILE
    if path.exists() and not overwrite:
        try:
            recorded = json.loads(path.read_text()).get("tasks")
        except (OSError, ValueError, AttributeError):
            recorded = None
        if recorded is None:
            raise UsageError(
                f"cannot read {path}, which says how many shards the parts in {parts_dir} were cut into; "
                "start over with --overwrite, or choose another --ray-parts"
            )
        if recorded != tasks:
            raise UsageError(
                f"--tasks {tasks}: the parts in {parts_dir} were cut into {recorded} shards; rerun with "
                f"--tasks {recorded} to resume them, or start over with --overwrite (or another --ray-parts)"
            )


def _start_part_over(part: Path) -> None:
    """--overwrite: remove a part, its metadata and committed rows, under its lock (refused while a run writes it)."""
    with hold_lock(part):
        part.unlink(missing_ok=True)
        meta_path_for(part).unlink(missing_ok=True)
        shutil.rmtree(work_dir_for(part), ignore_errors=True)


def _task_options(options: dict[str, Any], fmt: str, ray_cpus: float) -> dict[str, Any]:
    """The ``batchcap.run`` keywords every task gets: the driver's environment settings, workers for its CPUs."""
    options = dict(options, format=fmt)
    options.pop("shard", None)  # None (checked): each task gets its own
    for keyword, variable in (
        ("encoder_weights", "BATCHCAP_ENCODER_WEIGHTS"),
        ("encoder_cache", "BATCHCAP_ENCODER_CACHE"),
    ):
        if options.get(keyword) is None and os.environ.get(variable):
            options[keyword] = os.environ[variable]  # the driver's setting, not whatever a worker has
    if str(options.get("workers", "auto")) == "auto":
        # a Ray worker may run on every core of its node: decode with the task's CPUs, as the Slurm array does
        options["workers"] = max(1, math.floor(ray_cpus) - 1)
    return options


def _check_options(tasks: int, cpus: float, gpus: float | None, retries: int, options: dict[str, Any]) -> None:
    if tasks < 1:
        raise UsageError(f"--tasks must be 1 or more, not {tasks}")
    if not cpus > 0:
        raise UsageError(f"--ray-cpus must be more than 0, not {cpus}")
    if gpus is not None and gpus < 0:
        raise UsageError(f"--ray-gpus must be 0 or more, not {gpus}")
    if retries < 0:
        raise UsageError(f"--ray-retries must be 0 or more, not {retries}")
    if options.get("shard") is not None:
        raise UsageError("--shard and --ray do not go together: --ray cuts the work into --tasks shards itself")
    if options.get("files_from") == "-":
        raise UsageError("--files-from - (standard input) cannot reach Ray workers: write the list to a shared file")
    if str(options.get("device", "auto")).startswith("cuda:"):
        raise UsageError("--device cuda:N with --ray: Ray gives each task its own GPU; use --device cuda")


def run_on_ray(
    sources: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    out: str | os.PathLike[str],
    *,
    tasks: int,
    ray: str | None = None,
    ray_parts: str | os.PathLike[str] | None = None,
    ray_cpus: float = 1.0,
    ray_gpus: float | None = None,
    ray_retries: int = 3,
    stream: TextIO | None = None,
    **options: Any,
) -> RayRunResult:
    """``batchcap run SOURCES --out OUT --ray [ADDRESS] --tasks N``: N shard tasks on Ray, then a verified merge.

    Args:
        sources, out: as :func:`batchcap.run`; every other ``batchcap.run`` keyword (``model``,
            ``beam``, ``commit_every``, ``workers``...) passes through to each task.
        tasks: how many shards (Ray tasks); part I captions ``--shard I/N``.
        ray: the cluster's address. ``None`` or ``"auto"``: what ``ray.init()`` does by default (``RAY_ADDRESS``,
            else the cluster started on this machine, else a new local one); ``HOST:6379`` or
            ``ray://HOST:10001``: that cluster. A Ray already initialised in this process is used as it is.
        ray_parts: where the parts go (default ``<out>.parts/``), on storage every worker shares.
        ray_cpus, ray_gpus: Ray resources per task. GPUs ``None``: 1 with
            ``device="cuda"``, 0 with ``"cpu"``, and with ``"auto"`` 1 where the cluster has GPUs.
            ``workers="auto"`` becomes the task's CPUs but one (at least 1), as in the Slurm array.
        ray_retries: how often Ray reruns a task whose worker died or which crashed; each
            attempt resumes the part where the last one committed.
        stream: where the driver's lines go (default: standard error).

    Returns:
        :class:`RayRunResult`; ``exit_code`` 0 (merged), 5 (merged, but a shard had more
        failures than ``max_failures``, which applies to each task) or 6 (interrupted).

    Raises:
        batchcap.config.UsageError: bad options, Ray not installed, or no cluster at ``ray``.
        ShardError: a task could not finish (its ``exit_code`` says why); nothing is merged.
        batchcap.outputs.merge.MergeError: the parts do not merge (a missing part, a repeated id).
    """
    stream = stream or sys.stderr
    given = [sources] if isinstance(sources, (str, os.PathLike)) else list(sources)
    specs = tuple(os.fspath(s) for s in given)
    _check_options(tasks, ray_cpus, ray_gpus, ray_retries, options)
    ray_lib = _import_ray()
    if not specs and not options.get("files_from"):
        raise UsageError("give at least one SOURCE (folder, image, .tar shard) or --files-from FILE")
    check_output_location(out)  # before abspath, which would turn s3://b/x into a local folder
    out_path = os.path.abspath(os.fspath(out))
    try:
        fmt = infer_format(out_path, options.get("format"))
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    parts = Path(os.path.abspath(os.fspath(ray_parts))) if ray_parts is not None else parts_dir_for(out_path)
    check_output_writable(out_path)
    check_output_writable(parts / f"part-0.{fmt}")
    overwrite = bool(options.pop("overwrite", False))  # done here, once: a task Ray retries must resume
    options = _task_options(options, fmt, ray_cpus)
    _check_tasks_file(parts, tasks, overwrite)
    started_here = _connect(ray_lib, ray, stream)
    outcomes: list[ShardOutcome] | None = None
    try:
        if overwrite:
            for index in range(tasks):
                _start_part_over(parts / f"part-{index}.{fmt}")
        atomic_write_bytes(parts / TASKS_FILE, (json.dumps({"tasks": tasks}) + "\n").encode())
        gpus = _gpus_per_task(ray_lib, ray_gpus, str(options.get("device", "auto")))
        job = ShardJob(specs, str(parts), fmt, tasks, os.getcwd(), options)
        print(
            f"batchcap: ray: {tasks} tasks ({ray_cpus:g} CPU, {gpus:g} GPU each, up to {ray_retries} retries), "
            f"parts in {parts}",
            file=stream,
            flush=True,
        )
        task = ray_lib.remote(caption_shard).options(
            num_cpus=ray_cpus, num_gpus=gpus, max_retries=ray_retries, retry_exceptions=True
        )
        outcomes = _wait_for_shards(ray_lib, [task.remote(job, i) for i in range(tasks)], job, ray_retries, stream)
    finally:
        # Interrupted: disconnecting is what stops the tasks. Ray ends the tasks of a driver that has
        # gone (their committed rows stay; a SIGKILL loses at most the uncommitted ones), whereas
        # ray.cancel() raced with the cancelled task's own reply and aborted the driver (Ray 2.60).
        if started_here or outcomes is None:
            ray_lib.shutdown()
    if outcomes is None:
        print(
            f"batchcap: ray: interrupted; committed rows are kept in {parts}: rerun the same command to resume",
            file=stream,
        )
        return RayRunResult(EXIT_INTERRUPTED, out_path, (), (), None)
    _raise_for_failed(outcomes, job)
    part_files = tuple(job.part(i) for i in range(tasks))
    report = merge_outputs(list(part_files), out_path, fmt=fmt, expected_parts=tasks)
    print(report.summary(), file=stream, flush=True)
    too_many = [o for o in outcomes if o.exit_code == EXIT_TOO_MANY_FAILURES]
    code = EXIT_TOO_MANY_FAILURES if too_many else EXIT_OK
    return RayRunResult(code, out_path, part_files, tuple(outcomes), report)


def _wait_for_shards(
    ray: Any, refs: list[Any], job: ShardJob, max_retries: int, stream: TextIO
) -> list[ShardOutcome] | None:
    """Each shard's outcome as the tasks finish (a task that failed every attempt becomes an exit-1 outcome).

    ``None`` when interrupted (Ctrl-C): the caller disconnects, which ends the tasks; what they committed stays.
    """
    index_of = {ref: i for i, ref in enumerate(refs)}
    outcomes: dict[int, ShardOutcome] = {}
    pending = list(refs)
    try:
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            for ref in done:
                index = index_of[ref]
                try:
                    outcome = ray.get(ref)
                except ray.exceptions.RayError as exc:
                    first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[-1]
                    outcome = ShardOutcome(
                        index,
                        job.part(index),
                        "?",
                        EXIT_CRASH,
                        error=f"failed on all {max_retries + 1} attempts: {first_line}",
                    )
                outcomes[index] = outcome
                print(_describe(outcome, job.tasks), file=stream, flush=True)
    except KeyboardInterrupt:
        return None
    return [outcomes[i] for i in range(len(refs))]


def _describe(outcome: ShardOutcome, tasks: int) -> str:
    where = f"shard {outcome.index}/{tasks} ({os.path.basename(outcome.part)}, {outcome.host})"
    if outcome.error is not None:
        return f"batchcap: ray: {where}: {outcome.error}"
    rows = outcome.summary.get("rows in output", "?")
    return f"batchcap: ray: {where}: exit {outcome.exit_code}, {rows} rows"


def _raise_for_failed(outcomes: list[ShardOutcome], job: ShardJob) -> None:
    failed = [o for o in outcomes if o.error is not None]
    if not failed:
        return
    worst = max(failed, key=lambda o: (o.exit_code != EXIT_CRASH, o.exit_code))  # bad input first: it says what to fix
    others = f" (and {len(failed) - 1} more shard(s) failed)" if len(failed) > 1 else ""
    raise ShardError(
        f"shard {worst.index}/{job.tasks} ({worst.part}): {worst.error}{others}; nothing was merged. Finished parts "
        f"are kept in {job.parts_dir}: rerun the same command to resume",
        worst.exit_code,
    )
