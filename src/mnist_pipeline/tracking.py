"""MLflow, spoken over its REST API: a training run mirrored as an MLflow run.

The MLflow client library pins protobuf and numpy majors the pipeline's own packages
cannot share, and everything used here is a handful of JSON calls; so urllib it is.
Credentials follow MLflow's conventions: MLFLOW_TRACKING_TOKEN (a bearer token) or
MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (basic auth).

Tracking is optional and never the reason a run fails: an unreachable or refusing server is
said once, and the run goes on without it (its metrics.json and train.log stay complete).
"""

from __future__ import annotations

import base64
import json
import logging
import math
import os
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mnist_pipeline import settings
from mnist_pipeline.errors import one_line
from mnist_pipeline.storage import RunStatus

log = logging.getLogger(__name__)

RUN_TAG = "mnist_pipeline.run_id"  # the pipeline's run id on the MLflow run that mirrors it
TIMEOUT = 10.0
# metrics.json's status -> the MLflow run's; RETRYING stays RUNNING (another attempt follows)
ENDED = {RunStatus.COMPLETE: "FINISHED", RunStatus.FAILED: "FAILED",
         RunStatus.INTERRUPTED: "KILLED"}  # fmt: skip
EPOCH_METRICS = ("train_loss", "train_accuracy", "test_loss", "test_accuracy", "images_per_s",
                 "lr_end", "train_seconds")  # fmt: skip


class TrackingError(Exception):
    """The server could not be reached, or refused a call: the message says which."""


class NotFound(TrackingError):
    pass


@dataclass(frozen=True)
class Tracking(settings.Settings):
    """Where runs are tracked: --tracking-uri (None: nowhere) and --experiment."""

    uri: str | None = settings.TRACKING_URI.field()
    experiment: str = settings.EXPERIMENT.field()


UNTRACKED = Tracking()


class Mlflow:
    """The calls the pipeline makes to one MLflow tracking server."""

    def __init__(self, uri: str, timeout: float = TIMEOUT) -> None:
        self.uri, self.timeout = uri.rstrip("/"), timeout

    def call(
        self, endpoint: str, body: dict[str, Any] | None = None, method: str = "", **query: str
    ) -> Any:
        """POST `body` (or GET `query`) to /api/2.0/mlflow/ENDPOINT; the JSON it answers."""
        url = f"{self.uri}/api/2.0/mlflow/{endpoint}"
        if query:
            url += "?" + urllib.parse.urlencode(query)
        data = None if body is None else json.dumps(body).encode()
        method = method or ("GET" if data is None else "POST")
        return json.loads(self._send(url, data, method) or b"{}")

    def upload(self, artifact_uri: str, name: str, content: bytes) -> None:
        """Store `content` as artifact `name` of a run whose artifacts the server proxies."""
        scheme, _, path = artifact_uri.partition(":")
        if scheme != "mlflow-artifacts":
            raise TrackingError(
                f"{self.uri} keeps artifacts at {artifact_uri}, which it does not serve: "
                "start it with --artifacts-destination (served by default)"
            )
        key = urllib.parse.quote(f"{path.lstrip('/')}/{name}")
        self._send(f"{self.uri}/api/2.0/mlflow-artifacts/artifacts/{key}", content, "PUT")

    def _send(self, url: str, data: bytes | None, method: str) -> bytes:
        request = urllib.request.Request(url, data=data, method=method, headers=auth_headers())
        if data is not None and method != "PUT":
            request.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return bytes(response.read())
        except urllib.error.HTTPError as e:
            raise refusal(self.uri, e) from None
        except (OSError, ValueError) as e:  # refused, unresolvable, timed out, bad URL
            raise TrackingError(f"MLflow at {self.uri} is unreachable: {one_line(e)}") from None

    def experiment_id(self, name: str) -> str:
        try:
            found = self.call("experiments/get-by-name", experiment_name=name)
            return str(found["experiment"]["experiment_id"])
        except NotFound:
            return str(self.call("experiments/create", {"name": name})["experiment_id"])

    def run_of(self, experiment: str, run_id: str) -> dict[str, Any]:
        """The MLflow run mirroring pipeline run `run_id` (created on first use): its info
        and data, found by tag so that a resumed or re-exported run finds it again."""
        experiment_id = self.experiment_id(experiment)
        found = self.call("runs/search", {
            "experiment_ids": [experiment_id], "max_results": 1,
            "filter": f"tags.`{RUN_TAG}` = '{run_id}'",
        }).get("runs", [])  # fmt: skip
        if found:
            return dict(found[0])
        tags = [{"key": RUN_TAG, "value": run_id}, {"key": "mlflow.runName", "value": run_id}]
        body = {"experiment_id": experiment_id, "run_name": run_id, "tags": tags,
                "start_time": now_ms()}  # fmt: skip
        return dict(self.call("runs/create", body)["run"])


def auth_headers() -> dict[str, str]:
    token = os.environ.get("MLFLOW_TRACKING_TOKEN")
    if token:
        return {"Authorization": f"Bearer {token}"}
    user, password = (os.environ.get(f"MLFLOW_TRACKING_{k}") for k in ("USERNAME", "PASSWORD"))
    if user and password:
        pair = base64.b64encode(f"{user}:{password}".encode()).decode()
        return {"Authorization": f"Basic {pair}"}
    return {}


