"""The command line: help for every command, version, module entry point, clean user errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from batchcap import __version__
from batchcap.cli import cli

COMMANDS = sorted(cli.commands)


def test_the_commands_users_expect_exist() -> None:
    assert {"run", "train", "eval", "info", "merge", "report", "bench"} <= set(COMMANDS)


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help_with_an_example(command: str) -> None:
    result = CliRunner().invoke(cli, [command, "--help"])
    assert result.exit_code == 0, result.output
    assert "Example" in result.output and f"batchcap {command}" in result.output


def test_version() -> None:
    result = CliRunner().invoke(cli, ["--version"])
    assert result.exit_code == 0 and __version__ in result.output


def test_python_dash_m_works() -> None:
    proc = subprocess.run([sys.executable, "-m", "batchcap", "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "run" in proc.stdout


def test_a_bad_model_file_is_a_message_not_a_traceback(tmp_path: Path, image_folder: Path) -> None:
    bogus = tmp_path / "model.safetensors"
    bogus.write_text("this is not a model")
    result = CliRunner().invoke(
        cli, ["run", str(image_folder), "--out", str(tmp_path / "o.parquet"), "--model", str(bogus)]
    )
    assert result.exit_code == 2
    assert "not a batchcap model file" in result.output and "Traceback" not in result.output


def test_usage_errors_exit_2(tmp_path: Path, image_folder: Path, tiny_model_path: Path) -> None:
    runner = CliRunner()
    out = str(tmp_path / "o.parquet")
    base = ["run", str(image_folder), "--out", out, "--model", str(tiny_model_path)]
    assert runner.invoke(cli, ["run", "--out", out]).exit_code == 2  # no source
    result = runner.invoke(cli, base + ["--beam", "2", "--n-best", "3"])
    assert result.exit_code == 2 and "use --beam 3 or more for --n-best 3" in result.output
    result = runner.invoke(cli, base + ["--shard", "3/2"])
    assert result.exit_code == 2
    result = runner.invoke(cli, base + ["--max-failures", "lots"])
    assert result.exit_code == 2
    result = runner.invoke(cli, ["run", str(tmp_path / "nowhere"), "--out", out, "--model", str(tiny_model_path)])
    assert result.exit_code == 2 and "nowhere" in result.output and "Traceback" not in result.output


def test_info_prints_the_model(tiny_model_path: Path) -> None:
    result = CliRunner().invoke(cli, ["info", str(tiny_model_path)])
    assert result.exit_code == 0, result.output
    assert "test_efficientnet" in result.output and "vocabulary" in result.output
    result = CliRunner().invoke(cli, ["info", str(tiny_model_path), "--json"])
    assert result.exit_code == 0 and '"tensors_sha256"' in result.output


@pytest.mark.parametrize("command", ["eval", "train"])
def test_missing_metrics_are_named_before_any_work(tmp_path: Path, command: str) -> None:
    # An environment without pycocoevalcap (installed with --no-deps, say): the message must come
    # first, not after every picture was captioned. DATA does not even exist here, so any work
    # done before the check would fail differently.
    code = (
        "import sys; sys.modules['pycocoevalcap'] = None; from batchcap.cli import main; "
        f"sys.argv = ['batchcap', {command!r}, {str(tmp_path / 'absent')!r}] + "
        f"({['--out', str(tmp_path / 'm.safetensors')]!r} if {command!r} == 'train' else []); main()"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "pip install pycocoevalcap" in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
