"""A local Prometheus for the tests and benchmarks, and the Grafana dashboard's queries.

The dashboard JSON in the Helm chart is the one source of the panel queries: the chart
ships it to Grafana, the tests evaluate every query against a live Prometheus, and the
benchmark suite draws the same panels from the same queries.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from harness import REPO
from harness.ports import answers
from mnist_pipeline.processes import ManagedProcess

DASHBOARD = REPO / "deploy/helm/mnist-pipeline/dashboards/triton.json"


def locate(binary: str) -> Path:
    """`prometheus` or `promtool`, on PATH or in /usr/bin (Debian's package)."""
    found = shutil.which(binary) or shutil.which(binary, path="/usr/bin")
    if not found:
        raise FileNotFoundError(
            f"{binary} not found on PATH or in /usr/bin: install the Debian package "
            "`prometheus` (apt-get install prometheus; .ci/run does)"
        )
    return Path(found)


@dataclass(frozen=True)
class Panel:
    title: str
    unit: str
    targets: list[tuple[str, str]]  # (legend format, PromQL with Grafana variables)


def dashboard_panels(path: Path = DASHBOARD) -> list[Panel]:
    dashboard = json.loads(path.read_text())
    return [
        Panel(
            p["title"],
            p["fieldConfig"]["defaults"]["custom"]["axisLabel"],
            [(t.get("legendFormat", ""), t["expr"]) for t in p["targets"]],
        )
        for p in dashboard["panels"]
    ]


def expand(expr: str, variables: dict[str, str]) -> str:
    """Replace Grafana's $name and ${name} variables as Grafana would before querying."""

    def value(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        if name not in variables:
            raise KeyError(f"no value for ${name} in {expr}")
        return variables[name]

    return re.sub(r"\$\{(\w+)\}|\$(\w+)", value, expr)


class LocalPrometheus(ManagedProcess):
    """A prometheus process on a loopback port, with its own config and data folder.

    with LocalPrometheus(workdir, port, [scrape_config]) as prom:
        prom.query("up")
    """

    name = "prometheus"
    grace = 30.0
    ready_timeout = 60.0

    def __init__(
        self,
        workdir: Path | None,
        port: int,
        scrape_configs: list[dict[str, Any]],
        evaluation_interval: str = "1s",
    ) -> None:
        self.workdir = workdir or Path(tempfile.mkdtemp(prefix="mnist-prometheus-"))
        super().__init__(log_path=self.workdir / "prometheus.log", cwd=self.workdir)
        self.port = port
        self.config = {
            "global": {"evaluation_interval": evaluation_interval},
            "scrape_configs": scrape_configs,
        }

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        binary = locate("prometheus")
        self.workdir.mkdir(parents=True, exist_ok=True)
        config = self.workdir / "prometheus.yml"
        config.write_text(yaml.safe_dump(self.config, sort_keys=False))
        self.command = [
            str(binary),
            f"--config.file={config}",
            f"--storage.tsdb.path={self.workdir / 'data'}",
            f"--web.listen-address=127.0.0.1:{self.port}",
            "--log.level=warn",
        ]
        super().start()

    def ready(self) -> bool:
        return answers(f"{self.url}/-/ready")

    def _api(self, path: str, params: dict[str, str]) -> Any:
        url = f"{self.url}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        try:
            with urllib.request.urlopen(url, timeout=30) as response:
                body = json.load(response)
        except urllib.error.HTTPError as e:
            raise ValueError(f"{params.get('query')}: {e.read().decode()}") from e
        return body["data"]

    def query(self, expr: str, at: float | None = None) -> list[dict[str, Any]]:
        """An instant query's vector: [{"metric": {...}, "value": [t, "v"]}, ...]."""
        params = {"query": expr, **({"time": f"{at:.3f}"} if at is not None else {})}
        data = self._api("query", params)
        assert data["resultType"] == "vector", data
        return list(data["result"])

    def query_range(self, expr: str, start: float, end: float, step: float) -> list[dict[str, Any]]:
        """A range query's matrix: [{"metric": {...}, "values": [[t, "v"], ...]}, ...]."""
        params = {"query": expr, "start": f"{start:.3f}", "end": f"{end:.3f}", "step": f"{step}"}
        return list(self._api("query_range", params)["result"])

    def targets_up(self) -> list[dict[str, Any]]:
        return [t for t in self._api("targets", {})["activeTargets"] if t["health"] == "up"]


def values(result: list[dict[str, Any]]) -> list[float]:
    """The finite numbers of an instant query's result (NaN: a summary with no samples)."""
    numbers = [float(r["value"][1]) for r in result]
    return [v for v in numbers if v == v and abs(v) != float("inf")]
