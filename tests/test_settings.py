"""Option values -> config objects: messages name the options as typed; workers follow the CPU mask."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from batchcap.settings import OptionError, available_cpus, beam_config, default_workers, image_policy, runtime_config


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
    code = (f"import os; os.sched_setaffinity(0, {{{cpu}}}); "
            "from batchcap.settings import available_cpus, runtime_config; "
            "print(available_cpus(), runtime_config('cpu', 'fp32', None, 'auto').workers)")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    assert out.split() == ["1", "1"]
    assert available_cpus() == len(os.sched_getaffinity(0))


@pytest.mark.parametrize("setting, shown", [
    ("beam.beam_size", "--beam"), ("resume_settings.beam.n_best", "--n-best"), ("no_repeat_ngram", "--no-repeat-ngram"),
    ("model", "--model"), ("preprocess.resize", "the model's preprocessing (resize)"),
    ("schema_version", "schema version"),
])
def test_refusals_name_settings_as_options(setting: str, shown: str) -> None:
    from batchcap.settings import option_name

    assert option_name(setting) == shown
