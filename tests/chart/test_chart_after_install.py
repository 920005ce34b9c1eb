"""The chart after install, at render level: refusals with their reasons, numbers
as the API server and the CLI read them, Job names that survive a chart version bump, the
upgrade's peak requests, OpenShift's arbitrary uid, Triton's preStop pause; and the
multi-worker settings check, run from its rendered command line."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import helm_python
import kubernetes_validate
import pytest
import yaml
from test_chart_cluster import RWX, job_names, merge, pod_requests, refused

from harness.chart import (
    CHART,
    KUBE_VERSION,
    REPO,
    arg,
    find,
    install_manifest,
    pod_spec,
    render,
    with_local_images,
)

# Settings every rank would reject: the train container refuses them before torchrun -------

WORKERS = merge(RWX, {"training": {"workers": 2}})


def train_container(values: dict[str, Any], storage: Path) -> subprocess.CompletedProcess[str]:
    """Run worker 0's train container as rendered (env and args, the pod's fields filled)."""
    job = find(render(values)[0], "Job", "train")
    (train,) = pod_spec(job)["containers"]
    assert train["command"] == ["mnist-pipeline"]
    env = {e["name"]: e["value"] for e in train["env"] if "value" in e}
    fields = {"$(JOB_COMPLETION_INDEX)": "0", "$(JOB_NAME)": "train"}
    args = [a.replace("=/storage", f"={storage}") for a in train["args"]]
    for field, value in fields.items():
        args = [a.replace(field, value) for a in args]
    return subprocess.run(
        [sys.executable, "-m", "mnist_pipeline", *args],
        env={"PATH": os.environ["PATH"], "PYTHONPATH": str(REPO / "src"), **env},
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_torchrun_workers_check_their_settings_first_and_exit_2(tmp_path: Path) -> None:
    """torchrun turns a rank's exit 2 into 1 (retried, backoffLimit × workers times): the
    train container checks the settings before it starts torchrun, and its exit 2 fails
    the Job at once."""
    job = find(render(WORKERS)[0], "Job", "train")
    rules = [
        r["onExitCodes"] for r in job["spec"]["podFailurePolicy"]["rules"] if "onExitCodes" in r
    ]
    assert {"containerName": "train", "operator": "In", "values": [2]} in rules
    assert [c["name"] for c in pod_spec(job)["initContainers"]] == ["seed-data"]
    # What the render cannot see: extraEnv. 3 images over 2 workers is 1 per rank a step.
    tiny = merge(
        WORKERS, {"training": {"extraEnv": [{"name": "MNIST_PIPELINE_LIMIT_TRAIN", "value": "3"}]}}
    )
    bad = train_container(tiny, tmp_path)
    assert bad.returncode == 2, bad.stderr
    assert "at least 4 images" in bad.stderr
    assert "torch.distributed" not in bad.stderr  # refused before torchrun started
    assert not (tmp_path / "checkpoints").exists()


@pytest.mark.parametrize(
    ("values", "env", "reason"),
    [
        (
            merge(WORKERS, {"training": {"batchSize": 129}}),
            ("MNIST_PIPELINE_BATCH_SIZE", "129"),
            "must split evenly over 2 ranks",
        ),
        (
            merge(WORKERS, {"training": {"batchSize": 2}}),
            ("MNIST_PIPELINE_BATCH_SIZE", "2"),
            "at least 4 images",
        ),
        (
            merge(WORKERS, {"training": {"syncBatchNorm": True}}),
            ("MNIST_PIPELINE_SYNC_BN", "true"),
            "--sync-bn needs CUDA",
        ),
    ],
)
def test_settings_every_rank_rejects_reach_the_train_container_unchanged(
    values: dict[str, Any], env: tuple[str, str], reason: str, tmp_path: Path
) -> None:
    """The chart renders them as given; the train container, before it starts torchrun,
    refuses them with the CLI's own message (exit 2: the Job fails at once)."""
    job = find(render(values)[0], "Job", "train")
    for container in pod_spec(job)["containers"]:
        assert {"name": env[0], "value": env[1]} in container["env"], container["name"]
    refused_here = train_container(values, tmp_path)
    assert refused_here.returncode == 2, refused_here.stderr
    assert reason in refused_here.stderr


# A retraining upgrade fits a 2-CPU kind node --------------------------------------------

KIND_NODE_FREE_CPU = 2 - 0.95  # kind's control plane requests about 0.95 CPU


def test_the_upgrade_peak_fits_a_2_cpu_kind_node() -> None:
    """During a retraining upgrade the old Triton keeps serving while the surge Triton, the
    new train, export and client pods all exist (the later ones waiting): every request
    counts at once. If training were the pod that did not fit, the others would hold their
    requests waiting for it until their waits time out."""
    objects = [d for d in yaml.safe_load_all(install_manifest()) if d]
    triton = find(objects, "Deployment", "triton")
    surge = triton["spec"]["strategy"]["rollingUpdate"]["maxSurge"]
    pods = [pod_spec(o) for o in objects if o["kind"] == "Job"]
    pods += [pod_spec(triton)] * (triton["spec"]["replicas"] + surge)
    assert len(pods) == 5
    peak = sum(pod_requests(p, "cpu") for p in pods)
    assert peak <= KIND_NODE_FREE_CPU, peak
    assert sum(pod_requests(p, "memory") for p in pods) <= 3 * 2**30


