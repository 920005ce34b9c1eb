"""A real MLflow tracking server (`mlflow server`, sqlite backend, artifacts in a folder)
on a free loopback port, and the few reads the tests check it with.

MLflow lives in its own environment (.venv-mlflow, `make test` installs it): its protobuf
and numpy majors clash with the pipeline's. MLFLOW names its binary."""

from __future__ import annotations

import json
import os
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from harness import REPO
from harness.ports import answers, free_ports
from mnist_pipeline.processes import ManagedProcess


def mlflow_binary() -> Path:
    binary = Path(os.environ.get("MLFLOW") or REPO / ".venv-mlflow/bin/mlflow")
    if not binary.is_file():
        pytest.fail(f"no mlflow at {binary}: run `make test` (it installs .venv-mlflow)")
    return binary


class MlflowServer(ManagedProcess):
    """with MlflowServer(workdir) as server: ... server.uri ...

    Its store dies with the test's folder: it is killed, with nothing to shut down
    gracefully for (a SIGTERM took its workers 7 s)."""

    name = "mlflow server"

    def __init__(self, workdir: Path) -> None:
        super().__init__(log_path=workdir / "mlflow.log", cwd=workdir)
        self.workdir = workdir
        (self.port,) = free_ports(1)
        self.uri = f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.command = [
            str(mlflow_binary()), "server", "--host", "127.0.0.1", "--port", str(self.port),
            "--workers", "1",
            "--backend-store-uri", f"sqlite:///{self.workdir / 'mlflow.db'}",
            "--artifacts-destination", str(self.workdir / "artifacts"),
        ]  # fmt: skip
        super().start()

    def ready(self) -> bool:
        return answers(f"{self.uri}/health")

    # Reads, as any MLflow user would make them -----------------------------------------

    def get(self, endpoint: str, **query: str) -> Any:
        url = f"{self.uri}/api/2.0/mlflow/{endpoint}?{urllib.parse.urlencode(query)}"
        with urllib.request.urlopen(url, timeout=10) as response:
            return json.loads(response.read())

    def post(self, endpoint: str, body: dict[str, Any]) -> Any:
        request = urllib.request.Request(
            f"{self.uri}/api/2.0/mlflow/{endpoint}", data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )  # fmt: skip
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())

    def runs(self, experiment: str) -> list[dict[str, Any]]:
        found = self.get("experiments/get-by-name", experiment_name=experiment)
        experiment_id = found["experiment"]["experiment_id"]
        return list(self.post("runs/search", {"experiment_ids": [experiment_id]}).get("runs", []))

    def history(self, run_id: str, metric: str) -> list[tuple[int, float]]:
        found = self.get("metrics/get-history", run_id=run_id, metric_key=metric)["metrics"]
        return sorted((m["step"], m["value"]) for m in found)

    def artifact(self, artifact_uri: str, name: str) -> bytes:
        path = artifact_uri.partition(":")[2].lstrip("/")
        url = f"{self.uri}/api/2.0/mlflow-artifacts/artifacts/{path}/{name}"
        with urllib.request.urlopen(url, timeout=30) as response:
            return bytes(response.read())

    def model_versions(self, name: str) -> list[dict[str, Any]]:
        found = self.get("model-versions/search", filter=f"name = '{name}'")
        versions = found.get("model_versions", [])
        for mv in versions:
            mv["tags"] = {t["key"]: t["value"] for t in mv.get("tags", [])}
        return sorted(versions, key=lambda mv: int(mv["version"]))

    def aliases(self, name: str) -> dict[str, str]:
        model = self.get("registered-models/get", name=name)["registered_model"]
        return {a["alias"]: a["version"] for a in model.get("aliases", [])}