def refusal(uri: str, e: urllib.error.HTTPError) -> TrackingError:
    try:
        answer = json.loads(e.read() or b"{}")
    except ValueError:
        answer = {}
    message = str(answer.get("message") or e.reason).strip().splitlines()[0]
    error = NotFound if answer.get("error_code") == "RESOURCE_DOES_NOT_EXIST" else TrackingError
    return error(f"MLflow at {uri} refused the call (HTTP {e.code}): {message}")


def now_ms() -> int:
    return int(time.time() * 1000)


class Tracker:
    """Mirrors one training run's metrics.json into its MLflow run each time it is written
    (settings as params, each epoch's record and each evaluation as metrics), and once the
    attempt is over (`close`) its outcome as the run's status, with train.log and
    metrics.json as artifacts. Without a URI it does nothing; after a failed call it says
    so once and does nothing more."""

    def __init__(self, tracking: Tracking, run_id: str, out: Path) -> None:
        self.tracking, self.run_id, self.out = tracking, run_id, out
        self.client = Mlflow(tracking.uri) if tracking.uri else None  # None: off, or down
        self.run: dict[str, Any] = {}
        self.sent = {"epoch": 0, "eval_step": -1}
        self.status = RunStatus.RUNNING

    def mirror(self, metrics: dict[str, Any]) -> None:
        self.status = metrics["status"]
        self._safely(self._mirror, metrics)

    def close(self) -> None:
        """End the MLflow run as metrics.json last said, once train.log is complete."""
        if self.run and self.status in ENDED:
            self._safely(self._end)

    def _safely(self, call: Any, *args: Any) -> None:
        if self.client is None:
            return
        try:
            call(self.client, *args)
        except TrackingError as e:
            log.warning("%s: training goes on without tracking", e)
            self.client = None

    def _mirror(self, client: Mlflow, metrics: dict[str, Any]) -> None:
        if not self.run:
            self.run = client.run_of(self.tracking.experiment, self.run_id)
            self.sent = already_logged(self.run)
            # MLflow refuses to change a param: a run resumed with another world size keeps
            # the first one's.
            logged = {p["key"] for p in self.run.get("data", {}).get("params", [])}
            params = {**metrics["hyperparameters"], "world_size": metrics["world_size"]}
            self.log(client, params={k: v for k, v in params.items() if k not in logged})
            log.info("tracking run %s as MLflow run %s at %s", self.run_id,
                     self.run["info"]["run_id"], client.uri)  # fmt: skip
        self.log(client, values=self.new_values(metrics))
        if "error" in metrics:
            self.log(client, tags={"error": str(metrics["error"])[:5000]})

    def _end(self, client: Mlflow) -> None:
        for name in ("train.log", "metrics.json"):
            path = self.out / name
            if path.is_file():
                client.upload(self.run["info"]["artifact_uri"], name, path.read_bytes())
        ended = {"status": ENDED[self.status], "end_time": now_ms()}
        client.call("runs/update", {"run_id": self.run["info"]["run_id"], **ended})

    def new_values(self, metrics: dict[str, Any]) -> list[tuple[str, float, int]]:
        """(metric, value, step) not logged yet: epochs by epoch, evaluations by step."""
        values = []
        for record in metrics["history"]:
            if record["epoch"] > self.sent["epoch"]:
                values += [(k, record[k], record["epoch"]) for k in EPOCH_METRICS if k in record]
                self.sent["epoch"] = record["epoch"]
        for record in metrics["evals"]:
            if record["step"] > self.sent["eval_step"]:
                values.append(("eval_test_accuracy", record["test_accuracy"], record["step"]))
                self.sent["eval_step"] = record["step"]
        if metrics["status"] == RunStatus.COMPLETE:
            values += [("final_test_accuracy", metrics["test_accuracy"], 0),
                       ("total_train_seconds", metrics["train_seconds"], 0)]  # fmt: skip
        return values

    def log(
        self,
        client: Mlflow,
        values: Sequence[tuple[str, float, int]] = (),
        params: dict[str, Any] | None = None,
        tags: dict[str, str] | None = None,
    ) -> None:
        body: dict[str, Any] = {"run_id": self.run["info"]["run_id"]}
        stamp = now_ms()
        body["metrics"] = [{"key": k, "value": float(v), "step": int(s), "timestamp": stamp}
                           for k, v, s in values if math.isfinite(v)]  # fmt: skip
        body["params"] = [{"key": k, "value": str(v)} for k, v in (params or {}).items()]
        body["tags"] = [{"key": k, "value": v} for k, v in (tags or {}).items()]
        if body["metrics"] or body["params"] or body["tags"]:
            client.call("runs/log-batch", body)


def already_logged(run: dict[str, Any]) -> dict[str, int]:
    """Where an earlier attempt of this run left off (a resumed run logs no epoch twice)."""
    latest = {m["key"]: m for m in run.get("data", {}).get("metrics", [])}
    return {
        "epoch": int(latest["test_accuracy"]["step"]) if "test_accuracy" in latest else 0,
        "eval_step": int(latest["eval_test_accuracy"]["step"])
        if "eval_test_accuracy" in latest else -1,
    }  # fmt: skip
