"""The chart's README.md and values.yaml's `## @param` annotations it is written from."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

import chart_readme
from harness.chart import CHART


def test_every_value_has_a_param() -> None:
    assert chart_readme.undocumented((CHART / "values.yaml").read_text()) == []


def test_the_readme_is_what_the_annotations_give() -> None:
    written = (CHART / "README.md").read_text()
    assert written == chart_readme.readme(CHART), "stale: run scripts/chart_readme.py"
    assert "helm install" in written and "../../../docs/KUBERNETES.md" in written
    assert "| `training.epochs` |" in written and "| `images.pipeline.tag` |" in written


def test_the_check_fails_on_a_stale_readme_or_an_undocumented_value(tmp_path: Path) -> None:
    chart = tmp_path / "mnist-pipeline"
    shutil.copytree(CHART, chart)
    assert chart_readme.main(["--check", str(chart)]) == 0
    values = chart / "values.yaml"
    values.write_text(values.read_text().replace("  epochs: null\n", "  epochs: 2\n"))
    assert chart_readme.main(["--check", str(chart)]) == 1  # the default changed
    assert chart_readme.main([str(chart)]) == 0
    assert chart_readme.main(["--check", str(chart)]) == 0
    values.write_text(values.read_text() + "newKnob: 1\n")
    assert chart_readme.undocumented(values.read_text()) == ["newKnob"]
    assert chart_readme.main(["--check", str(chart)]) == 1


@pytest.mark.parametrize(
    ("annotation", "reason"),
    [
        ("## @param training.epoch Misspelt\n", "no such value"),
        ("## @param training.epochs Twice\n", "given twice"),
    ],
)
def test_annotations_must_name_values_once(annotation: str, reason: str) -> None:
    text = (CHART / "values.yaml").read_text() + annotation
    with pytest.raises(chart_readme.AnnotationError, match=reason):
        chart_readme.sections(text)


def test_a_param_on_a_mapping_documents_what_it_holds() -> None:
    text = "## @section S\n## @param resources Requests and limits\n"
    text += "resources:\n  limits:\n    cpu: 1\n"
    assert chart_readme.undocumented(text) == []
    (section,) = chart_readme.sections(text)
    assert section.params[0].value == {"limits": {"cpu": 1}}
