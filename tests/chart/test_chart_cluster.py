"""The chart on real clusters and its scaling shapes, at render level.

What a cluster would do with the manifests is asserted on the rendered objects: two
renders compared, requests summed, affinity present, refusals and their reasons.
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import helm_python
import kubernetes_validate
import pytest
import yaml

from harness.chart import (
    KUBE_VERSION,
    NVIDIA_TRITON,
    PROJECT_TRITON,
    arg,
    containers,
    find,
    install_manifest,
    lint,
    pod_spec,
    render,
)
from harness.chart import workloads as all_workloads
from mnist_pipeline import tritonconfig

RWX = {"persistence": {"accessModes": ["ReadWriteMany"]}}
PINNED = {"run": {"id": "prod"}}


def merge(*values: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for v in values:
        for key, value in v.items():
            if isinstance(value, dict) and isinstance(out.get(key), dict):
                out[key] = merge(out[key], value)
            else:
                out[key] = value
    return out


def refused(values: dict[str, Any], release: str = "demo") -> str:
    """The reason the chart refuses these values (template `fail` or schema)."""
    with pytest.raises(helm_python.HelmError) as e:
        install_manifest(values, release=release)
    return str(e.value)


def run_id(objects: list[dict[str, Any]]) -> str:
    (cm,) = [o for o in objects if o["kind"] == "ConfigMap"]
    return str(cm["data"]["runId"])


def job_names(objects: list[dict[str, Any]]) -> dict[str, str]:
    return {
        o["metadata"]["labels"]["app.kubernetes.io/component"]: o["metadata"]["name"]
        for o in objects
        if o["kind"] == "Job"
    }


# GitOps renders ---------------------------------------------------------------------------


def test_a_pinned_run_renders_byte_identical_twice() -> None:
    first = install_manifest(PINNED)
    assert install_manifest(PINNED) == first
    assert render(PINNED) == render(PINNED)  # NOTES included
    objects, _ = render(PINNED)
    assert re.fullmatch(r"prod-[0-9a-f]{8}", run_id(objects))
    # Job names come from the run and the Job's spec, never from the revision.
    assert job_names(render(PINNED, revision=7)[0]) == job_names(objects)
    for name in job_names(objects).values():
        assert re.fullmatch(r"demo-mnist-pipeline-(train|export|client)-[0-9a-f]{7}", name)


@pytest.mark.parametrize("bad", ["../escape", ".hidden", "-dash", "a b", "a/b", "é", "x" * 65])
def test_run_ids_outside_the_rule_are_refused(bad: str) -> None:
    assert f"run id {bad!r} is not allowed: use 1-64 characters" in refused({"run": {"id": bad}})


def test_run_ids_inside_the_rule_are_accepted() -> None:
    for good in ("prod", "run_1.2-b", "x" * 64):
        assert lint({"run": {"id": good}})["errors"] == []
        assert len(run_id(render({"run": {"id": good}})[0])) <= 64


# Upgrades retrain only when training or export inputs change -----------------------------

SERVING_ONLY = {
    "replicas": {"triton": {"replicas": 3}},
    "args": {
        "triton": {"extraArgs": ["--log-verbose=1"], "extraEnv": [{"name": "A", "value": "b"}]}
    },
    "probes": {"triton": {"readinessProbe": {"periodSeconds": 2, "failureThreshold": 9}}},
    "requests": {"triton": {"resources": {"requests": {"cpu": "500m", "memory": "1Gi"}}}},
    "client": {"client": {"requests": 500, "concurrency": 8}},
    "service": {"triton": {"service": {"annotations": {"a": "b"}}}},
    # The pin writes these into the config Triton serves; no new run.
    "triton-cpus": {"triton": {"resources": {"limits": {"cpu": "4"}}}},
    "instances": {"triton": {"instanceCount": 4}},
    "triton-gpus": {"triton": {"gpus": 1}, "images": {"triton": NVIDIA_TRITON}},
}


@pytest.mark.parametrize("change", SERVING_ONLY)
def test_serving_only_changes_keep_the_run_and_its_jobs(change: str) -> None:
    before, _ = render(merge(PINNED, RWX))
    after, _ = render(merge(PINNED, RWX, SERVING_ONLY[change]), revision=2)
    assert run_id(after) == run_id(before)
    for stage in ("train", "export"):
        assert job_names(after)[stage] == job_names(before)[stage]
    same_client = change != "client"
    assert (job_names(after)["client"] == job_names(before)["client"]) == same_client


@pytest.mark.parametrize(
    "change",
    [
        {"training": {"lr": 0.1}},
        {"training": {"extraEnv": [{"name": "MNIST_PIPELINE_LIMIT_TRAIN", "value": "512"}]}},
        {"export": {"extraEnv": [{"name": "MNIST_PIPELINE_MIN_IMPROVEMENT", "value": "0.01"}]}},
        {"images": {"pipeline": {"tag": "0.3.0"}}},
        {"run": {"id": "other"}},
    ],
)
def test_training_and_export_inputs_make_a_new_run(change: dict[str, Any]) -> None:
    before, _ = render(PINNED)
    after, _ = render(merge(PINNED, change), revision=2)
    assert run_id(after) != run_id(before)
    for stage in ("train", "export", "client"):
        assert job_names(after)[stage] != job_names(before)[stage]


def test_a_job_setting_renames_that_job_but_keeps_the_run() -> None:
    """A Job's pod template is immutable: any change to it needs a new Job name."""
    before, _ = render(PINNED)
    after, _ = render(merge(PINNED, {"training": {"resources": {"limits": {"memory": "5Gi"}}}}))
    assert run_id(after) == run_id(before)
    assert job_names(after)["train"] != job_names(before)["train"]


