"""The GPU check script (tests/benchmarks/gpu_check.py), rehearsed on the CPU with a tiny model.

A GPU machine is lent rarely and briefly, so the script must work the first time there:
these tests run it end to end here, through its command line as a GPU machine would,
and fail when a step that can work on a CPU does not.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "tests" / "benchmarks" / "gpu_check.py"
CPU_OK = ("prepare-inputs", "bench-224x224", "bench-500x375", "run", "train", "eval")


def gpu_check(tmp_path: Path, *args: str, timeout: float = 300) -> tuple[subprocess.CompletedProcess, dict]:
    """Run the script with ``args`` into ``tmp_path/out``; its exit and its JSON."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--out",
            str(tmp_path / "out"),
            "--work",
            str(tmp_path / "work"),
            "--device",
            "cpu",
            "--skip-install",
            *args,
        ],
        check=False,
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    result = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    return proc, result


def by_name(result: dict) -> dict[str, dict]:
    return {step["name"]: step for step in result["steps"]}


@pytest.mark.slow
def test_cpu_rehearsal_runs_every_step_that_a_cpu_can(tmp_path: Path, tiny_model_path: Path) -> None:
    proc, result = gpu_check(
        tmp_path,
        "--count",
        "12",
        "--train-images",
        "16",
        "--model",
        str(tiny_model_path),
        "--train-encoder",
        "test_efficientnet",
        "--train-input-size",
        "64",
    )
    steps = by_name(result)
    assert {name: steps[name]["status"] for name in CPU_OK} == dict.fromkeys(CPU_OK, "ok"), {
        name: steps[name]["detail"] for name in CPU_OK
    }
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert steps["install"]["status"] == "skipped: --skip-install"
    assert steps["run-decode-on-device"]["status"].startswith("skipped: --decode-on-device needs a CUDA")
    tests = steps["cuda-tests"]
    if result["environment"].get("cuda_available"):  # a GPU machine: the CUDA tests must pass
        assert tests["status"] == "ok", tests["detail"]
    else:
        assert tests["status"].startswith("skipped: no CUDA tests ran"), tests["detail"]
        assert tests["figures"]["skipped"] > 0 and tests["figures"]["failures"] == 0
    run = steps["run"]["figures"]
    assert (run["rows"], run["duplicates"], run["missing"], run["statuses"]) == (12, 0, 0, {"ok": 12})
    assert steps["bench-500x375"]["figures"]["end_to_end_whole_run_images_per_s"] > 0
    assert steps["eval"]["figures"]["images"] == 4 and "CIDEr" in steps["eval"]["figures"]
    table = (tmp_path / "out" / "gpu_check.md").read_text()
    for name in steps:
        assert f"| {name} |" in table
    assert result["environment"]["torch"] in table


@pytest.mark.slow
def test_a_failing_step_is_recorded_and_the_next_runs(tmp_path: Path) -> None:
    proc, result = gpu_check(
        tmp_path,
        "--count",
        "4",
        "--only",
        "prepare-inputs,bench-224x224,run",
        "--model",
        str(tmp_path / "no-such-model.safetensors"),
    )
    steps = by_name(result)
    assert proc.returncode == 1
    assert steps["prepare-inputs"]["status"] == "ok"
    assert steps["bench-224x224"]["status"] == "failed: batchcap bench exited 2"
    assert steps["run"]["status"] == "failed: batchcap run exited 2"  # tried although bench failed
    assert "no-such-model" in steps["run"]["detail"]
    assert steps["train"]["status"] == "skipped: not in --only"


def test_out_of_budget_steps_are_skipped_and_results_written(tmp_path: Path) -> None:
    proc, result = gpu_check(tmp_path, "--budget", "1")
    assert {s["status"] for s in result["steps"]} <= {
        "skipped: budget",
        "skipped: --skip-install",
        "skipped: no --images",
        "skipped: --decode-on-device needs a CUDA device",
    }
    assert "| run | skipped: budget |" in (tmp_path / "out" / "gpu_check.md").read_text()
    assert proc.returncode == 0
