"""Just enough of the Kubernetes API, from a pod with a service account token: the waits
read a Job's status (get on batch/v1 jobs); a canary analysis restarts Deployments (patch
on apps/v1 deployments), as `kubectl rollout restart` does. Standard library only: the lean
client image runs these."""

from __future__ import annotations

import json
import logging
import os
import ssl
import urllib.error
import urllib.request
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from mnist_pipeline.errors import PipelineFailure, one_line

log = logging.getLogger(__name__)

SERVICE_ACCOUNT_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
# What `kubectl rollout restart` sets: a changed pod template rolls the Deployment.
RESTARTED_AT = "kubectl.kubernetes.io/restartedAt"


@dataclass(frozen=True)
class JobState:
    phase: str  # "active", "complete", "failed" or "absent" (deleted, or never created)
    detail: str = ""


class KubeApi:
    def __init__(
        self,
        base_url: str,
        namespace: str,
        token_file: Path | None = None,
        ca_file: Path | None = None,
    ) -> None:
        self.base_url, self.namespace = base_url.rstrip("/"), namespace
        self.token_file = token_file
        self.context = ssl.create_default_context(cafile=str(ca_file)) if ca_file else None
        self.warned = False
        # Why the last request failed; None once it answers. Progress lines repeat it: under
        # a default-deny egress policy the API is unreachable and fail-fast is lost.
        self.error: str | None = None

    @classmethod
    def in_cluster(
        cls, namespace: str | None, sa_dir: Path = SERVICE_ACCOUNT_DIR
    ) -> KubeApi | None:
        """The API as seen from a pod given a token; None where the pod has none."""
        host = os.environ.get("KUBERNETES_SERVICE_HOST")
        token = sa_dir / "token"
        if not host or not token.is_file():
            return None
        if not namespace:
            ns_file = sa_dir / "namespace"
            namespace = ns_file.read_text().strip() if ns_file.is_file() else None
        if not namespace:
            return None
        port = os.environ.get("KUBERNETES_SERVICE_PORT", "443")
        if ":" in host:  # an IPv6 address
            host = f"[{host}]"
        ca = sa_dir / "ca.crt"
        return cls(f"https://{host}:{port}", namespace, token, ca if ca.is_file() else None)

    def _call(self, path: str, method: str = "GET", body: Any = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            f"{self.base_url}{path}", data=data, method=method,
            headers={"Accept": "application/json",
                     "Content-Type": "application/strategic-merge-patch+json"},
        )  # fmt: skip
        if self.token_file:
            # Re-read every time: the kubelet rotates projected tokens.
            request.add_header("Authorization", f"Bearer {self.token_file.read_text().strip()}")
        with urllib.request.urlopen(request, timeout=10, context=self.context) as response:
            return json.load(response)

    def job_state(self, name: str) -> JobState | None:
        """The Job's state, or None when the API cannot tell (then only artifacts count)."""
        try:
            job = self._call(f"/apis/batch/v1/namespaces/{self.namespace}/jobs/{name}")
        except urllib.error.HTTPError as e:
            if e.code == 404:
                self.error = None
                return JobState("absent")
            self._warn(f"reading Job {name}: HTTP {e.code} {e.reason}")
            return None
        except (OSError, ValueError) as e:
            self._warn(f"reading Job {name}: {e}")
            return None
        self.error = None
        for condition in job.get("status", {}).get("conditions") or []:
            if condition.get("status") != "True":
                continue
            detail = f"{condition.get('reason', '')}: {condition.get('message', '')}".strip(": ")
            if condition.get("type") in ("Failed", "FailureTarget"):
                return JobState("failed", detail)
            if condition.get("type") == "Complete":
                return JobState("complete", detail)
        return JobState("active")

    def restart(self, deployment: str, annotations: dict[str, str]) -> None:
        """Roll `deployment`'s pods (new ones start before old ones stop, as its strategy
        says), its pod template annotated with `annotations` and the time."""
        stamp = {RESTARTED_AT: datetime.now(UTC).isoformat(timespec="seconds"), **annotations}
        patch = {"spec": {"template": {"metadata": {"annotations": stamp}}}}
        path = f"/apis/apps/v1/namespaces/{self.namespace}/deployments/{deployment}"
        try:
            self._call(path, "PATCH", patch)
        except urllib.error.HTTPError as e:
            raise PipelineFailure(
                f"restarting Deployment {deployment} in {self.namespace}: HTTP {e.code} "
                f"{e.reason} (the service account needs patch on it)"
            ) from None
        except (OSError, ValueError) as e:
            raise PipelineFailure(f"restarting Deployment {deployment}: {one_line(e)}") from None
        log.info("restarted Deployment %s: %s", deployment, annotations)

    def _warn(self, message: str) -> None:
        self.error = message
        if not self.warned:
            log.warning("%s; relying on the artifacts on storage alone", message)
            self.warned = True
