"""The test harness: what the tests and the benchmarks share, never shipped in the package.

Importable as `harness` from tests/: pytest puts tests/ on its path (pythonpath in
pyproject.toml), the Makefile's benchmark targets and the tests' child Pythons get it
through PYTHONPATH.
"""

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
