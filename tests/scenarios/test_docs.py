"""Every ``batchcap <command> --option`` the documentation names must be a real option.

Collected from README.md, everything under ``jobs/``, and the commands' own ``--help``
examples: command lines (shell continuations joined), ``EXTRA_ARGS`` examples of the
job scripts, and the option tables of the README's ``### `batchcap <command>``` sections.
A renamed or removed option then fails here instead of in a user's terminal.
"""
from __future__ import annotations

import re
from pathlib import Path

import click
import pytest

from batchcap.cli import cli

ROOT = Path(__file__).resolve().parents[2]
COMMANDS = tuple(cli.commands)
_COMMAND = re.compile(r"(?:^|(?<=[\s`'\"(/=]))batchcap\s+(" + "|".join(COMMANDS) + r")\b")
_END_OF_COMMAND = re.compile(r"`|\s(?:\||;|&&|\|\||#|->)\s|\)\s*$|\bthen\b")
_OPTION = re.compile(r"(?<![\w-])(--[a-z][a-z0-9-]*)")
_QUOTED = re.compile(r"(['\"])(.*?)\1")
_SECTION = re.compile(r"^###\s+`batchcap (\w+)")


def _options(command: str) -> set[str]:
    names = {"--help"}
    for param in cli.commands[command].params:
        if isinstance(param, click.Option):
            names.update(o for o in param.opts + param.secondary_opts if o.startswith("--"))
    return names


def _joined_lines(text: str) -> list[str]:
    """Lines with shell continuations (``\\`` at the end) joined to the next one."""
    return re.sub(r"\\\n\s*", " ", text).splitlines()


def mentions(text: str, default_command: str = "run") -> list[tuple[str, str, str]]:
    """``(command, option, line)`` for every option the text passes to a batchcap command.

    ``EXTRA_ARGS`` examples go to ``train`` on lines that mention training, else to
    ``default_command`` (the command of the script the text comes from).
    """
    found = []
    for line in _joined_lines(text):
        for match in _COMMAND.finditer(line):
            rest = line[match.end():]
            end = _END_OF_COMMAND.search(rest)
            rest = rest[:end.start()] if end else rest
            found += [(match.group(1), opt, line.strip()) for opt in _OPTION.findall(rest)]
        if "EXTRA_ARGS" in line:  # job scripts pass EXTRA_ARGS to their batchcap command
            command = "train" if "train" in line else default_command
            for quoted in _QUOTED.finditer(line):
                found += [(command, opt, line.strip()) for opt in _OPTION.findall(quoted.group(2))]
    return found


def table_mentions(readme: str) -> list[tuple[str, str, str]]:
    """Options in the first cell of option-table rows, attributed to the section's command."""
    found, command = [], None
    for line in readme.splitlines():
        heading = _SECTION.match(line)
        if heading:
            command = heading.group(1)
        elif line.startswith("## "):
            command = None
        elif command in COMMANDS and line.startswith("| `--"):
            first_cell = line.split("|")[1]
            found += [(command, opt, line.strip()) for opt in _OPTION.findall(first_cell)]
    return found


def _documents() -> list[tuple[str, str, str]]:
    docs = [("README.md", (ROOT / "README.md").read_text(), "run")]
    for path in sorted((ROOT / "jobs").rglob("*")):
        if path.is_file():
            docs.append((str(path.relative_to(ROOT)), path.read_text(), "train" if "train" in path.name else "run"))
    for name, command in cli.commands.items():
        docs.append((f"batchcap {name} --help", command.help or "", name))
    return docs


def _all_mentions() -> list[tuple[str, str, str, str]]:
    rows = [(where, *m) for where, text, default in _documents() for m in mentions(text, default)]
    rows += [("README.md (option table)", *m) for m in table_mentions((ROOT / "README.md").read_text())]
    return rows


def test_the_collector_sees_what_it_should() -> None:
    # A collector that finds nothing would pass the real test vacuously.
    sample = ("batchcap run ./photos --out x.parquet --beam 5 | batchcap report x.parquet --html r.html\n"
              "batchcap train flickr8k/ --out m.safetensors \\\n    --epochs 3  # then --not-this\n"
              "EXTRA_ARGS='--beam-size 5' sbatch caption-array.sbatch\n")
    assert mentions(sample) == [
        ("run", "--out", sample.splitlines()[0]), ("run", "--beam", sample.splitlines()[0]),
        ("report", "--html", sample.splitlines()[0]),
        ("train", "--out", "batchcap train flickr8k/ --out m.safetensors  --epochs 3  # then --not-this"),
        ("train", "--epochs", "batchcap train flickr8k/ --out m.safetensors  --epochs 3  # then --not-this"),
        ("run", "--beam-size", "EXTRA_ARGS='--beam-size 5' sbatch caption-array.sbatch"),
    ]
    assert "--beam-size" not in _options("run")
    seen = _all_mentions()
    assert len(seen) > 80
    assert {command for _, command, _, _ in seen} >= {"run", "train", "eval", "merge", "report", "bench"}


@pytest.mark.parametrize("command", COMMANDS)
def test_documented_options_exist(command: str) -> None:
    valid = _options(command)
    wrong = sorted({f"{where}: {opt}  <- {line[:120]}" for where, cmd, opt, line in _all_mentions()
                    if cmd == command and opt not in valid})
    assert not wrong, f"`batchcap {command}` has no such option:\n" + "\n".join(wrong)