# ReadWriteOnce on multi-node clusters -----------------------------------------------------


def node_affinity_terms(spec: dict[str, Any]) -> list[dict[str, Any]]:
    return list(
        spec.get("affinity", {})
        .get("podAffinity", {})
        .get("requiredDuringSchedulingIgnoredDuringExecution", [])
    )


def pod_labels(obj: dict[str, Any]) -> dict[str, str]:
    meta = obj["metadata"] if obj["kind"] == "Pod" else obj["spec"]["template"]["metadata"]
    return dict(meta["labels"])


def test_rwo_puts_every_pod_of_the_release_on_one_node() -> None:
    user = {"podAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": []}}
    objects, _ = render({"affinity": {"nodeAffinity": {}, **user}})
    for obj in all_workloads(objects):
        (term,) = node_affinity_terms(pod_spec(obj))
        assert term["topologyKey"] == "kubernetes.io/hostname"
        # Every pod matches every other's term, its own included: the first schedules
        # anywhere, the others follow it.
        for other in all_workloads(objects):
            assert term["labelSelector"]["matchLabels"].items() <= pod_labels(other).items()
        assert "nodeAffinity" in pod_spec(obj)["affinity"]  # the user's own is kept
    for obj in all_workloads(render(RWX)[0]):
        assert node_affinity_terms(pod_spec(obj)) == []


def test_rwo_refuses_more_than_one_triton_replica() -> None:
    assert "ReadWriteMany" in refused({"triton": {"replicas": 2}})
    assert "ReadWriteMany" in refused({"triton": {"autoscaling": {"enabled": True}}})
    install_manifest(merge(RWX, {"triton": {"replicas": 2}}))


@pytest.mark.parametrize("mode", ["ReadOnlyMany", "ReadWriteOncePod"])
def test_schema_allows_only_rwo_and_rwx(mode: str) -> None:
    assert lint({"persistence": {"accessModes": [mode]}})["errors"] != []


# Waiting pods hold capacity ---------------------------------------------------------------

UNITS = {"": 1, "m": 1e-3, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "k": 1e3, "M": 1e6, "G": 1e9}


def quantity(value: str | int | float) -> float:
    number, unit = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", str(value)).groups()  # type: ignore[union-attr]
    return float(number) * UNITS[unit]


def pod_requests(spec: dict[str, Any], resource: str) -> float:
    """What the scheduler reserves: the larger of any initContainer and all containers."""

    def req(c: dict[str, Any]) -> float:
        return quantity(c.get("resources", {}).get("requests", {}).get(resource, 0))

    init = max((req(c) for c in spec.get("initContainers", [])), default=0.0)
    return max(init, sum(req(c) for c in spec["containers"]))


def test_everything_created_at_install_fits_a_2_cpu_4_gib_node() -> None:
    objects = [d for d in yaml.safe_load_all(install_manifest()) if d]
    pods = []
    for obj in objects:
        if obj["kind"] == "Job":
            pods += [pod_spec(obj)] * obj["spec"].get("parallelism", 1)
        elif obj["kind"] == "Deployment":
            pods += [pod_spec(obj)] * obj["spec"]["replicas"]
    assert len(pods) == 4  # train, export, triton, client: all created at install
    cpu = sum(pod_requests(p, "cpu") for p in pods)
    memory = sum(pod_requests(p, "memory") for p in pods)
    # Half a CPU and 1 GiB are left for the node's own pods (a minikube control plane
    # requests 0.75 CPU): documented as the minimum allocatable capacity.
    assert cpu <= 1.25, cpu
    assert memory <= 3 * 2**30, memory / 2**30


