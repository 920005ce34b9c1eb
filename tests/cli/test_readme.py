"""The README's command lines are real: each `mnist-pipeline ...` example parses with the
CLI's own options, and each `make` target it names exists."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import click
import pytest

from mnist_pipeline.cli import cli

README = Path(__file__).resolve().parents[2] / "README.md"


def shell_lines() -> list[str]:
    blocks = re.findall(r"```sh\n(.*?)```", README.read_text(), re.S)
    joined = "\n".join(blocks).replace("\\\n", " ")
    return [line.split("#")[0].strip() for line in joined.splitlines() if line.strip()]


def pipeline_examples() -> list[list[str]]:
    examples = []
    for line in shell_lines():
        words = shlex.split(line)
        while words and "=" in words[0]:  # VAR=value prefixes
            words = words[1:]
        if words and Path(words[0]).name == "mnist-pipeline":
            examples.append(words[1:])
    return examples


def test_readme_has_examples_of_every_stage() -> None:
    used = {words[0] for words in pipeline_examples() if words}
    assert {"data", "train", "export", "serve", "infer", "run"} <= used


@pytest.mark.parametrize("args", pipeline_examples(), ids=" ".join)
def test_readme_example_parses(args: list[str]) -> None:
    if args == ["--help"]:
        return
    command = cli.get_command(click.Context(cli), args[0])
    assert command is not None, f"no command {args[0]!r}"
    # Parsing checks every option name and value type without running the stage.
    command.make_context(args[0], args[1:])


def test_readme_make_targets_exist() -> None:
    makefile = (README.parent / "Makefile").read_text()
    targets = set(re.findall(r"^([\w-]+):", makefile, re.M))
    named = {line.split()[1] for line in shell_lines() if line.startswith("make ")}
    assert named and named <= targets, named - targets


def test_quick_start_is_two_commands_and_says_how_to_reach_the_cli() -> None:
    text = README.read_text()
    section = re.split(r"\n#{2,3} ", text.split("## Quick start", 1)[1], maxsplit=1)[0]
    # One block, and no other command to copy before the next heading (apt-get lines were).
    assert section.count("```sh\n") == 1 and "sudo apt-get" not in section, section
    quick = section.split("```sh\n", 1)[1].split("```", 1)[0]
    assert [line.split()[:2] for line in quick.strip().splitlines()] == [
        ["make", "run"],
        ["make", "test"],
    ]
    # Examples call `mnist-pipeline`, which a fresh clone only has inside the venv.
    assert "source .venv/bin/activate" in text and "`.venv/bin/mnist-pipeline`" in text
    makefile = (README.parent / "Makefile").read_text()
    assert "VENV   ?= .venv" in makefile


def test_the_stage_table_and_the_top_level_help_name_every_subcommand() -> None:
    """Issue 19.6: prune and wait were in neither."""
    text = README.read_text()
    table = text.split("## What it does", 1)[1].split("\n\n", 2)[1]
    rows = {line.split("|")[1].strip() for line in table.splitlines()[2:]}
    assert rows == set(cli.commands), rows ^ set(cli.commands)
    stages = (cli.help or "").split("\b", 1)[1]
    named = {line.split()[1] for line in stages.splitlines() if "mnist-pipeline " in line}
    assert named == set(cli.commands), named ^ set(cli.commands)


def test_the_readme_says_results_are_reproducible_per_machine_not_across_cpus() -> None:
    """Issue 19.7: the same run id gave 0.9912 on an AMD EPYC and 0.9924 on the Xeon."""
    assert "reproducible per machine, not across CPUs" in " ".join(README.read_text().split())
