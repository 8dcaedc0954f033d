"""The Slurm job scripts: their command lines (no Slurm needed) and, on a real one-node Slurm
(.ci/slurm-up.sh), a caption array + dependent merge, and a cancelled-then-requeued task.

The real-Slurm tests submit jobs only to the one-node test cluster that .ci/slurm-up.sh starts:
it leaves a marker (/etc/slurm/batchcap-test-cluster) naming the cluster, its control address, its
node and its slurm.conf's hash, and the tests check that the Slurm `scontrol show config` answers is
exactly that one. Anything else (no Slurm, or a real cluster on a login node, where `sinfo` would
happily answer) makes them skip, saying why; with CI=true they fail instead, because CI starts one first.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import REPO, write_images

from batchcap.cli import cli

SLURM_DIR = REPO / "jobs" / "slurm"
BATCHCAP = str(Path(sys.prefix) / "bin" / "batchcap")
FINAL_STATES = {
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "OUT_OF_MEMORY",
    "NODE_FAIL",
    "PREEMPTED",
    "BOOT_FAIL",
    "DEADLINE",
}


# --- the scripts' command lines, run with bash and a stand-in for batchcap -------------------


def run_script(script: str, tmp_path: Path, **env: str) -> list[str]:
    """Run ``script`` outside Slurm with BATCHCAP=a recorder; the argv it would have run."""
    recorder = tmp_path / "record.sh"
    recorder.write_text('#!/bin/sh\nprintf "%s\\n" "$@" > "$RECORD"\n')
    recorder.chmod(0o755)
    record = tmp_path / "argv.txt"
    full_env = {"PATH": os.environ["PATH"], "BATCHCAP": str(recorder), "RECORD": str(record), **env}
    subprocess.run(
        ["bash", str(SLURM_DIR / script)], env=full_env, check=True, capture_output=True, text=True, timeout=30
    )
    return record.read_text().splitlines()


def test_caption_array_command(tmp_path: Path) -> None:
    argv = run_script(
        "caption-array.sbatch",
        tmp_path,
        INPUT="/data/photos",
        OUT_DIR=str(tmp_path / "out"),
        SLURM_ARRAY_TASK_ID="2",
        SLURM_ARRAY_TASK_MAX="3",
        MODEL="m.safetensors",
        EXTRA_ARGS="--beam 5 --device cuda",
    )
    assert argv == [
        "run",
        "/data/photos",
        "--out",
        f"{tmp_path}/out/part-2.parquet",
        "--shard",
        "2/4",
        "--model",
        "m.safetensors",
        "--beam",
        "5",
        "--device",
        "cuda",
    ]


def test_caption_array_resubmitted_task_keeps_tasks(tmp_path: Path) -> None:
    # `sbatch --array=1` resubmits one task: SLURM_ARRAY_TASK_MAX is then 1, TASKS must win.
    argv = run_script(
        "caption-array.sbatch",
        tmp_path,
        INPUT="in",
        OUT_DIR=str(tmp_path),
        TASKS="3",
        SLURM_ARRAY_TASK_ID="1",
        SLURM_ARRAY_TASK_MAX="1",
        FORMAT="jsonl",
    )
    assert argv[argv.index("--shard") + 1] == "1/3" and argv[3].endswith("part-1.jsonl")


def test_merge_command_names_a_missing_part_literally(tmp_path: Path) -> None:
    (tmp_path / "part-0.parquet").touch()
    (tmp_path / "part-2.parquet").touch()
    argv = run_script("merge.sbatch", tmp_path, OUT_DIR=str(tmp_path), TASKS="3", EXPECT_COUNT="7")
    assert argv == [
        "merge",
        f"{tmp_path}/part-0.parquet",
        f"{tmp_path}/part-2.parquet",
        "--expect-parts",
        "3",
        "--out",
        f"{tmp_path}/captions.parquet",
        "--expect-count",
        "7",
    ]


def test_train_command(tmp_path: Path) -> None:
    argv = run_script(
        "train.sbatch",
        tmp_path,
        DATA="/data/flickr8k",
        MODEL_OUT=str(tmp_path / "m.safetensors"),
        ENCODER_WEIGHTS="x.safetensors",
        EPOCHS="3",
    )
    assert argv == [
        "train",
        "/data/flickr8k",
        "--out",
        str(tmp_path / "m.safetensors"),
        "--device",
        "cuda",
        "--encoder-weights",
        "x.safetensors",
        "--epochs",
        "3",
    ]


def test_train_command_with_a_second_data_set_in_extra_args(tmp_path: Path) -> None:
    argv = run_script(
        "train.sbatch",
        tmp_path,
        DATA="/data/flickr8k",
        MODEL_OUT=str(tmp_path / "m.safetensors"),
        EXTRA_ARGS="/data/dataset_everyday.json --dataset-weight 3 --dataset-weight 1",
    )
    assert argv[:2] == ["train", "/data/flickr8k"] and argv[-5:] == [
        "/data/dataset_everyday.json",
        "--dataset-weight",
        "3",
        "--dataset-weight",
        "1",
    ]
    context = cli.commands["train"].make_context("train", argv[1:])  # what batchcap makes of it
    assert context.params["data"] == ("/data/flickr8k", "/data/dataset_everyday.json")
    assert context.params["dataset_weights"] == (3.0, 1.0)


def test_submit_builds_array_and_dependent_merge(tmp_path: Path) -> None:
    """submit.sh with a recording stand-in for sbatch: array size, GPUs, afterok dependency."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "calls.txt"
    fake = bin_dir / "sbatch"
    fake.write_text(
        '#!/bin/sh\necho "$TASKS|$INPUT|$*" >> "$CALLS"\nn=$(wc -l < "$CALLS"); echo "$((100 + n));cluster"\n'
    )
    fake.chmod(0o755)
    env = dict(
        os.environ,
        PATH=f"{bin_dir}:{os.environ['PATH']}",
        CALLS=str(calls),
        GRES="gpu:1",
        ARRAY_LIMIT="2",
        SBATCH_ARGS="--partition=gpu --time=1:00:00",
    )
    result = subprocess.run(
        [str(SLURM_DIR / "submit.sh"), "photos", str(tmp_path / "out"), "5"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    assert result.stdout.startswith("array_job=101 merge_job=102 tasks=5 ")
    caption, merge = calls.read_text().splitlines()
    assert caption.startswith(f"5|{tmp_path}/photos|")
    assert "--array=0-4%2" in caption and "--gres=gpu:1" in caption and "--partition=gpu" in caption
    assert "--cpus-per-task=16" in caption and "--mem=20G" in caption  # a GPU task's defaults
    assert caption.endswith("caption-array.sbatch")
    assert "--dependency=afterok:101" in merge and "--gres" not in merge and merge.endswith("merge.sbatch")
    assert "--cpus-per-task" not in merge and "--mem" not in merge
    assert (tmp_path / "out" / "logs").is_dir()

    calls.unlink()
    env = dict(env, GRES="", CPUS_PER_TASK="6", MEM="12G")
    subprocess.run(
        [str(SLURM_DIR / "submit.sh"), "photos", str(tmp_path / "out"), "2"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    caption = calls.read_text().splitlines()[0]
    assert "--cpus-per-task=6" in caption and "--mem=12G" in caption and "--gres" not in caption
    env = dict(env, CPUS_PER_TASK="many")
    refused = subprocess.run(
        [str(SLURM_DIR / "submit.sh"), "photos", str(tmp_path / "out"), "2"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert refused.returncode == 2 and "CPUS_PER_TASK must be a positive integer" in refused.stderr


def test_caption_task_decodes_with_the_cpus_slurm_gave_it(tmp_path: Path) -> None:
    base = dict(INPUT="in", OUT_DIR=str(tmp_path), SLURM_ARRAY_TASK_ID="0", SLURM_ARRAY_TASK_MAX="0")
    argv = run_script("caption-array.sbatch", tmp_path, SLURM_CPUS_PER_TASK="16", **base)
    assert argv[argv.index("--workers") + 1] == "15"
    argv = run_script("caption-array.sbatch", tmp_path, SLURM_CPUS_PER_TASK="1", EXTRA_ARGS="--workers 0", **base)
    assert argv[-4:] == ["--workers", "1", "--workers", "0"]  # EXTRA_ARGS comes last, so it wins
    assert "--workers" not in run_script("caption-array.sbatch", tmp_path, **base)  # auto: the affinity mask


# --- a real Slurm -------------------------------------------------------------------------------


TEST_CLUSTER_MARKER = Path("/etc/slurm/batchcap-test-cluster")


def _test_cluster_problem(marker: Path = TEST_CLUSTER_MARKER) -> str | None:
    """Why the Slurm that answers here is not .ci/slurm-up.sh's test cluster, or None when it is.

    The marker slurm-up writes names the cluster; ``scontrol show config`` says which cluster the
    Slurm commands of this environment (SLURM_CONF included) actually reach. They must agree on the
    cluster name, the slurm.conf in use (path and sha256) and a controller on 127.0.0.1.
    """
    advice = "the tests submit jobs only to the one-node cluster .ci/slurm-up.sh starts (run it as root)"
    try:
        lines = marker.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        return f"no test-cluster marker ({marker}: {exc.strerror or exc}): {advice}"
    expected = dict(line.split("=", 1) for line in lines if "=" in line and not line.startswith("#"))
    try:
        shown = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True, timeout=20)
    except subprocess.TimeoutExpired:
        return "scontrol show config timed out: slurmctld is not answering (run .ci/slurm-up.sh as root)"
    config = {}
    for line in shown.stdout.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            config[key.strip()] = value.strip()
    if shown.returncode != 0 or not config:
        return f"scontrol show config failed ({shown.stderr.strip()!r}): {advice}"
    cluster, conf = config.get("ClusterName", ""), config.get("SLURM_CONF", "")
    if cluster != expected.get("cluster") or conf != expected.get("conf"):
        return (
            f"the Slurm answering here is cluster {cluster!r} configured by {conf!r}, not the test cluster "
            f"{expected.get('cluster')!r} of {marker} ({expected.get('conf')!r}): {advice}"
        )
    try:
        digest = hashlib.sha256(Path(conf).read_bytes()).hexdigest()
    except OSError as exc:
        return f"cannot read {conf} ({exc.strerror or exc}): {advice}"
    if digest != expected.get("conf_sha256"):
        return f"{conf} changed since .ci/slurm-up.sh wrote it (sha256 differs from {marker}): {advice}"
    if f"({expected.get('controller')})" not in config.get("SlurmctldHost[0]", ""):
        return f"the controller is {config.get('SlurmctldHost[0]')!r}, not on this machine: {advice}"
    return None


def _slurm_problem() -> str | None:
    """Why the Slurm tests cannot run here, or None when the test cluster's node is up."""
    for tool in ("sinfo", "sbatch", "scontrol", "scancel"):
        if shutil.which(tool) is None:
            return f"{tool} not found: Slurm is not installed (run .ci/slurm-up.sh as root)"
    problem = _test_cluster_problem()
    if problem is not None:
        return problem
    try:
        states = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=20)
    except subprocess.TimeoutExpired:
        return "sinfo timed out: slurmctld is not answering (run .ci/slurm-up.sh as root)"
    usable = {"idle", "mixed", "allocated", "completing"}
    if states.returncode != 0 or not usable & {s.strip().rstrip("*~#") for s in states.stdout.split()}:
        return f"no usable Slurm node (sinfo: {(states.stdout + states.stderr).strip()!r}); run .ci/slurm-up.sh"
    return None


def _fake_slurm(bin_dir: Path, config: str) -> None:
    """Stand-ins for the Slurm commands: an idle node, and ``scontrol show config`` printing ``config``."""
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "config.txt").write_text(config)
    tools = {"sinfo": "echo idle", "sbatch": "echo 1", "scancel": "true", "scontrol": f"cat {bin_dir / 'config.txt'}"}
    for tool, body in tools.items():
        (bin_dir / tool).write_text(f"#!/bin/sh\n{body}\n")
        (bin_dir / tool).chmod(0o755)


def test_a_slurm_that_is_not_the_test_cluster_is_never_used(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """On a login node `sinfo` answers too: the tests must skip there, not queue jobs on a real cluster."""
    bin_dir = tmp_path / "bin"
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    _fake_slurm(
        bin_dir, "ClusterName = prod\nSLURM_CONF = /etc/slurm/slurm.conf\nSlurmctldHost[0] = login1(10.1.2.3)\n"
    )
    problem = _slurm_problem()
    assert problem is not None and ".ci/slurm-up.sh" in problem, problem

    # What the marker describes, and nothing else, passes.
    conf = tmp_path / "slurm.conf"
    conf.write_text("ClusterName=batchcap\n")
    marker = tmp_path / "batchcap-test-cluster"
    digest = hashlib.sha256(conf.read_bytes()).hexdigest()
    marker.write_text(
        f"# test cluster\ncluster=batchcap\ncontroller=127.0.0.1\nnode=vm\nconf={conf}\nconf_sha256={digest}\n"
    )
    _fake_slurm(bin_dir, f"ClusterName = batchcap\nSLURM_CONF = {conf}\nSlurmctldHost[0] = vm(127.0.0.1)\n")
    assert _test_cluster_problem(marker) is None
    _fake_slurm(bin_dir, f"ClusterName = batchcap\nSLURM_CONF = {conf}\nSlurmctldHost[0] = head(10.1.2.3)\n")
    assert "not on this machine" in (_test_cluster_problem(marker) or "")
    _fake_slurm(
        bin_dir, "ClusterName = batchcap\nSLURM_CONF = /etc/slurm-prod/slurm.conf\nSlurmctldHost[0] = vm(127.0.0.1)\n"
    )
    assert "not the test cluster" in (_test_cluster_problem(marker) or "")  # SLURM_CONF points elsewhere
    _fake_slurm(bin_dir, f"ClusterName = batchcap\nSLURM_CONF = {conf}\nSlurmctldHost[0] = vm(127.0.0.1)\n")
    conf.write_text("ClusterName=batchcap\nPartitionName=gpu Nodes=ALL\n")
    assert "changed since" in (_test_cluster_problem(marker) or "")
    assert "no test-cluster marker" in (_test_cluster_problem(tmp_path / "absent") or "")


@pytest.fixture(scope="module")
def slurm() -> None:
    problem = _slurm_problem()
    if problem is not None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI must run the Slurm tests, but: {problem}")
        pytest.skip(problem)


def job_state(job: str) -> str:
    """JobState of ``job`` (``123``, ``123_4``) from scontrol; '' when Slurm no longer knows it."""
    shown = subprocess.run(["scontrol", "-o", "show", "job", job], capture_output=True, text=True, timeout=20)
    states = re.findall(r"\bJobState=(\S+)", shown.stdout)
    if not states:
        return ""
    if len(states) > 1:  # a whole array: the worst of its tasks
        return next((s for s in states if s not in ("COMPLETED",)), "COMPLETED")
    return states[0]


def wait_for(check: Callable[[], bool], timeout: float, what: str, logs: Path) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}\n{dump_logs(logs)}")
        time.sleep(0.1)


def dump_logs(logs: Path) -> str:
    queue = subprocess.run(["squeue"], capture_output=True, text=True).stdout
    texts = [f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(logs.glob("*.log"))] if logs.exists() else []
    return f"squeue:\n{queue}\n" + "\n".join(texts)


def submit(photos: Path, out_dir: Path, tasks: int, env: dict[str, str]) -> tuple[str, str]:
    result = subprocess.run(
        [str(SLURM_DIR / "submit.sh"), str(photos), str(out_dir), str(tasks)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    ids = dict(re.findall(r"(\w+)=(\S+)", result.stdout))
    return ids["array_job"], ids["merge_job"]


def slurm_env(model: Path, images: int, extra: str) -> dict[str, str]:
    return dict(
        os.environ,
        BATCHCAP=BATCHCAP,
        MODEL=str(model),
        EXPECT_COUNT=str(images),
        EXTRA_ARGS=f"--workers 0 {extra}",
        OMP_NUM_THREADS="1",
    )


def assert_exactly_once(path: Path, photos: Path) -> None:
    ids = Counter(pq.read_table(path, columns=["id"]).column("id").to_pylist())
    assert [i for i, n in ids.items() if n > 1] == []
    assert sorted(ids) == sorted(p.name for p in photos.iterdir())


def submit_with_two_minute_limit(env: dict[str, str], out_dir: Path, logs: Path) -> str:
    """One caption task with a two-minute limit and the warning 100 s before it; returns the array's id."""
    logs.mkdir(parents=True)
    submitted = subprocess.run(
        [
            "sbatch",
            "--parsable",
            "--array=0",
            "--time=2",
            "--signal=B:USR1@100",
            f"--chdir={out_dir}",
            f"--output={logs}/caption-%A_%a.log",
            str(SLURM_DIR / "caption-array.sbatch"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return submitted.stdout.strip().split(";")[0]


def cancel(*jobs: str) -> None:
    subprocess.run(["scancel", *jobs], capture_output=True, timeout=20)


@pytest.mark.slurm
@pytest.mark.slow
def test_array_and_merge(slurm: None, tmp_path: Path, tiny_model_path: Path) -> None:
    photos, out_dir = tmp_path / "photos", tmp_path / "out"
    write_images(photos, 36)
    array, merge = submit(photos, out_dir, 3, slurm_env(tiny_model_path, 36, ""))
    try:
        wait_for(lambda: job_state(merge) in FINAL_STATES, 600, f"merge job {merge}", out_dir / "logs")
        assert job_state(merge) == "COMPLETED", dump_logs(out_dir / "logs")
        assert job_state(array) == "COMPLETED"
        assert_exactly_once(out_dir / "captions.parquet", photos)
        parts = [pq.read_metadata(out_dir / f"part-{i}.parquet").num_rows for i in range(3)]
        assert sum(parts) == 36 and min(parts) > 0  # three real shards
        assert "merged parts=3 rows=36" in (out_dir / "logs" / f"merge-{merge}.log").read_text()
    finally:
        cancel(array, merge)


def three_task_array(
    tmp_path: Path, model: Path, extra: str, images: int = 240
) -> tuple[Path, Path, Path, dict[str, str], str, str]:
    """240 pictures as a 3-task array plus merge: photos, out_dir, logs, env, array id, merge id."""
    photos, out_dir = tmp_path / "photos", tmp_path / "out"
    write_images(photos, images)
    env = slurm_env(model, images, extra)
    array, merge = submit(photos, out_dir, 3, env)
    return photos, out_dir, out_dir / "logs", env, array, merge


@pytest.mark.slurm
@pytest.mark.slow
def test_cancelled_task_requeued_stays_exactly_once(slurm: None, tmp_path: Path, tiny_model_path: Path) -> None:
    # One image per batch, a commit every 2 rows: task 1 is cancelled with work committed.
    photos, out_dir, logs, env, array, merge = three_task_array(
        tmp_path, tiny_model_path, "--batch-size 1 --commit-every 2"
    )
    task = f"{array}_1"
    work = out_dir / "part-1.parquet.batchcap-work"
    try:
        wait_for(lambda: any(work.glob("part-*.parquet")), 600, f"a committed part of task {task}", logs)
        assert job_state(task) == "RUNNING"
        cancel(task)
        wait_for(lambda: job_state(task) == "CANCELLED", 120, f"{task} to be cancelled", logs)
        assert not (out_dir / "part-1.parquet").exists()  # stopped mid-run

        # Requeue the cancelled task (Slurm delays a requeued job's start; start it now).
        subprocess.run(["scontrol", "requeue", task], check=True, capture_output=True, timeout=20)
        subprocess.run(["scontrol", "update", f"JobId={task}", "StartTime=now"], capture_output=True, timeout=20)
        wait_for(lambda: job_state(task) in FINAL_STATES, 600, f"requeued {task}", logs)
        assert job_state(task) == "COMPLETED", dump_logs(logs)
        log = (logs / f"caption-{array}_1.log").read_text()
        assert "restarts=1" in log
        skipped = re.findall(r"already done:\s+(\d+)", log)
        assert skipped and int(skipped[-1]) > 0, log  # the requeued run resumed, it did not start over

        # A cancelled task fails an afterok dependency for good: merge again once it is done.
        wait_for(lambda: job_state(array) in FINAL_STATES, 600, f"array {array}", logs)
        merge_env = dict(env, OUT_DIR=str(out_dir), TASKS="3", OUT=str(out_dir / "final.parquet"))
        again = subprocess.run(
            [
                "sbatch",
                "--parsable",
                f"--dependency=afterok:{task}",
                f"--chdir={out_dir}",
                f"--output={logs}/merge-%j.log",
                str(SLURM_DIR / "merge.sbatch"),
            ],
            env=merge_env,
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        merge2 = again.stdout.strip().split(";")[0]
        wait_for(lambda: job_state(merge2) in FINAL_STATES, 300, f"merge job {merge2}", logs)
        assert job_state(merge2) == "COMPLETED", dump_logs(logs)
        assert_exactly_once(out_dir / "final.parquet", photos)
    finally:
        cancel(array, merge)


def committed_rows(work: Path) -> int:
    return sum(pq.read_metadata(p).num_rows for p in work.glob("part-*.parquet"))


@pytest.mark.slurm
@pytest.mark.slow
def test_running_task_requeued_stops_cleanly_and_merge_is_exactly_once(
    slurm: None, tmp_path: Path, tiny_model_path: Path
) -> None:
    """`scontrol requeue` of a running task: SIGTERM, forwarded by the script, commits what was captioned."""
    # No commit before the end but the one the stop makes. 1,000 pictures a task: the tiny model
    # captions ~400 a second on a quiet CPU, and the requeue's SIGTERM must land mid-run (with 80
    # a task it once arrived after the last batch, where batchcap finishes the output instead).
    photos, out_dir, logs, _, array, merge = three_task_array(
        tmp_path, tiny_model_path, "--batch-size 1 --commit-every 100000 --log-every 0.2", images=3000
    )
    task = f"{array}_1"
    log_path = logs / f"caption-{array}_1.log"
    work = out_dir / "part-1.parquet.batchcap-work"

    def captioned() -> int:
        found = re.findall(r" ok=(\d+) ", log_path.read_text()) if log_path.exists() else []
        return int(found[-1]) if found else 0

    try:
        wait_for(lambda: captioned() >= 5, 600, f"{task} to caption 5 pictures", logs)
        subprocess.run(["scontrol", "requeue", task], check=True, capture_output=True, timeout=20)
        wait_for(lambda: "interrupted:" in log_path.read_text(), 120, f"{task} to stop", logs)
        first = log_path.read_text()
        assert "SIGTERM received" in first and "Traceback" not in first, first
        kept = committed_rows(work)
        assert kept == int(re.findall(r"^  captioned now:\s+(\d+)", first, re.MULTILINE)[-1]) > 0

        wait_for(
            lambda: job_state(task) in ("PENDING", "REQUEUED", "RUNNING", "COMPLETED"),
            120,
            f"{task} to be requeued",
            logs,
        )
        wait_for(lambda: job_state(merge) in FINAL_STATES, 600, f"merge job {merge}", logs)
        assert job_state(merge) == "COMPLETED", dump_logs(logs)  # a requeue keeps afterok
        log = log_path.read_text()
        assert "restarts=1" in log
        assert int(re.findall(r"already done:\s+(\d+)", log)[-1]) == kept  # resumed
        assert_exactly_once(out_dir / "captions.parquet", photos)
    finally:
        cancel(array, merge)


@pytest.mark.slurm
@pytest.mark.slow
def test_time_limit_warning_stops_and_requeues_until_done(slurm: None, tmp_path: Path, tiny_model_path: Path) -> None:
    """A two-minute limit with the warning 100 s before it: the task stops, requeues itself, finishes."""
    photos, out_dir, logs = tmp_path / "photos", tmp_path / "out", tmp_path / "out" / "logs"
    # Each run has about 20 s before the warning. How many pictures that is depends on the machine
    # (100 to 170 a second when quiet, far fewer when busy), so measure the rate with the task's own
    # settings first and give the job about 60 s of work. Slurm sends the warning on its own periodic
    # check, so it came anywhere from 5 to 32 s into a run here, and the probe (start-up included)
    # underestimates a long run's rate by up to 1.6x (32 s x 1.6 = 51 s: never one run). A run the
    # warning stops before captioning begins makes no progress, so the task may requeue up to 50 times.
    # Commits every 200 rows: the SIGTERM still commits what is captioned, and a resume does not
    # spend its few seconds before the warning reading thousands of two-row parts (a fast CPU,
    # 400 pictures a second, left 5,000 of them and then stalled before captioning began).
    probe = tmp_path / "probe"
    write_images(probe, 1000)  # enough that start-up (in the summary's rate) weighs little
    timed = subprocess.run(
        [
            BATCHCAP,
            "run",
            str(probe),
            "--out",
            str(tmp_path / "probe.parquet"),
            "--model",
            str(tiny_model_path),
            "--workers",
            "0",
            "--batch-size",
            "1",
            "--commit-every",
            "200",
        ],
        env=dict(os.environ, OMP_NUM_THREADS="1"),
        capture_output=True,
        text=True,
        timeout=600,
    )
    rate = float(re.findall(r"\(([\d.]+) images/s\)", timed.stderr + timed.stdout)[-1])
    images = max(1000, int(rate * 60))
    write_images(photos, images)
    env = dict(
        slurm_env(tiny_model_path, images, "--batch-size 1 --commit-every 200"),
        TASKS="1",
        INPUT=str(photos),
        OUT_DIR=str(out_dir),
        MAX_REQUEUES="50",
    )
    array = submit_with_two_minute_limit(env, out_dir, logs)
    task = f"{array}_0"
    log_path = logs / f"caption-{array}_0.log"
    try:
        # Each self-requeue waits out the test cluster's cred_expire (10 s) before it starts again.
        wait_for(lambda: job_state(task) in FINAL_STATES, 1800, f"{task} to finish over several runs", logs)
        log = log_path.read_text()
        assert job_state(task) == "COMPLETED", dump_logs(logs)
        assert "time limit near: stopping batchcap" in log and f"requeued {task}" in log, log
        assert "SIGTERM received" in log and "interrupted:" in log and "Traceback" not in log, log
        assert "restarts=1" in log
        assert_exactly_once(out_dir / "part-0.parquet", photos)
    finally:
        cancel(array)


@pytest.mark.slurm
@pytest.mark.slow
def test_a_warning_before_batchcap_handles_signals_still_requeues(
    slurm: None, tmp_path: Path, tiny_model_path: Path
) -> None:
    """The warning may land while Python starts: batchcap dies of the SIGTERM (143), and the task still requeues."""
    photos, out_dir, logs = tmp_path / "photos", tmp_path / "out", tmp_path / "out" / "logs"
    write_images(photos, 30)
    # A first run that never gets as far as handling signals: the command is still "starting" (a
    # sleep) when the warning comes, so the SIGTERM the script forwards kills it outright.
    starting = tmp_path / "slow-start"
    starting.write_text(f'#!/bin/sh\n[ "${{SLURM_RESTART_COUNT:-0}}" -gt 0 ] || exec sleep 600\nexec {BATCHCAP} "$@"\n')
    starting.chmod(0o755)
    env = dict(
        slurm_env(tiny_model_path, 30, "--batch-size 4"),
        BATCHCAP=str(starting),
        TASKS="1",
        INPUT=str(photos),
        OUT_DIR=str(out_dir),
    )
    array = submit_with_two_minute_limit(env, out_dir, logs)
    task = f"{array}_0"
    try:
        wait_for(lambda: job_state(task) in FINAL_STATES, 600, f"{task} to finish after a requeue", logs)
        log = (logs / f"caption-{array}_0.log").read_text()
        assert job_state(task) == "COMPLETED", dump_logs(logs)
        assert "time limit near: stopping batchcap" in log and f"requeued {task}" in log, log
        assert "restarts=1" in log
        assert_exactly_once(out_dir / "part-0.parquet", photos)
    finally:
        cancel(array)
