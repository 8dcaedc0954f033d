"""The documentation must match the program it documents.

* Every ``batchcap <command> --option`` the documentation names is a real option. Collected from
  README.md, every page under ``docs/``, everything under ``jobs/``, and the commands' own ``--help``
  examples: command lines (shell continuations joined), ``EXTRA_ARGS`` examples of the job scripts,
  and the option tables of the ``## `batchcap <command>``` sections (any heading level).
* Every ``Example:`` line in a command's ``--help`` parses: click accepts its options, their values
  and its arguments (without running the command).
* Every relative link in README.md and ``docs/`` leads to a file that exists, and a ``#anchor`` to a
  heading of that page.

A renamed or removed option, or a moved page, then fails here instead of in a user's terminal.
"""

from __future__ import annotations

import re
import shlex
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
_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
_SECTION = re.compile(r"`batchcap (\w+)")


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
            rest = line[match.end() :]
            end = _END_OF_COMMAND.search(rest)
            rest = rest[: end.start()] if end else rest
            found += [(match.group(1), opt, line.strip()) for opt in _OPTION.findall(rest)]
        if "EXTRA_ARGS" in line:  # job scripts pass EXTRA_ARGS to their batchcap command
            command = "train" if "train" in line else default_command
            for quoted in _QUOTED.finditer(line):
                found += [(command, opt, line.strip()) for opt in _OPTION.findall(quoted.group(2))]
    return found


def table_mentions(text: str) -> list[tuple[str, str, str]]:
    """Options in the first cell of option-table rows, attributed to the section's command.

    A section is a heading that starts with `` `batchcap <command>` `` (any level); it ends at the
    next heading of the same or a higher level. Its subsections belong to it.
    """
    found, command, level = [], None, 0
    for line in text.splitlines():
        heading = _HEADING.match(line)
        if heading:
            depth, title = len(heading.group(1)), heading.group(2)
            section = _SECTION.match(title)
            if section:
                command, level = section.group(1), depth
            elif depth <= level:
                command, level = None, 0
        elif command in COMMANDS and line.startswith("| `--"):
            first_cell = line.split("|")[1]
            found += [(command, opt, line.strip()) for opt in _OPTION.findall(first_cell)]
    return found


def _pages() -> list[Path]:
    """README.md and every Markdown page under docs/."""
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def _documents() -> list[tuple[str, str, str]]:
    docs = [(str(path.relative_to(ROOT)), path.read_text(), "run") for path in _pages()]
    for path in sorted((ROOT / "jobs").rglob("*")):
        if path.is_file():
            docs.append((str(path.relative_to(ROOT)), path.read_text(), "train" if "train" in path.name else "run"))
    for name, command in cli.commands.items():
        docs.append((f"batchcap {name} --help", command.help or "", name))
    return docs


def _all_mentions() -> list[tuple[str, str, str, str]]:
    rows = [(where, *m) for where, text, default in _documents() for m in mentions(text, default)]
    for path in _pages():
        rows += [(f"{path.relative_to(ROOT)} (option table)", *m) for m in table_mentions(path.read_text())]
    return rows


def test_the_collector_sees_what_it_should() -> None:
    # A collector that finds nothing would pass the real test vacuously.
    sample = (
        "batchcap run ./photos --out x.parquet --beam 5 | batchcap report x.parquet --html r.html\n"
        "batchcap train flickr8k/ --out m.safetensors \\\n    --epochs 3  # then --not-this\n"
        "EXTRA_ARGS='--beam-size 5' sbatch caption-array.sbatch\n"
    )
    assert mentions(sample) == [
        ("run", "--out", sample.splitlines()[0]),
        ("run", "--beam", sample.splitlines()[0]),
        ("report", "--html", sample.splitlines()[0]),
        ("train", "--out", "batchcap train flickr8k/ --out m.safetensors  --epochs 3  # then --not-this"),
        ("train", "--epochs", "batchcap train flickr8k/ --out m.safetensors  --epochs 3  # then --not-this"),
        ("run", "--beam-size", "EXTRA_ARGS='--beam-size 5' sbatch caption-array.sbatch"),
    ]
    assert "--beam-size" not in _options("run")
    page = (
        "## `batchcap merge`\n\n| `--out`, `-o` | required | x |\n\n### Checks\n\n| `--expect-parts` | | x |\n\n"
        "## Environment variables\n\n| `--not-an-option` | | x |\n\n#### `batchcap report`\n\n| `--html FILE` | | x |\n"
    )
    assert [(c, o) for c, o, _ in table_mentions(page)] == [
        ("merge", "--out"),
        ("merge", "--expect-parts"),
        ("report", "--html"),
    ]
    seen = _all_mentions()
    assert len(seen) > 80
    assert {command for _, command, _, _ in seen} >= {"run", "train", "eval", "merge", "report", "bench"}
    assert {where for where, _, _, _ in seen} >= {"README.md", "docs/cli.md", "docs/cli.md (option table)"}
    # Every command's options are documented in a table of docs/cli.md.
    tabled = {(c, o) for where, c, o, _ in seen if where == "docs/cli.md (option table)"}
    for command in COMMANDS:
        assert tabled & {(command, o) for o in _options(command)}, f"docs/cli.md has no option table for {command}"


