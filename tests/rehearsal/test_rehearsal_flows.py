"""Rehearse what users do after an install: a retraining upgrade, `helm rollback`,
pinning a version and retuning Triton, with the chart's own command lines run locally as in
test_rehearsal (the real tritonserver, real training on real MNIST, one shared volume).
"""

from __future__ import annotations

import json
import signal
import subprocess
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from test_rehearsal import VALUES, Rehearsal, job_pods, read, rehearse, wait_exit

from harness.chart import find, render
from mnist_pipeline.storage import DEFAULT_MODEL_NAME

pytestmark = pytest.mark.slow


def values(epochs: int, **triton: Any) -> dict[str, Any]:
    """3072 images score well above chance on any CPU (0.92 after one epoch here; 512 scored
    chance, 1536 0.38); a second epoch does better, so the upgrade publishes a version."""
    return {
        **VALUES,
        "run": {"id": "flows"},
        "training": {
            **VALUES["training"],
            "epochs": epochs,
            "extraEnv": [{"name": "MNIST_PIPELINE_LIMIT_TRAIN", "value": "3072"}],
        },
        "tests": {"requests": 5, "minAccuracy": 0.5},
        "triton": {**VALUES["triton"], **triton},
    }


def run_id_of(objects: list[dict[str, Any]]) -> str:
    return str(find(objects, "Job", "train")["metadata"]["annotations"]["mnist-pipeline/run-id"])


def serve(r: Rehearsal, objects: list[dict[str, Any]]) -> tuple[str, dict[str, Any], str]:
    """A serving-only revision: Triton's pin and server, the client's wait, the client and
    `helm test`. Return the version the client got, the config Triton reports, the test log."""
    triton_pod = find(objects, "Deployment", "triton")["spec"]["template"]
    (client_pod,) = job_pods(find(objects, "Job", "client"))
    (helm_test,) = [o for o in objects if o["kind"] == "Pod"]
    triton, client = triton_pod["spec"], client_pod["spec"]
    _, pin = triton["initContainers"]
    wait_serving = client["initContainers"][0]
    inference = r.storage / "inference"
    before = set(inference.iterdir())
    waiting = r.start(wait_serving, client_pod, "wait-for-serving")
    r.run(pin, triton_pod, "pin-version")
    server = r.start(triton["containers"][0], triton_pod, "tritonserver")
    try:
        assert wait_exit(waiting, 240) == 0, r.log("wait-for-serving")
        url = f"http://127.0.0.1:{r.local_port[8000]}/v2/models/{DEFAULT_MODEL_NAME}/config"
        with urllib.request.urlopen(url, timeout=10) as response:
            config = json.load(response)
        r.run(client["containers"][0], client_pod, "client")
        (result,) = set(inference.iterdir()) - before
        served = str(read(result / "latency.json")["model_version_served"])
        r.run(helm_test["spec"]["containers"][0], helm_test, "helm-test")
        (tested,) = (r.pod_tmp(helm_test) / "helm-test").iterdir()
        tested_version = str(read(tested / "latency.json")["model_version_served"])
    finally:
        if waiting.poll() is None:
            waiting.kill()
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(60)
        except subprocess.TimeoutExpired:
            server.kill()
    return served, config, tested_version


def test_rollback_and_pinning_serve_what_the_client_and_helm_test_ask_for(tmp_path: Path) -> None:
    """install (run A publishes v1) → retraining upgrade (2 epochs: run B publishes v2) → `helm
    rollback 1` (A's revision again: Triton must serve v1, which A's client Job and `helm
    test` ask for; before, Triton served the newest, v2, and the client's wait hung) →
    `triton.servedVersion: 2` with a smaller Triton (1 CPU, 1 instance): served as pinned,
    with the new instance groups and threads, and still the same run (no retraining)."""
    storage = tmp_path / "storage"
    small, large = values(epochs=1), values(epochs=2)

    install, _ = render(small, release="flows", revision=1)
    first = rehearse(Rehearsal(storage, tmp_path / "r1", install, None), install)
    assert first["status"] == "published" and first["version"] == 1, first

    upgrade, _ = render(large, release="flows", revision=2)
    second = rehearse(Rehearsal(storage, tmp_path / "r2", upgrade, None), upgrade)
    assert second["status"] == "published" and second["version"] == 2, second
    assert run_id_of(upgrade) != run_id_of(install)
    trained = [p.name for p in (storage / "checkpoints").iterdir() if p.is_dir()]
    assert sorted(trained) == sorted(map(run_id_of, (install, upgrade)))

    # `helm rollback flows 1`: revision 1's values, rendered again as revision 3. Run A's
    # artifacts are all there (its Jobs, kept or re-created, find it done): Triton rolls back
    # to A's version while v2 stays the newest, and A's client agrees.
    rollback, _ = render(small, release="flows", revision=3)
    assert run_id_of(rollback) == run_id_of(install)
    served, config, tested = serve(Rehearsal(storage, tmp_path / "r3", rollback, None), rollback)
    assert served == tested == "1"
    assert config["version_policy"] == {"specific": {"versions": [1]}}

    # Pin version 2 and shrink Triton: a serving-only upgrade of the rolled-back release.
    retuned = values(epochs=1, servedVersion=2, instanceCount=1)
    retuned["triton"]["resources"] = {"limits": {"cpu": "1", "memory": "2Gi"}}
    pinned, _ = render(retuned, release="flows", revision=4)
    assert run_id_of(pinned) == run_id_of(install)
    served, config, tested = serve(Rehearsal(storage, tmp_path / "r4", pinned, None), pinned)
    assert served == tested == "2"
    assert config["instance_group"][0]["count"] == 1
    assert config["instance_group"][0]["kind"] == "KIND_CPU"
    assert config["parameters"]["intra_op_thread_count"]["string_value"] == "1"
    assert config["version_policy"] == {"specific": {"versions": [2]}}
