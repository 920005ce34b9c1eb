"""Triton scaled out: an object-storage repository takes Triton's pods off the training
volume and its node (replicas spread), the headless gRPC Service and the round-robin
target of the client and helm test, the connection age, and the object store's egress.
Real Helm renders; the schemas and checkov see the object-storage scenario in test_chart."""

from __future__ import annotations

from typing import Any

import helm_python
import pytest

from chart.test_chart_cluster import tritonserver_help
from harness.chart import arg, containers, find, install_manifest, pod_spec, render, workloads

S3 = {"url": "s3://http://minio.store:9000/models/mnist", "existingSecret": "s3-creds"}
OBJECT_STORAGE = {"modelRepository": S3, "triton": {"replicas": 3}}
CONTRACT_ENV = {
    "MNIST_PIPELINE_MODEL_REPOSITORY",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_DEFAULT_REGION",
    "AWS_EC2_METADATA_DISABLED",
}


def refused(values: dict[str, Any]) -> str:
    with pytest.raises(helm_python.HelmError) as e:
        install_manifest(values)
    return str(e.value)


def env_of(container: dict[str, Any]) -> dict[str, Any]:
    return {v["name"]: v for v in container.get("env", [])}


def claims(spec: dict[str, Any]) -> list[str]:
    return [v["name"] for v in spec.get("volumes", []) if "persistentVolumeClaim" in v]


def test_an_object_storage_repository_takes_triton_off_the_volume_and_its_node() -> None:
    objects, _ = render(OBJECT_STORAGE)
    spec = pod_spec(find(objects, "Deployment", "triton"))
    assert find(objects, "Deployment", "triton")["spec"]["replicas"] == 3
    assert claims(spec) == []
    for c in containers(spec):
        assert "storage" not in {m["name"] for m in c["volumeMounts"]}, c["name"]
        assert not any(a.startswith("--storage=") for a in c["args"]), c["name"]
    assert "podAffinity" not in spec.get("affinity", {})
    (spread,) = spec["topologySpreadConstraints"]
    assert spread["topologyKey"] == "kubernetes.io/hostname"
    assert spread["whenUnsatisfiable"] == "ScheduleAnyway" and spread["maxSkew"] == 1
    assert spread["labelSelector"]["matchLabels"]["app.kubernetes.io/component"] == "triton"
    assert spread["matchLabelKeys"] == ["pod-template-hash"]
    # The pods that mount the ReadWriteOnce claim still share its node, without Triton's.
    for obj in workloads(objects):
        if obj["kind"] == "Deployment":
            continue
        (term,) = pod_spec(obj)["affinity"]["podAffinity"][
            "requiredDuringSchedulingIgnoredDuringExecution"
        ]
        assert term["labelSelector"]["matchExpressions"] == [
            {"key": "app.kubernetes.io/component", "operator": "NotIn", "values": ["triton"]}
        ], obj["metadata"]["name"]
        assert claims(pod_spec(obj)), obj["metadata"]["name"]


