"""docs/BENCHMARKS.md's generated regions are what benchmarks/report.py renders from
docs/benchmarks/results.json: a change to the report's code or the targets that is not
rendered fails here, and so does a region edited by hand."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DOCS = REPO / "docs"


def check(docs: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "report.py"), str(docs), "--check"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), str(REPO / "tests")])},
    )


def test_benchmarks_md_is_rendered_from_results_json() -> None:
    result = check(DOCS)
    assert result.returncode == 0, result.stdout + result.stderr


def test_a_region_edited_by_hand_is_stale(tmp_path: Path) -> None:
    (tmp_path / "benchmarks").mkdir()
    shutil.copy(DOCS / "benchmarks" / "results.json", tmp_path / "benchmarks")
    text = (DOCS / "BENCHMARKS.md").read_text()
    edited = text.replace("| default-seed0 |", "| default-seed0 (edited) |", 1)
    assert edited != text
    (tmp_path / "BENCHMARKS.md").write_text(edited)
    result = check(tmp_path)
    assert result.returncode == 1 and "is stale" in result.stdout, result.stdout + result.stderr