def test_priority_class_per_component() -> None:
    objects, _ = render(
        {c: {"priorityClassName": f"{c}-prio"} for c in ("training", "export", "triton")}
    )
    assert pod_spec(find(objects, "Job", "train"))["priorityClassName"] == "training-prio"
    assert pod_spec(find(objects, "Job", "export"))["priorityClassName"] == "export-prio"
    assert pod_spec(find(objects, "Deployment", "triton"))["priorityClassName"] == "triton-prio"
    assert "priorityClassName" not in pod_spec(find(objects, "Job", "client"))


# Deadlines include the wait ---------------------------------------------------------------


@pytest.mark.parametrize("stage", ["export", "client"])
def test_a_deadline_below_the_wait_timeout_is_refused(stage: str) -> None:
    reason = refused({stage: {"activeDeadlineSeconds": 600}})
    assert f"{stage}.activeDeadlineSeconds (600)" in reason and "waits.timeoutSeconds" in reason
    objects, _ = render({stage: {"activeDeadlineSeconds": 30000}})
    assert find(objects, "Job", stage)["spec"]["activeDeadlineSeconds"] == 30000


# Egress policies --------------------------------------------------------------------------


def test_egress_policy_admits_dns_the_api_server_and_the_release() -> None:
    values = {
        "networkPolicy": {"egress": {"enabled": True, "apiServer": {"cidrs": ["10.0.0.5/32"]}}}
    }
    objects, _ = render(values)
    (egress,) = [o for o in objects if o["metadata"]["name"].endswith("-egress")]
    kubernetes_validate.validate(egress, KUBE_VERSION, strict=True)
    assert egress["spec"]["policyTypes"] == ["Egress"]
    rules = egress["spec"]["egress"]
    assert {p["port"] for p in rules[0]["ports"]} == {53}
    assert rules[1]["to"] == [{"ipBlock": {"cidr": "10.0.0.5/32"}}]
    assert {p["port"] for p in rules[1]["ports"]} == {443, 6443}
    assert rules[2]["to"][0]["podSelector"]["matchLabels"]["app.kubernetes.io/instance"] == "demo"
    assert not [o for o in render()[0] if o["metadata"]["name"].endswith("-egress")]


# Exposed Services vs the NetworkPolicy ----------------------------------------------------

INGRESS_HOST = {"host": "mnist.example", "paths": [{"path": "/", "pathType": "Prefix"}]}


@pytest.mark.parametrize(
    "exposure",
    [
        {"triton": {"service": {"type": "NodePort"}}},
        {"triton": {"service": {"type": "LoadBalancer"}}},
        {"triton": {"ingress": {"enabled": True, "hosts": [INGRESS_HOST]}}},
    ],
)
def test_exposing_triton_needs_an_ingress_source(exposure: dict[str, Any]) -> None:
    assert "networkPolicy.tritonIngressFrom" in refused(exposure)
    source = {"networkPolicy": {"tritonIngressFrom": [{"ipBlock": {"cidr": "0.0.0.0/0"}}]}}
    install_manifest(merge(exposure, source))
    install_manifest(merge(exposure, {"networkPolicy": {"enabled": False}}))


def test_service_annotations_and_source_ranges() -> None:
    values = {
        "triton": {
            "service": {
                "type": "LoadBalancer",
                "annotations": {"service.beta.kubernetes.io/aws-load-balancer-internal": "true"},
                "loadBalancerSourceRanges": ["10.0.0.0/8"],
            }
        },
        "networkPolicy": {"tritonIngressFrom": [{"ipBlock": {"cidr": "10.0.0.0/8"}}]},
    }
    service = find(render(values)[0], "Service", "triton")
    assert service["metadata"]["annotations"] == values["triton"]["service"]["annotations"]
    assert service["spec"]["loadBalancerSourceRanges"] == ["10.0.0.0/8"]


# ONNX Runtime threads follow the Triton CPU limit -----------------------------------------


@pytest.mark.parametrize(("limit", "cpus"), [("2", "2"), ("1500m", "1"), ("500m", "1"), (4, "4")])
def test_the_pin_gets_the_triton_cpus_and_instance_count(limit: Any, cpus: str) -> None:
    values = {"triton": {"instanceCount": 3, "resources": {"limits": {"cpu": limit}}}}
    objects, _ = render(values)
    pin, _ = pin_container(values)
    assert arg(pin, "server-cpus") == cpus and arg(pin, "instance-count") == "3"
    assert arg(pin, "instance-kind") == "cpu"
    # Export no longer writes them: changing them neither renames nor re-runs it. Its
    # one setting of its own, the precision, is not given: the CLI's default.
    (export,) = pod_spec(find(objects, "Job", "export"))["containers"]
    assert [e["name"] for e in export["env"]] == [
        "MNIST_PIPELINE_CPU_LIMIT",  # the downward API's limits.cpu, not a setting
    ]


