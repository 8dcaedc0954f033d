"""``batchcap bench`` end to end on a tiny model: the JSON has every figure, and they are positive."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import write_images
from PIL import Image

from batchcap.cli import cli
from batchcap.tools.bench import parse_size, suggest, write_bench_images

TINY_ARGS = [
    "--count",
    "8",
    "--size",
    "64x48",
    "--repeats",
    "1",
    "--batch-size",
    "4",
    "--workers",
    "1",
    "--device",
    "cpu",
    "--beam",
    "2",
]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_bench_json(tiny_model_path: Path) -> None:
    result = CliRunner().invoke(cli, ["bench", "--model", str(tiny_model_path), "--json", *TINY_ARGS])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)

    assert report["machine"]["torch_threads"] >= 1 and report["machine"]["cpu"]
    assert report["settings"]["source"] == {"generated": "64x48", "images": 8}
    assert report["settings"]["statistic"] == "median"
    labels = [(r["precision"], r["channels_last"]) for r in report["encoder"]]
    assert labels[:2] == [("fp32", False), ("fp32", True)]
    assert all(r["images_per_s"] > 0 and r["batch_size"] == 4 for r in report["encoder"])
    assert [r["batch_size"] for r in report["batch_sizes"]] == [2, 4, 8]
    assert all(r["images_per_s"] > 0 for r in report["batch_sizes"])
    assert report["decode"]["images_per_s"] > 0 and report["decode"]["images"] == 8
    assert report["loader"]["images_per_s"] > 0 and report["loader"]["workers"] == 1
    assert report["beam"]["captions_per_s"] > 0 and report["beam"]["beam"] == 2
    e2e = report["end_to_end"]
    assert e2e["images"] == 8 and e2e["part_images"] == 2 and e2e["whole_run_images_per_s"] > 0
    assert e2e["steady_images_per_s"] is None or e2e["steady_images_per_s"] > 0
    assert report["reference"]["images_per_s"] > 0 and report["reference"]["images"] == 8
    assert report["ratios"]["end_to_end_whole_run_vs_reference"] > 0
    assert report["ratios"]["encoder_vs_fp32"]["fp32"] == 1.0
    assert report["suggested"]["batch_size"] in (2, 4, 8) and report["suggested"]["workers"] >= 1


def test_bench_table_on_a_folder(tiny_model_path: Path, tmp_path: Path) -> None:
    folder = tmp_path / "photos"
    write_images(folder, 9)
    (folder / "notes.txt").write_text("not a picture")
    args = ["bench", str(folder), "--model", str(tiny_model_path), *TINY_ARGS]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert "Encoder alone" in result.stdout and "suggested: " in result.stdout
    assert "8 pictures" in result.stdout  # --count caps a folder too


def test_bench_refuses_a_missing_folder(tiny_model_path: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["bench", str(tmp_path / "nope"), "--model", str(tiny_model_path)])
    assert result.exit_code == 2  # a user error, not a crash
    assert "needs a folder of pictures" in result.output


def test_bench_refuses_a_bad_size(tiny_model_path: Path) -> None:
    result = CliRunner().invoke(cli, ["bench", "--model", str(tiny_model_path), "--size", "huge"])
    assert result.exit_code == 2 and "--size" in result.output and "WxH" in result.output


def test_generated_pictures(tmp_path: Path) -> None:
    paths = write_bench_images(tmp_path, 5, (120, 90), distinct=2)
    assert len(paths) == 5 and paths[0].read_bytes() == paths[2].read_bytes() != paths[1].read_bytes()
    with Image.open(paths[4]) as img:
        assert img.format == "JPEG" and img.size == (120, 90)
    assert parse_size("4000x3000") == (4000, 3000)
    with pytest.raises(ValueError, match="WxH"):
        parse_size("big")


def test_suggest_prefers_the_smallest_batch_near_the_best() -> None:
    sweep = [
        {"batch_size": 16, "images_per_s": 90.0},
        {"batch_size": 32, "images_per_s": 97.0},
        {"batch_size": 64, "images_per_s": 100.0},
    ]
    got = suggest(sweep, decode_rate=40.0, device=torch.device("cuda"))
    assert got["batch_size"] == 32
    assert got["workers_needed_to_keep_up"] == 4  # 1.25 * 97 / 40 rounded up


@pytest.mark.cuda
def test_bench_on_cuda(tiny_model_path: Path) -> None:
    """The CUDA path: fp16 and (where supported) bf16 rows, pinned batches, a GPU run."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    args = [a if a != "cpu" else "cuda" for a in TINY_ARGS]
    result = CliRunner().invoke(cli, ["bench", "--model", str(tiny_model_path), "--json", *args])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["machine"]["device"].startswith("cuda") and report["machine"]["gpu"]
    assert ("fp16", True) in [(r["precision"], r["channels_last"]) for r in report["encoder"]]
    assert all(r["peak_memory_mib"] > 0 for r in report["encoder"])
    assert report["end_to_end"]["precision"] in ("bf16", "fp16")
    assert report["end_to_end"]["whole_run_images_per_s"] > 0


def test_the_hardware_limit_follows_the_instruction_set_and_says_what_it_assumes(monkeypatch) -> None:
    from batchcap.tools import bench

    assert bench.instruction_set({"avx2", "fma"}, "AuthenticAMD", 25) == "avx2"
    assert bench.instruction_set({"avx2", "fma", "avx_vnni"}, "GenuineIntel", 6) == "avx2+vnni"
    assert bench.instruction_set({"avx2", "fma", "avx512f"}, "AuthenticAMD", 25) == "avx512-amd"  # Zen 4
    assert bench.instruction_set({"avx512f", "avx512_bf16"}, "AuthenticAMD", 26) == "avx512_bf16"  # Zen 5
    amx = {"avx512f", "avx512_bf16", "amx_bf16", "amx_int8"}
    assert bench.instruction_set(amx, "GenuineIntel", 6) == "amx"
    assert bench.instruction_set({"sse4_2"}, "GenuineIntel", 6) is None
    table = bench.FLOP_PER_CYCLE
    assert table["amx"]["bf16"] > table["avx512_bf16"]["bf16"] > table["avx512_bf16"]["fp32"]
    assert table["avx2"]["bf16"] == table["avx2"]["fp32"]  # no native bf16: no faster than fp32

    monkeypatch.setattr(bench, "available_cpus", lambda: 2)
    monkeypatch.setattr(bench, "instruction_set", lambda: "avx2")
    monkeypatch.setattr(bench, "_cpuinfo_field", lambda name: "2000.0" if name == "cpu MHz" else None)
    monkeypatch.delenv("BATCHCAP_PEAK_GFLOPS", raising=False)
    peak, assumption = bench.hardware_peak("fp32")
    assert peak == 32 * 2.0 * 2 and "avx2" in assumption and "2.00 GHz" in assumption and "2 cores" in assumption
    assert bench.hardware_limit(8.0, "fp32", torch.device("cpu")) == 128.0 / 16.0
    assert bench.hardware_limit(8.0, "fp32", torch.device("meta")) is None  # no table for accelerators
    monkeypatch.setenv("BATCHCAP_PEAK_GFLOPS", "50")
    assert bench.hardware_peak("bf16") == (100.0, "BATCHCAP_PEAK_GFLOPS=50 GFLOP/s per core x 2 cores")
    monkeypatch.delenv("BATCHCAP_PEAK_GFLOPS")
    monkeypatch.setattr(bench, "instruction_set", lambda: None)
    assert bench.hardware_peak("fp32") is None and bench.hardware_limit(8.0, "fp32", torch.device("cpu")) is None
