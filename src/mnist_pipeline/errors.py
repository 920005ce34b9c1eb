"""The two ways a stage fails, each with its exit code (cli.stage maps them)."""

from __future__ import annotations


class UsageError(Exception):
    """Bad input: a wrong file, a bad option, a foreign checkpoint. Exit code 2."""


class PipelineFailure(Exception):
    """The stage could not finish for a reason other than its input. Exit code 1."""


def one_line(error: BaseException) -> str:
    return " ".join(str(error).split())