def test_probe_timeouts_and_initial_delays() -> None:
    probe = {
        "initialDelaySeconds": 7,
        "timeoutSeconds": 3,
        "periodSeconds": 4,
        "failureThreshold": 5,
    }
    values = {"triton": {p: probe for p in ("startupProbe", "livenessProbe", "readinessProbe")}}
    (triton,) = pod_spec(find(render(values)[0], "Deployment", "triton"))["containers"]
    for p in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert probe.items() <= triton[p].items()


# RWX permissions: subPath ---------------------------------------------------------------


def test_sub_path_reaches_every_storage_mount() -> None:
    objects, _ = render({"persistence": {"subPath": "teams/mnist"}})
    for obj in all_workloads(objects):
        for c in containers(pod_spec(obj)):
            (mount,) = [m for m in c["volumeMounts"] if m["name"] == "storage"]
            assert mount["subPath"] == "teams/mnist"
    assert lint({"persistence": {"subPath": "../up"}})["errors"] != []


# Subcharts and names ----------------------------------------------------------------


def test_global_values_are_accepted() -> None:
    assert lint({"global": {"imageRegistry": "reg.example"}})["errors"] == []


@pytest.mark.parametrize("release", ["1mnist", "mnist.v2"])
def test_release_names_the_api_server_would_refuse_fail_with_the_reason(release: str) -> None:
    reason = refused({}, release=release)
    assert "DNS-1035" in reason and "fullnameOverride" in reason
    install_manifest({"fullnameOverride": "mnist"}, release=release)


# Triton's command, env and flags ------------------------------------------------------


def tritonserver_help() -> str:
    from mnist_pipeline.serve import locate_tritonserver

    result = subprocess.run(
        [str(locate_tritonserver()), "--help"], capture_output=True, text=True, check=False
    )
    return result.stdout + result.stderr


def test_triton_runs_tritonserver_from_path_with_valid_flags() -> None:
    objects, _ = render({"triton": {"extraEnv": [{"name": "OMP_NUM_THREADS", "value": "1"}]}})
    spec = pod_spec(find(objects, "Deployment", "triton"))
    (triton,) = spec["containers"]
    assert "command" not in triton and triton["args"][0] == "tritonserver"
    assert "--pinned-memory-pool-byte-size=0" in triton["args"]
    # HOME on the writable /tmp: the image's user may have none (NVIDIA's image).
    assert triton["env"] == [
        {"name": "HOME", "value": "/tmp"},
        {"name": "OMP_NUM_THREADS", "value": "1"},
    ]
    for init in spec["initContainers"]:  # the wait and the pin: no torch to pull
        assert init["image"] == "mnist-pipeline/client:0.2.0"
    # Every flag is one the real tritonserver 2.51 (the nvidia-pytriton wheel) knows.
    known = tritonserver_help()
    assert "--pinned-memory-pool-byte-size" in known
    for a in triton["args"][1:]:
        assert f"{a.split('=')[0]} <" in known, a


# NOTES ----------------------------------------------------------------------------------


def test_notes_commands_work_as_printed() -> None:
    _, notes = render()
    logs = [line for line in notes.splitlines() if " logs " in line]
    assert len(logs) == 3
    assert all("--all-containers" in line for line in logs)
    assert "--reuse-values keeps the old values" in notes


# What Triton chart users ask for ------------------------------------------------------------


def test_per_component_pod_settings_and_service_accounts() -> None:
    spread = [{"maxSkew": 1, "topologyKey": "zone", "whenUnsatisfiable": "ScheduleAnyway"}]
    values = merge(
        RWX,
        {
            "nodeSelector": {"pool": "ml"},
            "tolerations": [{"key": "all", "operator": "Exists"}],
            "triton": {
                "podAnnotations": {"prometheus.io/scrape": "true"},
                "podLabels": {"team": "serving"},
                "nodeSelector": {"pool": "gpu"},
                "tolerations": [{"key": "gpu", "operator": "Exists"}],
                "affinity": {"nodeAffinity": {}},
                "topologySpreadConstraints": spread,
                "extraVolumes": [{"name": "cache", "emptyDir": {}}],
                "extraVolumeMounts": [{"name": "cache", "mountPath": "/cache"}],
                "serviceAccount": {"annotations": {"iam.gke.io/gcp-service-account": "x@y"}},
            },
            "training": {"serviceAccount": {"create": False, "name": "trainer"}},
        },
    )
    objects, _ = render(values)
    for obj in objects:
        kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)
    triton = find(objects, "Deployment", "triton")
    spec = pod_spec(triton)
    meta = triton["spec"]["template"]["metadata"]
    assert meta["annotations"]["prometheus.io/scrape"] == "true"
    assert meta["labels"]["team"] == "serving"
    assert spec["nodeSelector"] == {"pool": "gpu"}
    assert [t["key"] for t in spec["tolerations"]] == ["all", "gpu"]
    assert spec["affinity"] == {"nodeAffinity": {}}
    assert spec["topologySpreadConstraints"] == spread
    assert {"name": "cache", "emptyDir": {}} in spec["volumes"]
    assert {"name": "cache", "mountPath": "/cache"} in spec["containers"][0]["volumeMounts"]
    (account,) = [
        o
        for o in objects
        if o["kind"] == "ServiceAccount" and o["metadata"]["name"] == spec["serviceAccountName"]
    ]
    assert account["metadata"]["annotations"] == {"iam.gke.io/gcp-service-account": "x@y"}
    assert pod_spec(find(objects, "Job", "train"))["serviceAccountName"] == "trainer"
    assert pod_spec(find(objects, "Job", "export"))["nodeSelector"] == {"pool": "ml"}


