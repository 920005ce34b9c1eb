"""docs/BENCHMARKS.md is what benchmarks/report.py renders from docs/benchmarks/results.json:
a change to the report's code, its template or its verdicts that is not rendered fails here."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
RESULTS = REPO / "docs" / "benchmarks" / "results.json"


def test_benchmarks_md_is_rendered_from_results_json() -> None:
    result = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "report.py"), str(RESULTS), "--check"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), str(REPO / "tests")])},
    )
    assert result.returncode == 0, result.stdout + result.stderr