# OpenShift: restricted-v2 assigns the uid and fsGroup itself ------------------------------


def test_run_as_user_and_fs_group_can_be_left_to_the_platform() -> None:
    unset = {"podSecurityContext": {"runAsUser": None, "runAsGroup": None, "fsGroup": None}}
    objects, _ = render(unset)
    for obj in objects:
        kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)
        if obj["kind"] in ("Job", "Deployment", "Pod"):
            context = pod_spec(obj)["securityContext"]
            assert not {"runAsUser", "runAsGroup", "fsGroup"} & set(context), context
            assert context["runAsNonRoot"] is True


# Large integers as integers --------------------------------------------------------------


def test_large_integers_render_without_scientific_notation() -> None:
    big = 2_000_000
    values = {
        "training": {
            "checkpointEvery": 1_000_000,
            "epochs": 1000,
            "activeDeadlineSeconds": big,
            "ttlSecondsAfterFinished": big,
        },
        "export": {"activeDeadlineSeconds": big + 1, "ttlSecondsAfterFinished": big},
        "client": {"requests": 1_000_000, "activeDeadlineSeconds": big + 1},
        "waits": {"timeoutSeconds": big},
        "tests": {"requests": 1_000_000},
        "retention": {"runs": 1_000_000},
    }
    manifest = install_manifest(values)
    objects, _ = render(values)
    text = manifest + yaml.safe_dump_all(objects)
    assert "e+0" not in text
    train = find(objects, "Job", "train")
    env = {e["name"]: e["value"] for e in pod_spec(train)["containers"][0]["env"] if "value" in e}
    assert (
        env["MNIST_PIPELINE_CHECKPOINT_EVERY"] == "1000000"
        and env["MNIST_PIPELINE_EPOCHS"] == "1000"
    )
    assert train["spec"]["activeDeadlineSeconds"] == big
    client = pod_spec(find(objects, "Job", "client"))
    assert arg(client["containers"][0], "requests") == "1000000"
    assert arg(client["initContainers"][0], "wait-timeout") == str(big)
    assert arg(client["initContainers"][1], "keep-runs") == "1000000"
    (test,) = find(objects, "Pod")["spec"]["containers"]
    assert arg(test, "requests") == "1000000"
    pinned, _ = render({"triton": {"servedVersion": 1_000_000}})
    _, pin = pod_spec(find(pinned, "Deployment", "triton"))["initContainers"]
    assert arg(pin, "model-version") == "1000000"


# Combinations the API server refuses, or that hang ---------------------------------------


@pytest.mark.parametrize(
    ("values", "reason"),
    [
        (
            {
                "triton": {"ingress": {"enabled": True}},
                "networkPolicy": {"tritonIngressFrom": [{"namespaceSelector": {}}]},
            },
            "needs at least one entry in triton.ingress.hosts",
        ),
        (
            merge(RWX, {"triton": {"autoscaling": {"enabled": True, "minReplicas": 5}}}),
            "minReplicas (5) is above maxReplicas (4)",
        ),
        (
            {"training": {"resources": {"requests": {"cpu": "3"}}}},
            "training.resources: the cpu request (3) is above its limit (2)",
        ),
        (
            {"triton": {"resources": {"requests": {"memory": "3Gi"}}}},
            "triton.resources: the memory request (3Gi) is above its limit (2Gi)",
        ),
        (
            {"waits": {"resources": {"requests": {"cpu": "200m"}}}},
            "waits.resources: the cpu request (200m) is above its limit (100m)",
        ),
        (
            {"training": {"gradientCompression": "fp16"}},
            "training.gradientCompression fp16 compresses what the workers send each other: "
            "it needs training.workers > 1",
        ),
    ],
)
def test_combinations_the_api_server_refuses_fail_with_the_reason(
    values: dict[str, Any], reason: str
) -> None:
    assert reason in refused(values)


def test_every_refusal_is_reported_in_one_failure() -> None:
    """Like bitnami's validateValues: all the reasons at once, not one per attempt."""
    values = merge(
        RWX,
        {
            "triton": {
                "ingress": {"enabled": True},
                "autoscaling": {"enabled": True, "minReplicas": 5},
            },
            "training": {"resources": {"requests": {"cpu": "3"}}},
            "export": {"activeDeadlineSeconds": 60},
            "persistence": {"size": "lots"},
        },
    )
    reasons = refused(values)
    assert reasons.count("VALUES VALIDATION") == 1
    for reason in (
        "needs at least one entry in triton.ingress.hosts",
        "the NetworkPolicy admits only this release's pods",
        "minReplicas (5) is above maxReplicas (4)",
        "training.resources: the cpu request (3) is above its limit (2)",
        "export.activeDeadlineSeconds (60) counts the wait",
        'persistence.size "lots" is not a Kubernetes quantity',
    ):
        assert reason in reasons