def test_ingress_to_triton_grpc() -> None:
    values = {
        "triton": {
            "ingress": {
                "enabled": True,
                "className": "nginx",
                "annotations": {"nginx.ingress.kubernetes.io/backend-protocol": "GRPC"},
                "hosts": [
                    {"host": "mnist.example", "paths": [{"path": "/", "pathType": "Prefix"}]}
                ],
            }
        },
        "networkPolicy": {"tritonIngressFrom": [{"namespaceSelector": {}}]},
    }
    objects, _ = render(values)
    (ingress,) = [o for o in objects if o["kind"] == "Ingress"]
    kubernetes_validate.validate(ingress, KUBE_VERSION, strict=True)
    backend = ingress["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    assert backend == {"name": "demo-mnist-pipeline-triton", "port": {"name": "grpc"}}


def test_schema_accepts_extended_resources() -> None:
    gpu = {"limits": {"nvidia.com/gpu": 1, "cpu": "2", "memory": "4Gi"}}
    assert lint({"triton": {"resources": gpu}})["errors"] == []
    assert lint({"triton": {"resources": {"limits": {"gpu": 1}}}})["errors"] != []


def test_serve_only_mode_renders_triton_alone() -> None:
    objects, notes = render({"serveOnly": True, "persistence": {"existingClaim": "models"}})
    assert sorted(o["kind"] for o in all_workloads(objects)) == ["Deployment", "Pod"]
    spec = pod_spec(find(objects, "Deployment", "triton"))
    (pin,) = spec["initContainers"]  # no wait: nothing to wait for
    assert arg(pin, "model-version") == "run" and not [a for a in pin["args"] if "--run-id" in a]
    assert spec["volumes"][0]["persistentVolumeClaim"]["claimName"] == "models"
    assert not [o for o in objects if o["kind"] in ("Role", "RoleBinding", "PersistentVolumeClaim")]
    assert "Serve-only" in notes
    for obj in objects:
        kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)


# Multi-worker training, GPUs, Triton scaling ------------------------------------------------

WORKERS = merge(RWX, {"training": {"workers": 3, "batchSize": 96}})  # the global batch splits


def test_multi_worker_training_is_an_indexed_job_with_a_headless_service() -> None:
    objects, _ = render(WORKERS)
    job = find(objects, "Job", "train")
    assert job["spec"]["completionMode"] == "Indexed"
    assert job["spec"]["completions"] == job["spec"]["parallelism"] == 3
    service = find(objects, "Service", "train")
    assert service["spec"]["clusterIP"] == "None"
    spec = pod_spec(job)
    assert spec["subdomain"] == service["metadata"]["name"]
    assert service["spec"]["selector"].items() <= pod_labels(job).items()
    assert service["spec"]["publishNotReadyAddresses"] is True
    (train,) = spec["containers"]
    assert train["command"] == ["mnist-pipeline"] and train["args"][0] == "train"
    assert arg(train, "nnodes") == "3"
    assert arg(train, "node-rank") == "$(JOB_COMPLETION_INDEX)"
    # Worker 0's DNS name: <job name>-0.<service>, the job name from the pod's own label.
    assert arg(train, "master-addr") == f"$(JOB_NAME)-0.{service['metadata']['name']}"
    assert arg(train, "master-port") == "29500"
    # Not given: the CLI's defaults apply (3 restarts of every pod's ranks after a lost
    # one before the pod fails, 600 s, 300 s).
    env = {e["name"]: e.get("value") for e in train["env"]}
    assert "MNIST_PIPELINE_MAX_RESTARTS" not in env
    assert "MNIST_PIPELINE_RENDEZVOUS_TIMEOUT" not in env
    assert "MNIST_PIPELINE_COLLECTIVE_TIMEOUT" not in env
    timeouts = {"rendezvousTimeoutSeconds": 900, "collectiveTimeoutSeconds": 120}
    (given,) = pod_spec(find(render(merge(WORKERS, {"training": timeouts}))[0], "Job", "train"))[
        "containers"
    ]
    env = {e["name"]: e.get("value") for e in given["env"]}
    assert env["MNIST_PIPELINE_RENDEZVOUS_TIMEOUT"] == "900"
    assert env["MNIST_PIPELINE_COLLECTIVE_TIMEOUT"] == "120"
    (job_name,) = [e for e in train["env"] if e["name"] == "JOB_NAME"]
    assert job_name["valueFrom"]["fieldRef"]["fieldPath"] == ("metadata.labels['job-name']")
    # A peer's death makes the others exit 1: that is retried (all resume), not final.
    rules = job["spec"]["podFailurePolicy"]["rules"]
    assert {"containerName": "train", "operator": "In", "values": [2]} in [
        r.get("onExitCodes") for r in rules
    ]
    assert job["spec"]["backoffLimit"] == 9
    # Workers reach each other through the Jobs' NetworkPolicy.
    (jobs_policy,) = [o for o in objects if o["metadata"]["name"].endswith("-jobs")]
    assert (
        jobs_policy["spec"]["ingress"][0]["from"][0]["podSelector"]["matchLabels"][
            "app.kubernetes.io/component"
        ]
        == "train"
    )
    for obj in objects:
        kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)
    # One worker: today's Job.
    single = find(render()[0], "Job", "train")
    assert "completionMode" not in single["spec"]
    assert pod_spec(single)["containers"][0]["command"] == ["mnist-pipeline"]