def test_the_contracts_env_reaches_exactly_the_pods_that_use_the_bucket() -> None:
    objects, _ = render(OBJECT_STORAGE)
    wait, pin = pod_spec(find(objects, "Deployment", "triton"))["initContainers"]
    (triton,) = pod_spec(find(objects, "Deployment", "triton"))["containers"]
    (export,) = pod_spec(find(objects, "Job", "export"))["containers"]
    # The client's and helm test's waits and clients read the export's record from the
    # bucket, as Triton's wait does.
    wait_serving, prune = pod_spec(find(objects, "Job", "client"))["initContainers"]
    (client,) = pod_spec(find(objects, "Job", "client"))["containers"]
    (helm_test,) = [o for o in objects if o["kind"] == "Pod"]
    test_wait, inference = (*helm_test["spec"]["initContainers"], *helm_test["spec"]["containers"])
    users = {"wait-for-export", "pin-version", "export", "wait-for-serving", "prune", "client",
             "inference"}  # fmt: skip
    for c in (wait, pin, export, wait_serving, prune, client, test_wait, inference):
        env = env_of(c)
        assert set(env) >= CONTRACT_ENV, c["name"]
        assert env["MNIST_PIPELINE_MODEL_REPOSITORY"]["value"] == S3["url"]
        assert env["AWS_EC2_METADATA_DISABLED"]["value"] == "true"
        assert env["AWS_DEFAULT_REGION"]["value"] == "us-east-1"
        for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
            ref = env[key]["valueFrom"]["secretKeyRef"]
            assert ref["name"] == "s3-creds" and ref["key"] == key
            assert ref.get("optional", False) == (key == "AWS_SESSION_TOKEN")
    assert wait["args"][:2] == ["wait", "export"] and pin["args"][0] == "pin"
    assert arg(pin, "served-repository") == "/pinned" and arg(pin, "model-version") == "run"
    assert claims(pod_spec(find(objects, "Job", "export")))  # checkpoints stay there
    for obj in workloads(objects):
        for c in containers(pod_spec(obj)):
            if c["name"] not in users:
                assert not CONTRACT_ENV & set(env_of(c)), c["name"]
    # Never the bucket itself.
    assert triton["args"][:2] == ["tritonserver", "--model-repository=/pinned"]