def test_an_extra_variable_that_shadows_one_the_chart_sets_is_refused() -> None:
    """training.extraEnv could set a second MNIST_PIPELINE_EPOCHS: the last one won, silently."""
    reasons = refused(
        {
            "training": {"extraEnv": [{"name": "MNIST_PIPELINE_EPOCHS", "value": "3"}]},
            "export": {"extraEnv": [{"name": "MNIST_PIPELINE_PRECISION", "value": "int8"}]},
            "client": {"extraEnv": [{"name": "A", "value": "1"}, {"name": "A", "value": "2"}]},
        }
    )
    assert "training.extraEnv sets MNIST_PIPELINE_EPOCHS, which the chart already sets" in reasons
    assert "export.extraEnv sets MNIST_PIPELINE_PRECISION, which the chart already sets" in reasons
    assert "client.extraEnv sets A twice" in reasons
    objects, _ = render(
        {"training": {"extraEnv": [{"name": "MNIST_PIPELINE_LIMIT_TRAIN", "value": "9"}]}}
    )
    env = pod_spec(find(objects, "Job", "train"))["containers"][0]["env"]
    assert {"name": "MNIST_PIPELINE_LIMIT_TRAIN", "value": "9"} in env


def test_a_latest_tag_is_refused_naming_the_rule() -> None:
    reason = refused({"images": {"triton": {"tag": "latest"}}})
    assert 'images.triton.tag is "latest", a tag that moves' in reason
    assert "set a version tag or images.triton.digest" in reason
    install_manifest({"images": {"triton": {"tag": "latest", "digest": "sha256:" + "a" * 64}}})


def test_an_empty_claim_is_refused() -> None:
    assert "persistence.size must be above 0" in refused({"persistence": {"size": "0Gi"}})


def test_requests_equal_to_limits_and_extended_resources_pass() -> None:
    same = {"cpu": "1500m", "memory": "1536Mi", "nvidia.com/gpu": 1}
    values = {"triton": {"resources": {"requests": same, "limits": {**same, "cpu": 1.5}}}}
    install_manifest(values)


# GPUs need a CUDA build of the pipeline image -------------------------------------------


def test_training_gpus_need_a_cuda_pipeline_image() -> None:
    assert "images.pipeline.cuda: true" in refused({"training": {"gpus": 1}})
    cuda = {"images": {"pipeline": {"repository": "me/pipeline-cuda", "cuda": True}}}
    install_manifest(merge(cuda, {"training": {"gpus": 1}}))


# A chart version bump renames no Job and rolls no pod ------------------------------------


def render_chart(chart: Path, values: dict[str, Any]) -> list[dict[str, Any]]:
    with helm_python.Chart.load(str(chart)) as loaded:
        files = loaded.render(values, name="demo", namespace="ml", revision=2, is_upgrade=True)
    return [
        d
        for p, t in files.items()
        if not p.endswith("NOTES.txt")
        for d in yaml.safe_load_all(t)
        if d
    ]


def test_a_chart_version_bump_keeps_job_names_and_pod_templates(tmp_path: Path) -> None:
    pinned = with_local_images({"run": {"id": "prod"}})
    bumped = tmp_path / "mnist-pipeline"
    shutil.copytree(CHART, bumped)
    meta = yaml.safe_load((bumped / "Chart.yaml").read_text())
    meta["version"], meta["appVersion"] = "9.9.9", "9.9.9"
    (bumped / "Chart.yaml").write_text(yaml.safe_dump(meta))
    before, after = render_chart(CHART, pinned), render_chart(bumped, pinned)
    assert job_names(after) == job_names(before)
    templates = [find(o, "Deployment", "triton")["spec"]["template"] for o in (before, after)]
    assert templates[0] == templates[1]
    # The objects themselves still say which chart made them.
    assert (
        find(after, "Job", "train")["metadata"]["labels"]["helm.sh/chart"] == "mnist-pipeline-9.9.9"
    )


# Triton keeps serving while endpoints drop it ---------------------------------------------


def test_triton_pauses_before_sigterm() -> None:
    objects, _ = render()
    spec = pod_spec(find(objects, "Deployment", "triton"))
    (triton,) = spec["containers"]
    command = triton["lifecycle"]["preStop"]["exec"]["command"]
    assert command == ["sleep", "5"]
    assert int(command[1]) < spec.get("terminationGracePeriodSeconds", 30)
    off = pod_spec(find(render({"triton": {"preStopSleepSeconds": 0}})[0], "Deployment", "triton"))
    assert "lifecycle" not in off["containers"][0]


# GitOps without run.id, and RWX without a class: said where the user reads it ------------


def test_notes_warn_about_an_unpinned_run_and_rwx_without_a_class() -> None:
    _, notes = render()
    assert "run.id is not set" in notes and "For GitOps set run.id" in notes
    _, pinned = render({"run": {"id": "prod"}})
    assert "run.id is not set" not in pinned
    _, rwx = render(RWX)
    assert "ReadWriteMany with no persistence.storageClass" in rwx
    _, named = render(merge(RWX, {"persistence": {"storageClass": "efs"}}))
    assert "WARNING" not in named and "WARNING" not in notes