def test_multi_worker_training_needs_rwx() -> None:
    assert "ReadWriteMany" in refused({"training": {"workers": 2}})


def test_gpus_render_resources_device_and_instance_kind() -> None:
    cuda = {"images": {"pipeline": {"cuda": True}, "triton": NVIDIA_TRITON}, "gpusPerNode": 3}
    objects, _ = render(merge(cuda, {"training": {"gpus": 1}, "triton": {"gpus": 1}}))
    (train,) = pod_spec(find(objects, "Job", "train"))["containers"]
    assert train["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert {"name": "MNIST_PIPELINE_DEVICE", "value": "cuda"} in train["env"]
    (triton,) = pod_spec(find(objects, "Deployment", "triton"))["containers"]
    assert triton["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert not [a for a in triton["args"] if a.startswith("--pinned-memory-pool-byte-size")]
    pin, _ = pin_container(merge(cuda, {"training": {"gpus": 1}, "triton": {"gpus": 1}}))
    assert arg(pin, "instance-kind") == "gpu"
    (cpu_train,) = pod_spec(find(render()[0], "Job", "train"))["containers"]
    assert "nvidia.com/gpu" not in cpu_train["resources"]["limits"]


def test_autoscaling_renders_an_hpa_and_drops_replicas() -> None:
    objects, _ = render(merge(RWX, {"triton": {"autoscaling": {"enabled": True}}}))
    (hpa,) = [o for o in objects if o["kind"] == "HorizontalPodAutoscaler"]
    kubernetes_validate.validate(hpa, KUBE_VERSION, strict=True)
    assert hpa["spec"]["scaleTargetRef"]["name"] == "demo-mnist-pipeline-triton"
    assert hpa["spec"]["metrics"][0]["resource"]["name"] == "cpu"
    assert "replicas" not in find(objects, "Deployment", "triton")["spec"]
    assert [o for o in objects if o["kind"] == "PodDisruptionBudget"]
    default, _ = render()
    assert not [
        o for o in default if o["kind"] in ("HorizontalPodAutoscaler", "PodDisruptionBudget")
    ]


def test_a_pdb_guards_more_than_one_replica() -> None:
    objects, _ = render(merge(RWX, {"triton": {"replicas": 2}}))
    (pdb,) = [o for o in objects if o["kind"] == "PodDisruptionBudget"]
    kubernetes_validate.validate(pdb, KUBE_VERSION, strict=True)
    triton = find(objects, "Deployment", "triton")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels(triton).items()


def test_service_monitor_and_the_scrapers_namespace() -> None:
    objects, _ = render(
        {
            "apiVersions": ["monitoring.coreos.com/v1"],
            "triton": {"serviceMonitor": {"enabled": True}},
        }
    )
    (monitor,) = [o for o in objects if o["kind"] == "ServiceMonitor"]
    # A CRD: no Kubernetes schema to validate against; its shape is asserted here.
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["spec"]["endpoints"] == [
        {"port": "metrics", "path": "/metrics", "interval": "30s"}
    ]
    service = find(objects, "Service", "triton")
    assert (
        monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    )
    policy = find(objects, "NetworkPolicy", "triton")
    scrape = policy["spec"]["ingress"][1]
    assert scrape["from"][0]["namespaceSelector"]["matchLabels"] == {
        "kubernetes.io/metadata.name": "monitoring"
    }
    assert scrape["ports"] == [{"port": "metrics", "protocol": "TCP"}]


# Rollback: pin the served version ---------------------------------------------------------


def pin_container(values: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    spec = pod_spec(find(render(values)[0], "Deployment", "triton"))
    (pin,) = [c for c in spec["initContainers"] if c["name"] == "pin-version"]
    return pin, spec["containers"][0]


def run_pin(pin: dict[str, Any], storage: Path, out: Path) -> subprocess.CompletedProcess[str]:
    """The pin initContainer's command line, its mounts mapped to local folders."""
    assert pin["command"] == ["mnist-pipeline"]
    args = [
        a.replace("=/storage", f"={storage}").replace("=/pinned", f"={out}") for a in pin["args"]
    ]
    return subprocess.run(
        [sys.executable, "-m", "mnist_pipeline", *args], capture_output=True, text=True, timeout=60
    )


def publish_versions(storage: Path, config: tritonconfig.TritonConfig, count: int) -> Path:
    """A repository as export leaves it: `count` versions, config.pbtxt from `config`."""
    model = storage / "models" / "resnet18_mnist"
    for version in range(1, count + 1):
        (model / str(version)).mkdir(parents=True)
        (model / str(version) / "model.onnx").write_bytes(b"onnx")
        sha256 = hashlib.sha256(b"onnx").hexdigest()
        files = {"model.onnx": {"bytes": 4, "sha256": sha256}}  # what pin checks
        meta = {"version": version, "sha256": sha256, "files": files}
        (model / str(version) / "metadata.json").write_text(json.dumps(meta))
    (model / "config.pbtxt").write_text(tritonconfig.render_config(config))
    return model


def served_config(out: Path) -> Any:
    return tritonconfig.parse_config((out / "resnet18_mnist" / "config.pbtxt").read_text())


def test_served_version_pins_triton_to_one_version(tmp_path: Path) -> None:
    storage = tmp_path / "storage"
    model = publish_versions(storage, tritonconfig.TritonConfig(), 3)
    pin, triton = pin_container({"triton": {"servedVersion": 2}})
    assert "--model-repository=/pinned" in triton["args"]
    assert run_pin(pin, storage, tmp_path / "a").returncode == 0
    served = tmp_path / "a" / "resnet18_mnist"
    config = served_config(tmp_path / "a")
    assert list(config.version_policy.specific.versions) == [2]  # Triton's own schema
    assert config.platform == "onnxruntime_onnx" and not config.backend  # NVIDIA's image
    assert sorted(p.name for p in served.iterdir()) == ["2", "config.pbtxt"]
    # A link to the volume's model; the metadata it was checked against, copied.
    assert (served / "2" / "model.onnx").resolve() == (model / "2" / "model.onnx").resolve()
    assert (served / "2" / "metadata.json").read_text() == (
        model / "2" / "metadata.json"
    ).read_text()
    assert sorted(p.name for p in (served / "2").iterdir()) == ["metadata.json", "model.onnx"]

    # The project's image: its python backend runs the project's model.py beside them.
    pin, _ = pin_container({"triton": {"servedVersion": 2}, "images": {"triton": PROJECT_TRITON}})
    assert arg(pin, "triton-backend") == "python"
    assert run_pin(pin, storage, tmp_path / "python").returncode == 0
    config = served_config(tmp_path / "python")
    assert config.backend == "python" and not config.platform
    version = tmp_path / "python" / "resnet18_mnist" / "2"
    assert sorted(p.name for p in version.iterdir()) == ["metadata.json", "model.onnx", "model.py"]
    assert "class TritonPythonModel" in (version / "model.py").read_text()

    # "run" (the default): the version this run's export chose (what `helm rollback`
    # restores), though a newer one is on the volume.
    pin, _ = pin_container({"run": {"id": "old"}})
    assert arg(pin, "model-version") == "run"
    records = model / ".export" / "runs"  # the run's export record, in the repository
    records.mkdir(parents=True)
    (records / f"{arg(pin, 'run-id')}.json").write_text(
        '{"status": "skipped", "version": 1, "model_name": "resnet18_mnist"}'
    )
    assert run_pin(pin, storage, tmp_path / "b").returncode == 0
    assert list(served_config(tmp_path / "b").version_policy.specific.versions) == [1]

    missing, _ = pin_container({"triton": {"servedVersion": 9}})
    result = run_pin(missing, storage, tmp_path / "c")
    assert (
        result.returncode == 1
        and "version 9 is not in" in result.stderr
        and "resnet18_mnist (servable versions: [1, 2, 3])" in result.stderr
    )
    # "": the newest at pod start. Serve-only "run" has no run: the newest too.
    for values in ({"triton": {"servedVersion": ""}}, {"serveOnly": True}):
        pin, _ = pin_container(values)
        out = tmp_path / f"newest-{len(values)}-{'serveOnly' in values}"
        assert run_pin(pin, storage, out).returncode == 0, pin
        assert list(served_config(out).version_policy.specific.versions) == [3]


def test_the_pin_is_idempotent_on_the_same_empty_dir(tmp_path: Path) -> None:
    """Init containers re-run when a pod sandbox is re-created (node reboot): the pin must
    succeed again on the emptyDir it already filled (it raised FileExistsError)."""
    storage = tmp_path / "storage"
    publish_versions(storage, tritonconfig.TritonConfig(), 2)
    out = tmp_path / "pinned"
    for version in (2, 2, 1):
        pin, _ = pin_container({"triton": {"servedVersion": version}})
        result = run_pin(pin, storage, out)
        assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in (out / "resnet18_mnist").iterdir()) == ["1", "config.pbtxt"]
    assert list(served_config(out).version_policy.specific.versions) == [1]


def test_serving_settings_reach_the_served_config_without_a_new_run(tmp_path: Path) -> None:
    """Triton's CPU limit, instanceCount and gpus: written by the pin from the pod's values,
    whatever config.pbtxt export left on the volume (here a KIND_GPU one, 4 instances)."""
    storage = tmp_path / "storage"
    published = tritonconfig.TritonConfig(instance_count=4, instance_kind="gpu", server_cpus=8)
    publish_versions(storage, published, 1)
    gpu = {
        "run": {"id": "prod"},
        "triton": {"gpus": 1, "servedVersion": 1},
        "images": {"triton": NVIDIA_TRITON},
        "gpusPerNode": 2,
    }
    cpu = merge(
        gpu,
        {"triton": {"gpus": 0, "instanceCount": 1, "resources": {"limits": {"cpu": "3"}}}},
    )
    assert run_id(render(gpu)[0]) == run_id(render(cpu)[0])
    for values, kind, count, threads in ((gpu, "KIND_GPU", 2, "1"), (cpu, "KIND_CPU", 1, "3")):
        pin, _ = pin_container(values)
        out = tmp_path / kind
        assert run_pin(pin, storage, out).returncode == 0
        (group,) = served_config(out).instance_group
        assert (
            group.DESCRIPTOR.fields_by_name["kind"].enum_type.values_by_number[group.kind].name,
            group.count,
        ) == (kind, count)
        params = served_config(out).parameters
        assert params["intra_op_thread_count"].string_value == threads
        assert params["inter_op_thread_count"].string_value == "1"


def test_the_client_wait_client_and_helm_test_ask_for_the_served_version() -> None:
    """One answer to "which version": Triton's pin, the client's wait, the client and the
    test pod all follow triton.servedVersion (rollback and pinning)."""
    for served, wanted in (("run", "run"), (3, "3"), ("", "")):
        objects, _ = render({"triton": {"servedVersion": served}})
        pin, _ = pin_container({"triton": {"servedVersion": served}})
        assert arg(pin, "model-version") == wanted
        client = pod_spec(find(objects, "Job", "client"))
        wait = client["initContainers"][0]
        assert arg(wait, "model-version") == wanted
        (infer,) = client["containers"]
        assert arg(infer, "model-version") == wanted
        assert arg(infer, "run-id") == run_id(objects)
        (test,) = find(objects, "Pod")["spec"]["containers"]
        assert arg(test, "model-version") == wanted


# Retention ---------------------------------------------------------------------------------


def test_the_client_job_prunes_within_the_retention_values() -> None:
    values = {
        "retention": {"runs": 2, "versions": 4, "inference": 9},
        "triton": {"servedVersion": 3},
    }
    objects, _ = render(values)
    wait, prune = pod_spec(find(objects, "Job", "client"))["initContainers"]
    assert wait["name"] == "wait-for-serving"
    assert prune["args"][0] == "prune" and arg(prune, "run-id") == run_id(objects)
    assert [arg(prune, k) for k in ("keep-runs", "keep-versions", "keep-inference")] == [
        "2",
        "4",
        "9",
    ]
    assert arg(prune, "keep-version") == "3"  # the pinned version survives
    assert arg(prune, "abandoned-after") == "259200"  # runs left running by an uninstall
    (storage,) = [m for m in prune["volumeMounts"] if m["name"] == "storage"]
    assert not storage.get("readOnly")
    off, _ = render({"retention": {"enabled": False}})
    assert len(pod_spec(find(off, "Job", "client"))["initContainers"]) == 1
