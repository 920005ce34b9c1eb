"""The Helm chart: strict lint, render, Kubernetes 1.30 schemas, checkov, and its structure."""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from pathlib import Path
from typing import Any

import helm_python
import kubernetes_validate
import pytest
import yaml

from harness.chart import (
    CHART,
    KUBE_VERSION,
    LOCAL_IMAGES,
    PROJECT_TRITON,
    REPO,
    arg,
    containers,
    find,
    install_manifest,
    lint,
    pod_spec,
    render,
    workloads,
)
from harness.failure_policy import action, failed_pod

DIGEST = "sha256:" + "ab" * 32
SCENARIOS: dict[str, dict[str, Any]] = {
    "default": {},
    "existing-claim": {"persistence": {"existingClaim": "shared-mnist"}},
    "replicas": {"triton": {"replicas": 3}, "persistence": {"accessModes": ["ReadWriteMany"]}},
    "epochs": {"training": {"epochs": 5, "batchSize": 256, "lr": 0.1}},
    "no-api-no-client": {
        "waits": {"kubernetesApi": False},
        "client": {"enabled": False},
        "networkPolicy": {"enabled": False},
    },
    # The project's CPU Triton image: Triton's python backend.
    "project-triton": {"images": {"triton": PROJECT_TRITON}},
    "digests": {
        "images": {name: {"digest": DIGEST} for name in ("pipeline", "client", "triton")},
        "training": {"extraEnv": [{"name": "MNIST_PIPELINE_LIMIT_TRAIN", "value": "512"}]},
    },
    # Scaling on queue time, its adapter rule and the dashboard: no CRD needed.
    "monitoring": {
        "persistence": {"accessModes": ["ReadWriteMany"]},
        "triton": {
            "autoscaling": {"enabled": True, "queueTime": {"enabled": True}},
            "queueTimeMetric": {"adapterRule": {"enabled": True}},
            "dashboard": {"enabled": True},
        },
    },
    # Triton on any node: an object-storage repository, replicas without RWX.
    "object-storage": {
        "modelRepository": {
            "url": "s3://https://minio.store:9000/models/mnist",
            "existingSecret": "s3",
        },
        "triton": {"replicas": 3},
        "networkPolicy": {
            "egress": {"enabled": True, "objectStorage": {"cidrs": ["10.20.0.0/16"]}}
        },
    },
    # A canary release: a second Triton Deployment, the analysis Job and its Role.
    "canary": {
        "persistence": {"accessModes": ["ReadWriteMany"]},
        "triton": {"replicas": 3},
        "canary": {"enabled": True, "prometheusUrl": "http://prometheus.monitoring:9090"},
    },
    # Most of what a real cluster may need at once.
    "cluster": {
        "run": {"id": "prod"},
        "persistence": {"accessModes": ["ReadWriteMany"], "subPath": "mnist"},
        "training": {"workers": 2, "priorityClassName": "batch"},
        "triton": {
            "servedVersion": "run",
            "autoscaling": {"enabled": True},
            "service": {"type": "LoadBalancer", "loadBalancerSourceRanges": ["10.0.0.0/8"]},
            "ingress": {
                "enabled": True,
                "hosts": [
                    {"host": "mnist.example", "paths": [{"path": "/", "pathType": "Prefix"}]}
                ],
            },
        },
        "networkPolicy": {
            "tritonIngressFrom": [{"ipBlock": {"cidr": "10.0.0.0/8"}}],
            "egress": {"enabled": True, "apiServer": {"cidrs": ["10.0.0.1/32"]}},
        },
    },
}
RELEASES = [("demo", "ml"), ("prod-mnist-pipeline", "team-b")]


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_strict_lint_is_clean(scenario: str) -> None:
    result = lint(SCENARIOS[scenario])
    assert result["errors"] == []
    assert [m for m in result["messages"] if m["severity"] > 1] == []