def unknown_options(rows: list[tuple[str, str, str, str]], command: str) -> list[str]:
    """The rows that give ``command`` an option it does not have."""
    valid = _options(command)
    return sorted(
        {f"{where}: {opt}  <- {line[:120]}" for where, cmd, opt, line in rows if cmd == command and opt not in valid}
    )


def test_an_unknown_option_on_a_docs_page_is_caught() -> None:
    page = (
        "# Merging\n\nRun `batchcap merge out/part-*.parquet --out all.parquet --expect-part 8` once.\n\n"
        "## `batchcap merge`\n\n| option | default | what |\n|---|---|---|\n| `--out`, `-o` | required | x |\n"
        "| `--verify` | off | x |\n"
    )
    rows = [("docs/page.md", *m) for m in mentions(page)]
    rows += [("docs/page.md (option table)", *m) for m in table_mentions(page)]
    wrong = unknown_options(rows, "merge")
    assert [w.split("  <-")[0] for w in wrong] == [
        "docs/page.md (option table): --verify",
        "docs/page.md: --expect-part",
    ], wrong


@pytest.mark.parametrize("command", COMMANDS)
def test_documented_options_exist(command: str) -> None:
    wrong = unknown_options(_all_mentions(), command)
    assert not wrong, f"`batchcap {command}` has no such option:\n" + "\n".join(wrong)


# -- the --help examples parse ---------------------------------------------------------------------
def help_examples(help_text: str) -> list[str]:
    """The ``batchcap ...`` lines under ``Example:``/``Examples:`` (and ``Start here:``) of a help text."""
    examples, inside = [], False
    for line in _joined_lines(help_text.replace("\b\n", "\n")):
        stripped = line.strip()
        if re.fullmatch(r"(Examples?|Start here):", stripped):
            inside = True
        elif inside and stripped.startswith("batchcap "):
            examples.append(" ".join(stripped.split()))
        elif inside and stripped:
            inside = False
    return examples


def parse_example(line: str, monkeypatch: pytest.MonkeyPatch) -> click.Context:
    """Parse one example command line as click would, without running it.

    Paths that must exist (``--init-model``, ``report OUTPUT``) are names on the reader's machine, so
    their existence is not checked; options, their values, choices, ranges and arguments are.
    """
    words = shlex.split(line.split(" #")[0])
    assert words[:1] == ["batchcap"] and len(words) > 1 and words[1] in cli.commands, line
    command = cli.commands[words[1]]
    for param in command.params:
        if isinstance(param.type, click.Path):
            monkeypatch.setattr(param.type, "exists", False)
    return command.make_context(words[1], words[2:], resilient_parsing=False)


def _all_help_examples() -> list[tuple[str, str]]:
    found = [("batchcap --help", line) for line in help_examples(cli.help or "")]
    for name, command in cli.commands.items():
        found += [(f"batchcap {name} --help", line) for line in help_examples(command.help or "")]
    return found


def test_help_examples_are_found() -> None:
    found = _all_help_examples()
    assert {where for where, _ in found} == {"batchcap --help"} | {f"batchcap {name} --help" for name in COMMANDS}
    assert (
        "batchcap train --help",
        "batchcap train flickr8k/ --out flickr8k.safetensors --encoder-weights legacy_xception.safetensors",
    ) in found  # a continued line, joined


