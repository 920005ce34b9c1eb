"""docs/CLI.md is every command's --help as the command prints it now."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_the_cli_reference_matches_help() -> None:
    script = REPO / "scripts" / "cli_reference.py"
    result = subprocess.run(
        [sys.executable, str(script), "--check"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr


def test_the_cli_reference_has_every_command() -> None:
    from mnist_pipeline.cli import cli

    text = (REPO / "docs" / "CLI.md").read_text()
    for name in cli.commands:
        assert f"## mnist-pipeline {name}\n" in text, name
    assert "## mnist-pipeline wait serving\n" in text