@pytest.mark.parametrize(("release", "namespace"), RELEASES)
@pytest.mark.parametrize("scenario", SCENARIOS)
def test_every_object_is_valid_kubernetes_1_30(scenario: str, release: str, namespace: str) -> None:
    manifest = install_manifest(SCENARIOS[scenario], release, namespace)
    objects, _ = render(SCENARIOS[scenario], release, namespace)
    installed = [d for d in yaml.safe_load_all(manifest) if d]
    assert len(installed) == len(objects) - 1  # all but the helm test hook
    for obj in objects:
        # strict: unknown fields are errors; an unknown kind raises SchemaNotFoundError.
        kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)
        assert obj["metadata"]["namespace"] == namespace


def test_install_order_puts_the_claim_before_the_workloads() -> None:
    kinds = [d["kind"] for d in yaml.safe_load_all(install_manifest()) if d]
    assert kinds.index("PersistentVolumeClaim") < kinds.index("Deployment")
    assert kinds.index("PersistentVolumeClaim") < kinds.index("Job")


# checkov --------------------------------------------------------------------------------

SKIPS_FILE = REPO / "deploy" / "helm" / "checkov-skips.yaml"


def checkov_binary() -> str:
    path = Path(os.environ.get("CHECKOV", REPO / ".venv-checkov" / "bin" / "checkov"))
    if not path.is_file():
        pytest.fail(f"checkov not found at {path}: run `make test` (it installs it) or set CHECKOV")
    return str(path)