@pytest.mark.parametrize("where, line", _all_help_examples())
def test_help_example_parses(where: str, line: str, monkeypatch: pytest.MonkeyPatch) -> None:
    try:
        parse_example(line, monkeypatch)
    except click.UsageError as exc:  # also BadParameter, NoSuchOption, MissingParameter
        pytest.fail(f"{where}: `{line}` does not parse: {exc.format_message()}")


@pytest.mark.parametrize(
    "line",
    [
        "batchcap run ./photos --out x.parquet --beam-size 5",  # no such option
        "batchcap run ./photos --beam 3",  # --out is required
        "batchcap run ./photos --out x.parquet --precision fp8",  # not a choice
        "batchcap merge --out captions.parquet",  # PARTS... is required
        "batchcap report captions.parquet --order random",  # not a choice
    ],
)
def test_a_broken_example_fails_to_parse(line: str, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(click.UsageError):
        parse_example(line, monkeypatch)


def test_parsing_an_example_runs_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    ctx = parse_example("batchcap report missing.parquet --html report.html", monkeypatch)
    assert ctx.params["output"] == "missing.parquet" and ctx.params["html_path"] == "report.html"
    assert list(tmp_path.iterdir()) == []


# -- relative links resolve ------------------------------------------------------------------------
_FENCE = re.compile(r"^(```|~~~).*?^\1", re.S | re.M)
_CODE_SPAN = re.compile(r"`[^`\n]*`")
_LINK = re.compile(r"!?\[(?:[^\]\[]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def slug(title: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", title)  # a link in a heading anchors by its text
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


def anchors(markdown: str) -> set[str]:
    """Anchors of a page's headings, numbered like GitHub's when a heading repeats."""
    seen: dict[str, int] = {}
    found = set()
    for line in _FENCE.sub("", markdown).splitlines():
        heading = _HEADING.match(line)
        if heading:
            base = slug(heading.group(2))
            n = seen.get(base, 0)
            seen[base] = n + 1
            found.add(base if n == 0 else f"{base}-{n}")
    return found


def broken_links(page: Path) -> list[str]:
    """Relative links of a Markdown page that lead nowhere: a missing file, or a missing heading."""
    text = page.read_text()
    prose = _CODE_SPAN.sub("", _FENCE.sub("", text))
    wrong = []
    for target in _LINK.findall(prose):
        if re.match(r"[a-z][a-z0-9+.-]*:", target, re.I):  # https:, mailto:, file: ...
            continue
        path_part, _, anchor = target.partition("#")
        dest = (page.parent / path_part).resolve() if path_part else page
        if not dest.exists():
            wrong.append(f"{target}: no such file {dest}")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest.read_text()):
            wrong.append(f"{target}: {dest.name} has no heading #{anchor}")
    return wrong


def test_link_checker_catches_planted_mistakes(tmp_path: Path) -> None:
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "cli.md").write_text(
        "# CLI\n\n## `batchcap run`\n\n### Where `--out` may be\n\n## Run\n\n## Run\n"
    )
    (tmp_path / "shot.png").write_bytes(b"png")
    page = tmp_path / "README.md"
    page.write_text(
        "# Top\n\n[ok](docs/cli.md) [ok](docs/cli.md#batchcap-run) [ok](docs/cli.md#where---out-may-be)\n"
        "[ok](docs/cli.md#run-1) ![ok](shot.png) [ok](#top) [web](https://example.org/x.md)\n"
        "[bad file](docs/nothing.md) [bad anchor](docs/cli.md#batchcap-runs) ![bad image](docs/shot.png)\n"
        "[bad here](#bottom) `[in code](nowhere.md)`\n\n```\n[in a block](nowhere.md)\n```\n"
    )
    wrong = broken_links(page)
    assert [w.split(":")[0] for w in wrong] == [
        "docs/nothing.md",
        "docs/cli.md#batchcap-runs",
        "docs/shot.png",
        "#bottom",
    ], wrong


@pytest.mark.parametrize("page", _pages(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page: Path) -> None:
    wrong = broken_links(page)
    assert not wrong, f"{page.relative_to(ROOT)} links to nothing:\n" + "\n".join(wrong)
