"""The chart's canary release (canary.enabled): what it renders, and what it refuses.

tests/serving/test_canary.py runs these rendered command lines against real tritonservers
and a real Prometheus."""

from __future__ import annotations

from typing import Any

import pytest

from harness.chart import arg, containers, find, pod_spec, render

PROMETHEUS = "http://prometheus.monitoring:9090"
CANARY: dict[str, Any] = {
    "persistence": {"accessModes": ["ReadWriteMany"]},
    "triton": {"replicas": 3},
    "canary": {"enabled": True, "replicas": 1, "prometheusUrl": PROMETHEUS},
}


def named(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    (found,) = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    return found


def container(obj: dict[str, Any], name: str) -> dict[str, Any]:
    (found,) = [c for c in containers(pod_spec(obj)) if c["name"] == name]
    return found


def pinned(deployment: dict[str, Any]) -> str:
    return arg(container(deployment, "pin-version"), "model-version")


def test_nothing_changes_for_a_user_who_does_not_enable_it() -> None:
    objects, _ = render({})
    assert [o for o in objects if "canary" in o["metadata"]["name"]] == []
    assert pinned(find(objects, "Deployment", "triton")) == "run"
    assert "--canary" not in container(find(objects, "Job", "export"), "export")["args"]


def test_the_canary_pods_serve_the_challenger_beside_the_stable_ones_behind_one_service() -> None:
    objects, _ = render(CANARY)
    stable = named(objects, "Deployment", "demo-mnist-pipeline-triton")
    canary = named(objects, "Deployment", "demo-mnist-pipeline-triton-canary")
    assert (stable["spec"]["replicas"], canary["spec"]["replicas"]) == (3, 1)
    # The stable pods serve the champion, the canary pods the challenger (else the champion).
    assert pinned(stable) == ""
    assert pinned(canary) == "challenger"
    # Each Deployment's selector finds its own pods; both Services select both.
    pods = {d["metadata"]["name"]: d["spec"]["template"]["metadata"]["labels"]
            for d in (stable, canary)}  # fmt: skip
    assert canary["spec"]["selector"]["matchLabels"]["mnist-pipeline/track"] == "canary"
    assert (
        canary["spec"]["selector"]["matchLabels"].items()
        <= pods[canary["metadata"]["name"]].items()
    )
    assert "mnist-pipeline/track" not in pods[stable["metadata"]["name"]]
    for name in ("demo-mnist-pipeline-triton", "demo-mnist-pipeline-triton-grpc"):
        selector = named(objects, "Service", name)["spec"]["selector"].items()
        assert all(selector <= labels.items() for labels in pods.values()), name
    # export publishes the challenger; the client and helm test let each replica answer.
    assert "--canary" in container(find(objects, "Job", "export"), "export")["args"]
    client, helm_test = find(objects, "Job", "client"), find(objects, "Pod")
    for wait_and_client in (containers(pod_spec(client)), containers(pod_spec(helm_test))):
        asked = [arg(c, "model-version") for c in wait_and_client if "serving" in c["args"]
                 or c["args"][0] == "infer"]  # fmt: skip
        assert asked == ["", ""]


def test_the_analysis_job_decides_and_may_restart_the_two_deployments_alone() -> None:
    objects, _ = render({**CANARY, "canary": {**CANARY["canary"], "maxP99Ratio": 2}})
    job = find(objects, "Job", "canary")
    analysis = container(job, "canary")
    assert analysis["args"][0] == "canary"
    assert (
        arg(analysis, "url") == "dns:///demo-mnist-pipeline-triton-grpc.ml.svc.cluster.local:8001"
    )
    assert arg(analysis, "prometheus-url") == PROMETHEUS
    assert arg(analysis, "max-p99-ratio") == "2"
    assert arg(analysis, "stable-deployment") == "demo-mnist-pipeline-triton"
    assert arg(analysis, "canary-deployment") == "demo-mnist-pipeline-triton-canary"
    assert not [a for a in analysis["args"] if a.startswith("--override")]  # measured
    assert [m["name"] for m in analysis["volumeMounts"]].count("api-token") == 1
    (wait,) = pod_spec(job)["initContainers"]
    assert wait["args"][:2] == ["wait", "export"]
    account = pod_spec(job)["serviceAccountName"]
    assert account == "demo-mnist-pipeline-canary"
    role = named(objects, "Role", "demo-mnist-pipeline-canary")
    assert role["rules"] == [{
        "apiGroups": ["apps"], "resources": ["deployments"], "verbs": ["patch"],
        "resourceNames": ["demo-mnist-pipeline-triton", "demo-mnist-pipeline-triton-canary"],
    }]  # fmt: skip
    binding = named(objects, "RoleBinding", "demo-mnist-pipeline-canary")
    assert [s["name"] for s in binding["subjects"]] == [account]
    # Its wait may read the export Job, as Triton's and the client's do.
    readers = named(objects, "RoleBinding", "demo-mnist-pipeline-wait-export")["subjects"]
    assert account in [s["name"] for s in readers]


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"canary": {"enabled": True}}, 'canary.prometheusUrl "": the analysis needs'),
        ({**CANARY, "serveOnly": True}, "serveOnly has no run"),
        ({**CANARY, "triton": {"servedVersion": 2}}, 'triton.servedVersion "2" pins'),
        ({"canary": {**CANARY["canary"], "maxErrorRate": 2}},
         "canary.maxErrorRate (--max-error-rate, MNIST_PIPELINE_MAX_ERROR_RATE): 2 is not in"),
        ({"canary": {**CANARY["canary"], "override": "yes"}},
         "canary.override (--override, MNIST_PIPELINE_OVERRIDE): 'yes' is not one of"),
    ],
)  # fmt: skip
def test_values_a_release_cannot_run_with_are_refused(values: dict[str, Any], message: str) -> None:
    with pytest.raises(Exception, match="VALUES VALIDATION") as refused:
        render(values)
    assert message in str(refused.value)


def test_an_override_is_a_new_analysis_job_deciding_by_hand() -> None:
    run = {"run": {"id": "r7"}}
    measured, _ = render({**CANARY, **run})
    by_hand, _ = render({**CANARY, **run, "canary": {**CANARY["canary"], "override": "roll-back"}})
    job = find(by_hand, "Job", "canary")
    assert arg(container(job, "canary"), "override") == "roll-back"
    assert job["metadata"]["name"] != find(measured, "Job", "canary")["metadata"]["name"]
    assert (
        find(by_hand, "Job", "export")["metadata"]["name"]
        == (find(measured, "Job", "export")["metadata"]["name"])
    )  # the same run: nothing else runs again
