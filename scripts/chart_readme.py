"""Write the chart's README.md from the `## @param` annotations of its values.yaml.

The convention is bitnami's (readme-generator-for-helm): `## @section Title` starts a
table, `## ` lines right after it describe the section, and `## @param path description`
documents the value at `path`. A @param on a mapping documents all of it (a Kubernetes
object passed through as it is, such as resources or a probe); every other value needs
its own. Run it after editing values.yaml; `--check` only says whether README.md is stale
or a value undocumented, for tests and CI.

    python scripts/chart_readme.py [--check] [CHART_DIR]
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from generated import CHART, chart_arguments, write_or_check

SECTION = re.compile(r"^\s*## @section\s+(?P<title>.+?)\s*$")
PARAM = re.compile(r"^\s*## @param\s+(?P<path>\S+)\s+(?P<description>.+?)\s*$")
PROSE = re.compile(r"^\s*##(?: (?P<text>(?!@).*))?$")


@dataclass
class Param:
    path: str
    description: str
    value: Any


@dataclass
class Section:
    title: str
    description: list[str] = field(default_factory=list)
    params: list[Param] = field(default_factory=list)


class AnnotationError(ValueError):
    """values.yaml's annotations do not match its values."""


def lookup(values: Any, path: str) -> Any:
    node = values
    for key in path.split("."):
        if not isinstance(node, dict) or key not in node:
            raise AnnotationError(f"@param {path}: values.yaml has no such value")
        node = node[key]
    return node


def sections(values_text: str) -> list[Section]:
    """The annotated sections of values.yaml, in file order, with each value's default."""
    values = yaml.safe_load(values_text)
    found: list[Section] = []
    seen: set[str] = set()
    describing = False  # the `## ` lines right after a @section describe it
    for line in values_text.splitlines():
        if m := SECTION.match(line):
            found.append(Section(m["title"]))
            describing = True
        elif m := PARAM.match(line):
            describing = False
            if not found:
                raise AnnotationError(f"@param {m['path']} comes before any @section")
            if m["path"] in seen:
                raise AnnotationError(f"@param {m['path']} is given twice")
            seen.add(m["path"])
            found[-1].params.append(Param(m["path"], m["description"], lookup(values, m["path"])))
        elif describing and (m := PROSE.match(line)):
            found[-1].description.append(m["text"] or "")
        elif line.strip():
            describing = False
    return found


def leaves(values: Any, prefix: str = "") -> list[str]:
    """Paths of every value that is not a non-empty mapping."""
    if not isinstance(values, dict) or not values:
        return [prefix]
    return [leaf for key, value in values.items() for leaf in leaves(value, join(prefix, key))]


def join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def undocumented(values_text: str) -> list[str]:
    """Values that neither have a @param nor lie inside a mapping that has one."""
    documented = {p.path for s in sections(values_text) for p in s.params}

    def covered(path: str) -> bool:
        parts = path.split(".")
        return any(".".join(parts[:n]) in documented for n in range(1, len(parts) + 1))

    return [leaf for leaf in leaves(yaml.safe_load(values_text)) if not covered(leaf)]


def cell(text: str) -> str:
    """Text for a table cell: | would end the cell, and <name> outside code would be taken
    for an HTML tag and vanish."""
    parts = re.split(r"(`[^`]*`)", text.replace("|", "\\|"))
    return "".join(
        part if part.startswith("`") else part.replace("<", "&lt;").replace(">", "&gt;")
        for part in parts
    )


def shown(value: Any) -> str:
    """A default as the table shows it: strings as they are, the rest as JSON."""
    text = value if isinstance(value, str) and value else json.dumps(value, ensure_ascii=False)
    return "`" + text.replace("|", "\\|") + "`"


def readme(chart: Path = CHART) -> str:
    meta = yaml.safe_load((chart / "Chart.yaml").read_text())
    values_text = (chart / "values.yaml").read_text()
    out = [
        f"# {meta['name']}",
        "",
        "<!-- Written by scripts/chart_readme.py from values.yaml's @param annotations: edit those"
        " and run it again. -->",
        "",
        meta["description"].strip(),
        "",
        f"Chart {meta['version']}, application {meta['appVersion']}, Kubernetes"
        f" {meta['kubeVersion']}.",
        "",
        "## Install",
        "",
        "```sh",
        f"make push-images REGISTRY=registry.example.com/ml TAG={meta['appVersion']}",
        f"helm install mnist deploy/helm/{meta['name']} -n ml --create-namespace \\",
        "  --set images.registry=registry.example.com/ml",
        "helm test mnist -n ml",
        "```",
        "",
        "Installing on EKS, GKE, OpenShift or kind, and operating a release (upgrades, results,"
        " canary releases, scaling, monitoring, GitOps):"
        " [docs/KUBERNETES.md](../../../docs/KUBERNETES.md). Why the chart is shaped so, and how"
        " it is tested: [docs/CHART-DESIGN.md](../../../docs/CHART-DESIGN.md). The tables below"
        " are the one list of the chart's values.",
        "",
        "## Parameters",
    ]
    for section in sections(values_text):
        out += ["", f"### {section.title}", ""]
        description = " ".join(line for line in section.description if line).strip()
        if description:
            out += [description, ""]
        out += ["| Name | Description | Value |", "| --- | --- | --- |"]
        out += [
            f"| `{p.path}` | {cell(p.description)} | {shown(p.value)} |" for p in section.params
        ]
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = chart_arguments(__doc__, argv)
    try:
        missing = undocumented((args.chart / "values.yaml").read_text())
        text = readme(args.chart)
    except AnnotationError as e:
        print(f"values.yaml: {e}", file=sys.stderr)
        return 1
    if missing:
        print(f"values.yaml: no @param for {', '.join(missing)}", file=sys.stderr)
        return 1
    return write_or_check(args.chart / "README.md", text, args.check, "chart_readme.py")


if __name__ == "__main__":
    sys.exit(main())
