"""Option values -> config objects: messages name the options as typed; workers follow the CPU mask."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from batchcap.config import OptionError
from batchcap.hardware import available_cpus, default_workers
from batchcap.pipeline.settings import beam_config, image_policy, runtime_config


def test_n_best_above_beam_names_both_options_and_the_fix() -> None:
    with pytest.raises(OptionError) as info:
        beam_config(3, None, 1, 0.0, 0, 5, model_max_len=20)
    assert info.value.option == "--n-best"
    assert "use --beam 5 or more for --n-best 5" in str(info.value)
    assert "n_best" not in str(info.value)


def test_min_len_above_max_len_is_refused_by_option_name() -> None:
    with pytest.raises(OptionError) as info:
        beam_config(3, 4, 6, 0.0, 0, 1, model_max_len=20)
    assert info.value.option == "--min-len" and "--max-len 4" in info.value.message


def test_beam_config_takes_the_model_maximum_by_default() -> None:
    assert beam_config(3, None, 1, 0.0, 0, 1, model_max_len=17).max_len == 17


@pytest.mark.parametrize("value", ["many", "-1"])
def test_bad_workers(value: str) -> None:
    with pytest.raises(OptionError) as info:
        runtime_config("cpu", "fp32", None, value)
    assert info.value.option == "--workers"


@pytest.mark.parametrize("background", ["1,2", "0,0,256", "white"])
def test_bad_background(background: str) -> None:
    with pytest.raises(OptionError, match="R,G,B"):
        image_policy(1000, background, False, "jpg")


def test_default_workers_leave_one_cpu_for_the_model() -> None:
    assert default_workers(1) == 1
    assert default_workers(2) == 1
    assert default_workers(32) == 31  # no cap: a 32-CPU GPU task decodes with 31


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="needs Linux CPU affinity")
def test_available_cpus_follow_the_affinity_mask_not_the_node() -> None:
    # What Slurm's cgroup/affinity or taskset gives a task: one CPU, although the node has more.
    cpu = sorted(os.sched_getaffinity(0))[0]
    code = (
        f"import os; os.sched_setaffinity(0, {{{cpu}}}); "
        "from batchcap.hardware import available_cpus; from batchcap.pipeline.settings import runtime_config; "
        "print(available_cpus(), runtime_config('cpu', 'fp32', None, 'auto').workers)"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    assert out.split() == ["1", "1"]
    assert available_cpus() == len(os.sched_getaffinity(0))


@pytest.mark.parametrize(
    "setting, shown",
    [
        ("beam.beam_size", "--beam"),
        ("resume_settings.beam.n_best", "--n-best"),
        ("no_repeat_ngram", "--no-repeat-ngram"),
        ("model", "--model"),
        ("preprocess.resize", "the model's preprocessing (resize)"),
        ("schema_version", "schema version"),
    ],
)
def test_refusals_name_settings_as_options(setting: str, shown: str) -> None:
    from batchcap.config import option_name

    assert option_name(setting) == shown


class FakeGpus:
    """Stands in for the CUDA runtime of a node with two GPUs of a given compute capability."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, capability: tuple[int, int]) -> None:
        import torch

        self.capability = capability
        self.asked: list[object] = []
        self.current: list[object] = []
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
        monkeypatch.setattr(torch.cuda, "set_device", self.current.append)
        monkeypatch.setattr(torch.cuda, "get_device_capability", self._capability)
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)  # emulation counts, wrongly

    def _capability(self, device: object = None) -> tuple[int, int]:
        self.asked.append(device)
        return self.capability


@pytest.mark.parametrize(
    "capability, precision",
    [((7, 0), "fp16"), ((7, 5), "fp16"), ((8, 0), "bf16"), ((9, 0), "bf16")],
    ids=["V100", "T4", "A100", "H100"],
)
def test_auto_precision_follows_the_chosen_gpus_compute_capability(
    monkeypatch: pytest.MonkeyPatch, capability: tuple[int, int], precision: str
) -> None:
    import torch

    gpus = FakeGpus(monkeypatch, capability)
    runtime = runtime_config("cuda:1", "auto", None, "0")
    assert runtime.precision == precision
    assert gpus.asked == [torch.device("cuda:1")], "the capability of the GPU --device names decides"


def test_cuda_n_becomes_the_current_device_before_anything_touches_the_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    gpus = FakeGpus(monkeypatch, (8, 0))
    runtime = runtime_config("cuda:1", "bf16", None, "0")
    assert gpus.current == [torch.device("cuda:1")] and runtime.device == "cuda:1"
    assert runtime.batch_size == 256


@pytest.mark.cuda
def test_cuda_n_on_a_real_node() -> None:
    import torch

    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA devices")
    runtime_config("cuda:1", "auto", None, "0")
    assert torch.cuda.current_device() == 1
    torch.cuda.set_device(0)