def test_the_volume_mode_keeps_triton_on_the_claim_and_its_node() -> None:
    objects, _ = render()
    spec = pod_spec(find(objects, "Deployment", "triton"))
    assert claims(spec) == ["storage"]
    (term,) = spec["affinity"]["podAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert "matchExpressions" not in term["labelSelector"]
    assert "topologySpreadConstraints" not in spec
    for obj in workloads(objects):
        for c in containers(pod_spec(obj)):
            assert not CONTRACT_ENV & set(env_of(c)), c["name"]
    assert not [o for o in objects if o["metadata"]["name"].endswith("-object-storage")]


def test_the_spread_is_settable_and_yields_to_the_users_own() -> None:
    zone = {"topologyKey": "topology.kubernetes.io/zone", "whenUnsatisfiable": "DoNotSchedule"}
    objects, _ = render({**OBJECT_STORAGE, "triton": {"replicas": 3, "spread": zone}})
    (spread,) = pod_spec(find(objects, "Deployment", "triton"))["topologySpreadConstraints"]
    assert spread["topologyKey"] == zone["topologyKey"]
    assert spread["whenUnsatisfiable"] == "DoNotSchedule"
    own = [{"maxSkew": 2, "topologyKey": "rack", "whenUnsatisfiable": "ScheduleAnyway"}]
    objects, _ = render({**OBJECT_STORAGE, "triton": {"topologySpreadConstraints": own}})
    assert pod_spec(find(objects, "Deployment", "triton"))["topologySpreadConstraints"] == own
    objects, _ = render({**OBJECT_STORAGE, "triton": {"spread": {"enabled": False}}})
    assert "topologySpreadConstraints" not in pod_spec(find(objects, "Deployment", "triton"))


@pytest.mark.parametrize(
    "values,messages",
    [
        (
            {"modelRepository": {"url": "s3://bucket/models"}, "triton": {"replicas": 2}},
            ["modelRepository.existingSecret is empty"],
        ),
        (
            {"modelRepository": {"url": "/data/models"}, "triton": {"replicas": 2}},
            ['modelRepository.url "/data/models"', "persistence.accessModes is ReadWriteOnce"],
        ),
        (
            {"modelRepository": {"url": "s3://http://minio:9000", "existingSecret": "s"}},
            ["names no bucket"],
        ),
    ],
)
def test_a_repository_the_pods_cannot_use_is_refused_with_every_reason(
    values: dict[str, Any], messages: list[str]
) -> None:
    reason = refused(values)
    assert "VALUES VALIDATION" in reason
    for message in messages:
        assert message in reason, reason


def test_the_headless_service_and_the_round_robin_target() -> None:
    values = {"clusterDomain": "corp.internal", "triton": {"ports": {"grpc": 9001}}}
    objects, _ = render(values)
    headless = find(objects, "Service", "triton-grpc")
    assert headless["spec"]["clusterIP"] == "None"
    assert headless["spec"]["publishNotReadyAddresses"] is False
    (port,) = headless["spec"]["ports"]
    assert port["port"] == 9001 and port["targetPort"] == "grpc"
    selector = headless["spec"]["selector"].items()
    for obj in workloads(objects):
        meta = obj["metadata"] if obj["kind"] == "Pod" else obj["spec"]["template"]["metadata"]
        assert (selector <= meta["labels"].items()) == (obj["kind"] == "Deployment")
    target = f"dns:///{headless['metadata']['name']}.ml.svc.corp.internal:9001"
    (client,) = pod_spec(find(objects, "Job", "client"))["containers"]
    (test,) = pod_spec(find(objects, "Pod", "test"))["containers"]
    assert arg(client, "url") == target and arg(test, "url") == target
    assert len(headless["metadata"]["name"]) <= 63


def test_triton_closes_grpc_connections_after_the_maximum_age() -> None:
    def triton_args(values: dict[str, Any]) -> list[str]:
        (triton,) = pod_spec(find(render(values)[0], "Deployment", "triton"))["containers"]
        return list(triton["args"])

    defaults = triton_args({})
    assert "--grpc-max-connection-age=60000" in defaults  # milliseconds
    assert "--grpc-max-connection-age-grace=10000" in defaults
    age = {"grpcMaxConnectionAgeSeconds": 5, "grpcMaxConnectionAgeGraceSeconds": 2}
    assert {"--grpc-max-connection-age=5000", "--grpc-max-connection-age-grace=2000"} <= set(
        triton_args({"triton": age})
    )
    assert not [
        a for a in triton_args({"triton": {"grpcMaxConnectionAgeSeconds": 0}}) if "age" in a
    ]
    known = tritonserver_help()  # the real tritonserver 2.51 knows both flags
    assert "--grpc-max-connection-age <integer>" in known
    assert "--grpc-max-connection-age-grace <integer>" in known


@pytest.mark.parametrize(
    "url,ports",
    [
        ("s3://http://minio.store:9000/models", [9000]),
        ("s3://https://storage.googleapis.com/bucket/models", [443]),
        ("s3://http://rgw.store/bucket", [80]),
        ("s3://bucket/models", [443]),  # AWS
    ],
)
def test_the_pods_that_use_the_bucket_may_reach_it(url: str, ports: list[int]) -> None:
    values = {
        "modelRepository": {"url": url, "existingSecret": "s"},
        "networkPolicy": {"egress": {"enabled": True}},
    }
    objects, _ = render(values)
    (policy,) = [o for o in objects if o["metadata"]["name"].endswith("-object-storage")]
    (selector,) = [
        e for e in policy["spec"]["podSelector"]["matchExpressions"]
        if e["key"] == "app.kubernetes.io/component"
    ]  # fmt: skip
    assert set(selector["values"]) == {"export", "triton", "client", "test"}  # helm test too
    (rule,) = policy["spec"]["egress"]
    assert [p["port"] for p in rule["ports"]] == ports and "to" not in rule
    values["networkPolicy"]["egress"]["objectStorage"] = {
        "cidrs": ["10.20.0.0/16"],
        "ports": [7480],
    }
    objects, _ = render(values)
    (policy,) = [o for o in objects if o["metadata"]["name"].endswith("-object-storage")]
    (rule,) = policy["spec"]["egress"]
    assert rule["to"] == [{"ipBlock": {"cidr": "10.20.0.0/16"}}]
    assert [p["port"] for p in rule["ports"]] == [7480]
