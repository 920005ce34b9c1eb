"""A real MLflow tracking server (`mlflow server`, sqlite backend, artifacts in a folder)
on a free loopback port, and the few reads the tests check it with.

MLflow lives in its own environment (.venv-mlflow, `make test` installs it): its protobuf
and numpy majors clash with the pipeline's. MLFLOW names its binary."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from harness import REPO
from harness.ports import free_ports


def mlflow_binary() -> Path:
    binary = Path(os.environ.get("MLFLOW") or REPO / ".venv-mlflow/bin/mlflow")
    if not binary.is_file():
        pytest.fail(f"no mlflow at {binary}: run `make test` (it installs .venv-mlflow)")
    return binary


class MlflowServer:
    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        (self.port,) = free_ports(1)
        self.uri = f"http://127.0.0.1:{self.port}"
        self.log = workdir / "mlflow.log"

    def __enter__(self) -> MlflowServer:
        self.workdir.mkdir(parents=True, exist_ok=True)
        command = [
            str(mlflow_binary()), "server", "--host", "127.0.0.1", "--port", str(self.port),
            "--workers", "1",
            "--backend-store-uri", f"sqlite:///{self.workdir / 'mlflow.db'}",
            "--artifacts-destination", str(self.workdir / "artifacts"),
        ]  # fmt: skip
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                            cwd=self.workdir, start_new_session=True)  # fmt: skip
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"mlflow server exited {self.process.returncode}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as response:
                    if response.status == 200:
                        return self
            except OSError:
                time.sleep(0.5)
        self.__exit__()
        pytest.fail(f"mlflow server not healthy within 120 s:\n{self.log_tail()}")

    def __exit__(self, *exc: object) -> None:
        # Its store dies with the test's folder: nothing to shut down gracefully for (a
        # SIGTERM took its workers 7 s).
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:] if self.log.is_file() else ""

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
