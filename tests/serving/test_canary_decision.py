"""canary.decide: every rule on its own and together, without servers; and how a decision
is applied to the Deployments."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import pytest

from mnist_pipeline.canary import Analysis, Decision, Measured, Thresholds, decide, restart_replicas
from mnist_pipeline.errors import PipelineFailure
from mnist_pipeline.kube import KubeApi
from mnist_pipeline.repository import CHALLENGER, ROLLED_BACK, open_repository
from mnist_pipeline.storage import DEFAULT_MODEL_NAME as MODEL
from mnist_pipeline.storage import ModelRepository
from mnist_pipeline.tritonconfig import TritonConfig, render_config

LIMITS = Thresholds(max_p99_ratio=1.5, max_error_rate=0.01, max_accuracy_drop=0.005)
CHAMPION = Measured(1, requests=1000, failures=0, p99_ms=4.0, accuracy=0.95, images=2000)


def challenger(**changed: object) -> Measured:
    values = {"requests": 500, "failures": 0, "p99_ms": 5.0, "accuracy": 0.96, "images": 2000}
    return Measured(2, **{**values, **changed})  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "name,measured,reasons",
    [
        ("better and as fast", challenger(), []),
        ("at the latency limit", challenger(p99_ms=6.0), []),
        ("within the accuracy drop", challenger(accuracy=0.946), []),
        ("1% errors is the limit", challenger(failures=5), []),
        ("slower", challenger(p99_ms=6.1), ["p99 6.10 ms is 1.52x the champion's 4.00 ms"]),
        ("failing", challenger(failures=6), ["error rate 1.20% > 1.00%"]),
        ("less accurate", challenger(accuracy=0.944), ["accuracy 0.9440 < the champion's"]),
        ("no traffic", challenger(requests=0, p99_ms=None),
         ["answered no request", "no p99 latency to compare"]),
        ("not probed", challenger(accuracy=None, images=0), ["the probe measured no accuracy"]),
        ("slower and failing", challenger(p99_ms=9.0, failures=50),
         ["error rate 10.00%", "p99 9.00 ms is 2.25x"]),
    ],
)  # fmt: skip
def test_the_challenger_is_promoted_unless_a_measurement_says_not_to(
    name: str, measured: Measured, reasons: list[str]
) -> None:
    decision = decide(CHAMPION, measured, LIMITS)
    assert decision.promote == (not reasons), (name, decision)
    assert len(decision.reasons) == len(reasons), decision.reasons
    for expected, said in zip(reasons, decision.reasons, strict=True):
        assert expected in said


def test_a_champion_prometheus_never_counted_is_no_baseline() -> None:
    """Its replicas unscraped (or not yet): the challenger cannot be compared, whatever
    the probe says."""
    unscraped = Measured(1, accuracy=0.95, images=2000)
    decision = decide(unscraped, challenger(), LIMITS)
    assert not decision.promote
    (reason,) = decision.reasons
    assert reason.startswith("Prometheus counted no request answered by the champion")


# Applying a decision on Kubernetes: no API server runs here, so a stand-in answers the
# requests the analysis makes (what `kubectl rollout restart` sends: a patched template).


class Deployments(BaseHTTPRequestHandler):
    allowed = ("triton", "triton-canary")
    patches: ClassVar[list[tuple[str, str, dict[str, Any]]]] = []

    def do_PATCH(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        name = self.path.removeprefix("/apis/apps/v1/namespaces/ml/deployments/")
        Deployments.patches.append((name, self.headers["Content-Type"], body))
        self.send_response(200 if name in self.allowed else 403)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def kube(tmp_path: Path) -> Iterator[KubeApi]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Deployments)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    (tmp_path / "token").write_text("token\n")
    Deployments.patches = []
    yield KubeApi(f"http://127.0.0.1:{server.server_port}", "ml", token_file=tmp_path / "token")
    server.shutdown()


def analysis(kube: KubeApi | None, stable: str | None = "triton",
             canary: str | None = "triton-canary") -> Analysis:  # fmt: skip
    return Analysis(Path("unused"), None, "r1", "", "", 0, 0, 0, LIMITS, None, kube, stable,
                    canary)  # type: ignore[arg-type]  # fmt: skip


@pytest.mark.parametrize(("promote", "restarted"), [(True, ["triton", "triton-canary"]),
                                                   (False, ["triton-canary"])])  # fmt: skip
def test_a_decision_restarts_the_deployments_whose_pin_it_changed(
    kube: KubeApi, promote: bool, restarted: list[str]
) -> None:
    restart_replicas(analysis(kube), Decision(promote, ()))
    assert [name for name, _, _ in Deployments.patches] == restarted
    for _, content_type, body in Deployments.patches:
        assert content_type == "application/strategic-merge-patch+json"
        annotations = body["spec"]["template"]["metadata"]["annotations"]
        assert annotations["kubectl.kubernetes.io/restartedAt"]
        decision = "promoted" if promote else "rolled back"
        assert annotations["mnist-pipeline/canary"] == f"run r1: {decision}"


def test_a_restart_refused_or_impossible_says_what_to_do(kube: KubeApi) -> None:
    with pytest.raises(PipelineFailure, match=r"HTTP 403 .* needs patch on it"):
        restart_replicas(analysis(kube, stable="other"), Decision(True, ()))
    with pytest.raises(
        PipelineFailure, match=r"no service account token.*restart triton, triton-canary"
    ):
        restart_replicas(analysis(None), Decision(True, ()))
    restart_replicas(analysis(None, None, None), Decision(True, ()))  # nothing to restart


def test_an_operator_decides_by_hand_and_it_is_recorded_so(tmp_path: Path) -> None:
    """`canary --override`: nothing measured (no Prometheus, no server), the decision in the
    ledger and the run's record as any other, marked as an operator's."""
    repo = open_repository(ModelRepository(folder=tmp_path / "models"), MODEL)
    with repo.lock.held("export"):
        for run, release in (("a", None), ("b", CHALLENGER)):
            number = repo.publish(render_config(TritonConfig()), {"model.onnx": run.encode()},
                                  {"run_id": run}, release)  # fmt: skip
            repo.record(run, {"status": "published", "version": number})
    by_hand = [sys.executable, "-m", "mnist_pipeline", "canary", "--storage", tmp_path,
               "--run-id", "b", "--override", "roll-back"]  # fmt: skip
    result = subprocess.run(by_hand, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "rolled back: run b's version: decided by hand (--override)" in result.stdout
    assert repo.scan().versions[2].release == ROLLED_BACK
    assert repo.read_record("b")["canary"]["why"] == "decided by hand (--override)"  # type: ignore[index]
    # A decision is made once; measuring needs Prometheus, said before anything is read.
    decided = subprocess.run(by_hand, capture_output=True, text=True, timeout=60)
    assert decided.returncode == 0, decided.stderr
    assert "nothing to decide: run b's version 2 was rolled back already" in decided.stdout
    again = subprocess.run(by_hand[:-2], capture_output=True, text=True, timeout=60)
    assert again.returncode == 2
    assert "--prometheus-url is needed to measure" in again.stderr