def test_checkov_finds_nothing_but_the_documented_skips(tmp_path: Path) -> None:
    skips = yaml.safe_load(SKIPS_FILE.read_text())
    for skip in skips:
        assert set(skip) <= {"check", "kind", "reason"}, skip
        assert re.fullmatch(r"CKV2?_K8S_\d+", skip["check"]), skip
        assert skip["reason"].strip() and "\n" not in skip["reason"].strip(), skip
    scenarios = (
        "default",
        "digests",
        "no-api-no-client",
        "existing-claim",
        "cluster",
        "object-storage",
        "canary",
    )
    for scenario in scenarios:
        objects, _ = render(SCENARIOS[scenario])
        (tmp_path / f"{scenario}.yaml").write_text(yaml.safe_dump_all(objects))
    result = subprocess.run(
        [
            checkov_binary(),
            "-d",
            str(tmp_path),
            "--framework",
            "kubernetes",
            "--skip-download",
            "--compact",
            "--quiet",
            "-o",
            "json",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode in (0, 1), result.stderr[-2000:]
    reports = json.loads(result.stdout)
    reports = reports if isinstance(reports, list) else [reports]
    failed = [f for r in reports for f in r["results"]["failed_checks"]]
    assert sum(r["summary"]["passed"] for r in reports) > 100, "checkov scanned nothing"

    def skip_for(finding: dict[str, Any]) -> dict[str, Any] | None:
        for skip in skips:
            kind = skip.get("kind")
            if skip["check"] == finding["check_id"] and (
                kind is None or finding["resource"].startswith(f"{kind}.")
            ):
                return dict(skip)
        return None

    unexpected = sorted(
        {f"{f['check_id']} {f['check_name']} ({f['resource']})" for f in failed if not skip_for(f)}
    )
    assert unexpected == []
    used = [skip_for(f) for f in failed]
    assert [s for s in skips if s not in used] == [], "skips that no longer apply"
    # Images pinned by digest satisfy CKV_K8S_43.
    assert not [f for f in failed if f["check_id"] == "CKV_K8S_43" and "digests" in f["file_path"]]


# values.schema.json: only what the API server refuses -----------------------------------

SCHEMA_REFUSES = {
    "negative replicas": {"triton": {"replicas": -1}},
    "port out of range": {"triton": {"ports": {"http": 70000}}},
    "bad pull policy": {"images": {"client": {"pullPolicy": "Sometimes"}}},
    "unknown key": {"trainning": {"epochs": 3}},
    "bad service type": {"triton": {"service": {"type": "External"}}},
    "bad ingress port": {"triton": {"ingress": {"port": "metrics"}}},
}


@pytest.mark.parametrize("case", SCHEMA_REFUSES)
def test_schema_refuses_what_the_api_server_would(case: str) -> None:
    assert lint(SCHEMA_REFUSES[case])["errors"] != []
    with pytest.raises(helm_python.HelmError):
        install_manifest(SCHEMA_REFUSES[case])


# Settings the CLI checks are refused at render time, in the CLI's words, and a value not
# given leaves the CLI's default: tests/chart/test_chart_settings.py.


# Structure ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def default() -> list[dict[str, Any]]:
    return render()[0]


def run_id_of(objects: list[dict[str, Any]]) -> str:
    ids = {
        o["metadata"]["annotations"]["mnist-pipeline/run-id"]
        for o in workloads(objects)
        if o["kind"] != "Pod"
    }
    assert len(ids) == 1, ids
    return ids.pop()


def test_the_service_selects_the_triton_pods_and_nothing_else(
    default: list[dict[str, Any]],
) -> None:
    service = find(default, "Service", "triton")
    selector = service["spec"]["selector"]
    for obj in workloads(default):
        labels = (obj["metadata"] if obj["kind"] == "Pod" else obj["spec"]["template"]["metadata"])[
            "labels"
        ]
        selected = selector.items() <= labels.items()
        assert selected == (obj["kind"] == "Deployment"), obj["metadata"]["name"]
    deployment = find(default, "Deployment", "triton")
    assert deployment["spec"]["selector"]["matchLabels"].items() <= selector.items()
    ports = {p["name"]: p for p in pod_spec(deployment)["containers"][0]["ports"]}
    assert (
        {p["targetPort"] for p in service["spec"]["ports"]}
        == set(ports)
        == {"http", "grpc", "metrics"}
    )
    assert service["spec"]["type"] == "ClusterIP"


def test_each_wait_targets_this_revisions_run_and_the_right_job(
    default: list[dict[str, Any]],
) -> None:
    run_id = run_id_of(default)
    train = find(default, "Job", "train")
    export = find(default, "Job", "export")
    client = find(default, "Job", "client")
    triton = find(default, "Deployment", "triton")
    service = find(default, "Service", "triton")

    train_spec = pod_spec(train)
    assert [c["name"] for c in train_spec["initContainers"]] == ["seed-data"]
    assert train_spec["initContainers"][0]["args"][0] == "data"
    assert arg(train_spec["containers"][0], "run-id") == run_id

    (wait,) = pod_spec(export)["initContainers"]
    assert wait["args"][:2] == ["wait", "training"]
    assert arg(wait, "run-id") == run_id and arg(wait, "job") == train["metadata"]["name"]
    assert arg(pod_spec(export)["containers"][0], "run-id") == run_id

    wait, pin = pod_spec(triton)["initContainers"]
    assert wait["args"][:2] == ["wait", "export"]
    assert arg(wait, "run-id") == run_id and arg(wait, "job") == export["metadata"]["name"]
    assert arg(wait, "model-name") == "resnet18_mnist"
    assert pin["args"][0] == "pin" and arg(pin, "run-id") == run_id

    wait, _prune = pod_spec(client)["initContainers"]
    host = f"{service['metadata']['name']}.ml.svc"
    ports = {p["name"]: p["port"] for p in service["spec"]["ports"]}
    assert wait["args"][:2] == ["wait", "serving"]
    assert arg(wait, "run-id") == run_id and arg(wait, "http-url") == f"{host}:{ports['http']}"
    (infer,) = pod_spec(client)["containers"]
    headless = find(default, "Service", "triton-grpc")
    (grpc,) = headless["spec"]["ports"]
    target = f"dns:///{headless['metadata']['name']}.ml.svc.cluster.local:{grpc['port']}"
    assert infer["args"][0] == "infer" and arg(infer, "url") == target

    # helm test waits as the client does, within its own bound (under helm test's 5 min).
    (test_wait,) = pod_spec(find(default, "Pod", "test"))["initContainers"]
    assert test_wait["args"][:2] == ["wait", "serving"]
    for name in ("run-id", "http-url", "model-version", "model-name"):
        assert arg(test_wait, name) == arg(wait, name), name
    for obj in workloads(default):
        bound = "--wait-timeout=240" if obj["kind"] == "Pod" else "--wait-timeout=21600"
        for c in containers(pod_spec(obj)):
            timeouts = [a for a in c["args"] if a.startswith("--wait-timeout=")]
            assert not c["name"].startswith("wait-") or timeouts == [bound]
    serve_only = render({"serveOnly": True, "triton": {"servedVersion": 3}})[0]
    assert "initContainers" not in pod_spec(find(serve_only, "Pod", "test"))  # no run to wait on


def test_run_ids_follow_the_install_and_the_training_settings(
    default: list[dict[str, Any]],
) -> None:
    pinned = {"run": {"id": "demo"}}
    first = run_id_of(render(pinned)[0])
    assert re.fullmatch(r"demo-[0-9a-f]{8}", first)
    upgraded = render({**pinned, "training": {"epochs": 3}}, revision=2)[0]
    assert run_id_of(upgraded) != first
    assert re.fullmatch(r"demo-mnist-pipeline-train-[0-9a-f]{7}", job_name(upgraded, "train"))
    train = pod_spec(find(upgraded, "Job", "train"))["containers"][0]
    assert {"name": "MNIST_PIPELINE_EPOCHS", "value": "3"} in train["env"]
    # A reinstall under the same name, without a pinned run, gets a run id of its own.
    time.sleep(1.1)
    assert run_id_of(render()[0]) != run_id_of(default)
    # Within one render every object agrees, NOTES included.
    objects, notes = render()
    assert run_id_of(objects) in notes


@pytest.mark.parametrize(("epochs", "shown"), [(0.8, "0.8"), (3, "3"), (1000, "1000")])
def test_notes_and_the_train_env_show_the_epochs_as_given(epochs: float, shown: str) -> None:
    objects, notes = render({"training": {"epochs": epochs}})
    assert f"train {shown} epoch(s)" in notes
    train = pod_spec(find(objects, "Job", "train"))["containers"][0]
    assert {"name": "MNIST_PIPELINE_EPOCHS", "value": shown} in train["env"]


def test_precision_reaches_the_export_job_and_is_part_of_the_run(
    default: list[dict[str, Any]],
) -> None:
    export = pod_spec(find(default, "Job", "export"))["containers"][0]
    # Unset: the CLI's default, fp32, which is also the run's.
    assert not [e for e in export["env"] if e["name"] == "MNIST_PIPELINE_PRECISION"]
    pinned = {"run": {"id": "demo"}}
    int8 = render({**pinned, "export": {"precision": "int8"}}, revision=2)[0]
    export = pod_spec(find(int8, "Job", "export"))["containers"][0]
    assert {"name": "MNIST_PIPELINE_PRECISION", "value": "int8"} in export["env"]
    # An export setting: the new run exports again (and so trains again, like any).
    assert run_id_of(int8) != run_id_of(render(pinned)[0])
    fp32 = render({**pinned, "export": {"precision": "fp32"}})[0]
    assert run_id_of(fp32) == run_id_of(render(pinned)[0])


def test_gradient_compression_reaches_every_worker_and_is_part_of_the_run() -> None:
    pinned = {
        "run": {"id": "demo"},
        "persistence": {"accessModes": ["ReadWriteMany"]},
        "training": {"workers": 2},
    }
    plain = render(pinned)[0]
    train = pod_spec(find(plain, "Job", "train"))["containers"][0]
    assert not [e for e in train["env"] if e["name"] == "MNIST_PIPELINE_GRADIENT_COMPRESSION"]
    fp16 = render({**pinned, "training": {"workers": 2, "gradientCompression": "fp16"}})[0]
    train = pod_spec(find(fp16, "Job", "train"))["containers"][0]
    assert {"name": "MNIST_PIPELINE_GRADIENT_COMPRESSION", "value": "fp16"} in train["env"]
    assert run_id_of(fp16) != run_id_of(plain)  # other gradients, another model


def job_name(objects: list[dict[str, Any]], stage: str) -> str:
    return str(find(objects, "Job", stage)["metadata"]["name"])


def test_claims_and_mounts_match() -> None:
    for values, claim in [
        ({}, "demo-mnist-pipeline-storage"),
        (SCENARIOS["existing-claim"], "shared-mnist"),
    ]:
        objects, _ = render(values)
        pvcs = [o for o in objects if o["kind"] == "PersistentVolumeClaim"]
        if values:
            assert pvcs == []
        else:
            (pvc,) = pvcs
            assert pvc["metadata"]["name"] == claim
            assert pvc["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
        for obj in workloads(objects):
            spec = pod_spec(obj)
            volumes = {v["name"]: v for v in spec["volumes"]}
            assert volumes["storage"]["persistentVolumeClaim"]["claimName"] == claim
            for c in containers(spec):
                mounts = {m["name"]: m for m in c["volumeMounts"]}
                assert set(mounts) <= set(volumes)
                assert mounts["storage"]["mountPath"] == "/storage"
                assert mounts["tmp"]["mountPath"] == "/tmp"
    triton = pod_spec(find(render()[0], "Deployment", "triton"))["containers"][0]
    assert {m["name"]: m for m in triton["volumeMounts"]}["storage"]["readOnly"] is True


def test_resources_probes_and_security_everywhere(default: list[dict[str, Any]]) -> None:
    for obj in workloads(default):
        spec = pod_spec(obj)
        assert spec["automountServiceAccountToken"] is False
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
        for c in containers(spec):
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(c["resources"][kind]), (c["name"], kind)
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False
            assert sc["readOnlyRootFilesystem"] is True
            assert sc["capabilities"]["drop"] == ["ALL"]
            assert sc["runAsNonRoot"] is True
            # The API token goes to the waits only (not helm test's: its pod has none).
            has_token = any(m["name"] == "api-token" for m in c["volumeMounts"])
            wait = c["name"].startswith("wait-") and obj["kind"] != "Pod"
            assert has_token == wait, c["name"]
    triton = pod_spec(find(default, "Deployment", "triton"))["containers"][0]
    # The image's entrypoint (NVIDIA's sets up CUDA compatibility) runs tritonserver.
    assert "command" not in triton and triton["args"][0] == "tritonserver"
    assert "--model-repository=/pinned" in triton["args"]
    assert "--model-control-mode=none" in triton["args"]
    # NVIDIA's image serves the exported repository as it is: its onnxruntime backend.
    assert triton["image"] == "nvcr.io/nvidia/tritonserver:24.10-py3"
    (pin,) = [
        c
        for c in pod_spec(find(default, "Deployment", "triton"))["initContainers"]
        if c["name"] == "pin-version"
    ]
    assert arg(pin, "triton-backend") == "onnxruntime"
    assert triton["startupProbe"]["httpGet"]["path"] == "/v2/health/live"
    assert triton["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    assert triton["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    for component in ("train", "export", "client"):
        job = find(default, "Job", component)["spec"]
        assert job["backoffLimit"] >= 1 and job["ttlSecondsAfterFinished"] > 0
        assert job["podFailurePolicy"]["rules"]


# Every optional part of the chart at once: each pod template it can render.
ALL_FEATURES: dict[str, Any] = {
    **SCENARIOS["cluster"],
    "apiVersions": ["monitoring.coreos.com/v1"],
    "triton": {
        **SCENARIOS["cluster"]["triton"],
        "serviceMonitor": {"enabled": True},
        "prometheusRule": {"enabled": True},
        "dashboard": {"enabled": True},
        "queueTimeMetric": {"adapterRule": {"enabled": True}},
    },
    "training": {**SCENARIOS["cluster"]["training"], "syncBatchNorm": False},
}


def pod_templates(objects: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    """(kind/name, pod spec) of every object that makes pods, whatever its kind."""
    found = []
    for obj in objects:
        spec = obj.get("spec", {})
        template = spec.get("template", spec.get("jobTemplate", {}).get("spec", {}).get("template"))
        pod = obj["spec"] if obj["kind"] == "Pod" else (template or {}).get("spec")
        if pod is not None:
            found.append((f"{obj['kind']}/{obj['metadata']['name']}", pod))
    return found


def test_no_pod_gets_the_namespaces_services_as_environment() -> None:
    """The CLI reads MNIST_PIPELINE_* from the environment: Service links could set some."""
    for values, kinds in (
        (ALL_FEATURES, {"Job", "Deployment", "Pod"}),
        ({"serveOnly": True}, {"Deployment", "Pod"}),
    ):
        objects, _ = render(values)
        pods = pod_templates(objects)
        assert {name.split("/")[0] for name, _ in pods} == kinds
        for name, spec in pods:
            assert spec.get("enableServiceLinks") is False, name


def test_rbac_is_least_privilege_and_off_the_default_account(
    default: list[dict[str, Any]],
) -> None:
    # Each wait may GET the one Job it watches, by name, nothing else: export the train
    # Job, Triton and the client the export Job.
    accounts = {
        o["metadata"]["labels"]["app.kubernetes.io/component"]: o["metadata"]["name"]
        for o in default
        if o["kind"] == "ServiceAccount"
    }
    assert accounts == {
        c: f"demo-mnist-pipeline-{c}" for c in ("training", "export", "triton", "client")
    }
    roles = {o["metadata"]["name"]: o for o in default if o["kind"] == "Role"}
    bindings = [o for o in default if o["kind"] == "RoleBinding"]
    readers = {"train": ["export"], "export": ["triton", "client"]}
    assert len(roles) == len(bindings) == 2
    for binding in bindings:
        role = roles[binding["roleRef"]["name"]]
        (rule,) = role["rules"]
        (job,) = rule["resourceNames"]
        stage = next(s for s in readers if job == job_name(default, s))
        assert rule == {
            "apiGroups": ["batch"],
            "resources": ["jobs"],
            "verbs": ["get"],
            "resourceNames": [job_name(default, stage)],
        }
        assert binding["subjects"] == [
            {"kind": "ServiceAccount", "name": accounts[c], "namespace": "ml"}
            for c in readers[stage]
        ]
    for obj in workloads(default):
        mounts = [m for c in containers(pod_spec(obj)) for m in c["volumeMounts"]]
        uses_api = any(m["name"] == "api-token" for m in mounts)
        bound = pod_spec(obj).get("serviceAccountName") in accounts.values() and (
            pod_spec(obj)["serviceAccountName"] != accounts["training"]
        )
        assert bound == uses_api, obj["metadata"]["name"]
    objects, _ = render(SCENARIOS["no-api-no-client"])
    assert not [o for o in objects if o["kind"] in ("Role", "RoleBinding")]


def test_names_follow_release_and_namespace() -> None:
    a, _ = render(release="alpha", namespace="ns-one")
    b, _ = render(release="beta", namespace="ns-two")
    cases = [(a, "alpha", "ns-one", "beta", "ns-two"), (b, "beta", "ns-two", "alpha", "ns-one")]
    for objects, release, namespace, other_release, other_namespace in cases:
        text = yaml.safe_dump_all(objects)
        assert other_release not in text and other_namespace not in text
        for obj in objects:
            assert obj["metadata"]["name"].startswith(f"{release}-mnist-pipeline")
            assert obj["metadata"]["namespace"] == namespace
            assert obj["metadata"]["labels"]["app.kubernetes.io/instance"] == release
    # The longest release name Helm allows still gives valid names (Job names carry a hash
    # and must stay within 63 characters, the job-name label's limit, with room for a
    # worker pod's "-<index>").
    longest = "r" * 53
    for obj in render(release=longest, revision=99999)[0]:
        name = obj["metadata"]["name"]
        assert len(name) <= (59 if obj["kind"] == "Job" else 63), name
        assert name.startswith("r" * (44 if obj["kind"] == "Job" else 48))
    # The chart's own sources name no release, namespace or Service.
    for template in (CHART / "templates").rglob("*"):
        if template.is_file():
            source = template.read_text()
            assert "demo" not in source and ".svc.cluster.local" not in source, template


def test_values_reach_the_manifests() -> None:
    objects, _ = render(
        {
            "triton": {"replicas": 3},
            "persistence": {"accessModes": ["ReadWriteMany"]},
            "training": {
                "epochs": 4,
                "extraEnv": [{"name": "MNIST_PIPELINE_LIMIT_TRAIN", "value": "512"}],
            },
            "images": {
                "pipeline": {
                    "repository": "reg.example/ml/pipeline",
                    "tag": "1.2.3",
                    "pullPolicy": "Always",
                }
            },
        }
    )
    assert find(objects, "Deployment", "triton")["spec"]["replicas"] == 3
    train = pod_spec(find(objects, "Job", "train"))["containers"][0]
    assert {"name": "MNIST_PIPELINE_EPOCHS", "value": "4"} in train["env"]
    assert {"name": "MNIST_PIPELINE_LIMIT_TRAIN", "value": "512"} in train["env"]
    assert train["image"] == "reg.example/ml/pipeline:1.2.3"
    assert train["imagePullPolicy"] == "Always"


def test_helm_test_hook_runs_inference_against_the_service(default: list[dict[str, Any]]) -> None:
    (pod,) = [o for o in default if o["kind"] == "Pod"]
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    (c,) = pod["spec"]["containers"]
    service = find(default, "Service", "triton-grpc")  # every replica, round-robin
    assert c["command"] == ["mnist-pipeline"] and c["args"][0] == "infer"
    assert arg(c, "url") == f"dns:///{service['metadata']['name']}.ml.svc.cluster.local:8001"
    # It asks for this run's version with an accuracy floor; the volume is read-only to it,
    # so its results go to /tmp, an emptyDir.
    assert arg(c, "run-id") == run_id_of(default)
    assert arg(c, "model-version") == "run"
    assert float(arg(c, "min-accuracy")) == 0.9
    assert arg(c, "images-per-request") == "8"
    assert arg(c, "output") == "/tmp/helm-test"
    mounts = {m["name"]: m for m in c["volumeMounts"]}
    assert mounts["storage"]["readOnly"] is True and mounts["tmp"]["mountPath"] == "/tmp"
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    assert "emptyDir" in volumes["tmp"]
    # Serve-only: no run to resolve "run" against; ask for the newest, which the pin serves.
    serve_only, _ = render({"serveOnly": True})
    (c,) = find(serve_only, "Pod")["spec"]["containers"]
    assert arg(c, "model-version") == "" and not [a for a in c["args"] if "--run-id" in a]


def test_the_packaged_chart_renders_the_same_objects(tmp_path: Path) -> None:
    archive = Path(helm_python.package(str(CHART), destination=tmp_path))
    assert archive.name == "mnist-pipeline-0.2.0.tgz"
    with helm_python.Chart.load(str(archive)) as chart:
        files = chart.render(LOCAL_IMAGES, name="demo", namespace="ml")
    kinds = sorted(
        doc["kind"]
        for path, text in files.items()
        if not path.endswith("NOTES.txt")
        for doc in yaml.safe_load_all(text)
        if doc
    )
    assert kinds == sorted(o["kind"] for o in render()[0])


@pytest.mark.parametrize("scenario", ["default", "object-storage"])
def test_a_killed_pod_is_retried_and_only_a_failed_stage_fails_its_job(scenario: str) -> None:
    """A pod deleted, drained or OOM-killed exits 143 or 137, in a wait as in the stage: that
    is retried (counted against backoffLimit), or ignored when the pod carries DisruptionTarget.
    Exit 1 (the stage, or what the wait waits for, failed) and 2 (bad input) of the waits and
    the export fail the Job at once; the client's 1 (Triton unreachable) is retried."""
    objects, _ = render(SCENARIOS[scenario])
    for job in (o for o in objects if o["kind"] == "Job"):
        spec = pod_spec(job)
        for init in (True, False):
            for c in spec["initContainers" if init else "containers"]:
                for killed in (137, 143):
                    pod = failed_pod(c["name"], killed, init=init)
                    assert action(job, pod) == "Count", (job["metadata"]["name"], c["name"])
                    evicted = failed_pod(c["name"], killed, init, ["DisruptionTarget"])
                    assert action(job, evicted) == "Ignore", c["name"]
    fails = {"export": ["wait-for-training", "export"], "client": ["wait-for-serving"]}
    for component, names in fails.items():
        job = find(objects, "Job", component)
        for name in names:
            init = name.startswith("wait-")
            for failed in (1, 2):
                assert action(job, failed_pod(name, failed, init=init)) == "FailJob", name
    client = find(objects, "Job", "client")
    assert action(client, failed_pod("client", 1, init=False)) == "Count"
    assert action(client, failed_pod("client", 2, init=False)) == "FailJob"
