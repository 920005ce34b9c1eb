"""The README's command lines are real: each `mnist-pipeline ...` example parses with the
CLI's own options, each `MNIST_PIPELINE_*` variable it sets is one the command reads, and each
`make` target it names exists. Nothing here checks the README's wording."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import click
import pytest

from mnist_pipeline.cli import cli

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"


def shell_lines() -> list[str]:
    blocks = re.findall(r"```sh\n(.*?)```", README.read_text(), re.S)
    joined = "\n".join(blocks).replace("\\\n", " ")
    return [line.split("#")[0].strip() for line in joined.splitlines() if line.strip()]


def split(line: str) -> tuple[dict[str, str], list[str]]:
    """The `VAR=value` prefixes of a command line, and its words."""
    words = shlex.split(line)
    env = {}
    while words and re.fullmatch(r"[A-Za-z_]\w*=.*", words[0]):
        name, _, value = words.pop(0).partition("=")
        env[name] = value
    return env, words


def pipeline_examples() -> list[tuple[dict[str, str], list[str]]]:
    examples = []
    for line in shell_lines():
        env, words = split(line)
        if words and Path(words[0]).name == "mnist-pipeline":
            examples.append((env, words[1:]))
    return examples


def resolve(args: list[str]) -> tuple[click.Command, list[str], list[str]]:
    """The (sub)command the words name, its name path and the remaining arguments."""
    command: click.Command = cli
    names: list[str] = []
    while isinstance(command, click.Group) and args and not args[0].startswith("-"):
        sub = command.get_command(click.Context(command), args[0])
        assert sub is not None, f"no command {' '.join([*names, args[0]])!r}"
        command, names, args = sub, [*names, args[0]], args[1:]
    return command, names, args


def test_the_readme_has_pipeline_examples() -> None:
    assert pipeline_examples()


@pytest.mark.parametrize(
    ("env", "args"), pipeline_examples(), ids=[" ".join(a) for _, a in pipeline_examples()]
)
def test_readme_example_parses(
    env: dict[str, str], args: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    command, names, rest = resolve(args)
    if rest == ["--help"]:
        return
    # The variables the line sets are ones the command reads, under the one prefix.
    envvars = {
        var
        for param in command.params
        for var in ([param.envvar] if isinstance(param.envvar, str) else param.envvar or [])
    }
    for name in env:
        assert name.startswith("MNIST_PIPELINE_"), name
        assert name in envvars, f"{' '.join(names)} reads no {name}"
    # Parsing checks every option name and value type, the variables' values included,
    # without running the stage.
    command.make_context(" ".join(names), rest)


def test_readme_make_targets_exist() -> None:
    makefile = (REPO / "Makefile").read_text()
    targets = set(re.findall(r"^([\w-]+):", makefile, re.M))
    named = set()
    for line in shell_lines():
        _, words = split(line)
        if words and words[0] == "make":
            named |= {w for w in words[1:] if "=" not in w and not w.startswith("-")}
    assert named and named <= targets, named - targets


def test_readme_make_variables_exist() -> None:
    """`make TARGET VAR=value` and `VAR=value make ...` name variables the Makefile uses."""
    makefile = (REPO / "Makefile").read_text()
    for line in shell_lines():
        env, words = split(line)
        if not words or words[0] != "make":
            continue
        given = set(env) | {w.partition("=")[0] for w in words[1:] if "=" in w}
        for name in given:
            assert re.search(rf"\$[({{]{name}[)}}]|\b{name}\b", makefile), name
