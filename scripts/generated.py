"""What the generators (chart_readme, chart_settings, cli_reference) share: write the file
they generate, or, with --check, write nothing and fail when the file is stale."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

CHART = Path(__file__).resolve().parents[1] / "deploy" / "helm" / "mnist-pipeline"


def chart_arguments(doc: str, argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("chart", nargs="?", type=Path, default=CHART)
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 if stale")
    return parser.parse_args(argv)


def write_or_check(target: Path, text: str, check: bool, generator: str) -> int:
    if not check:
        target.write_text(text)
        return 0
    if target.is_file() and target.read_text() == text:
        return 0
    print(f"{target} is stale: run python scripts/{generator}", file=sys.stderr)
    return 1
