"""What a real cluster adds to a render: registries, GPU nodes and their images, placement
under a ReadWriteOnce claim, DNS egress, CPU counts and storage that shows files late.

Each case is a finding of a review against EKS, GKE, OpenShift and kind that renders and
validates today but would fail on such a cluster; these renders fail on the chart before it.
"""

from __future__ import annotations

from typing import Any

import helm_python
import pytest
from test_chart_cluster import NVIDIA_TRITON, merge

from support.chart import containers, find, pod_spec, render, workloads

IMAGES = ("pipeline", "client", "triton")
# One GPU node of one GPU: Triton's, stopped before a new one starts.
GPU_TRITON = {
    "triton": {"gpus": 1, "updateStrategy": "Recreate"},
    "images": {"triton": NVIDIA_TRITON},
}


def refusal(values: dict[str, Any], local_images: bool = True) -> str:
    with pytest.raises(helm_python.HelmError) as e:
        render(values, local_images=local_images)
    return str(e.value)


def images_of(objects: list[dict[str, Any]]) -> set[str]:
    return {c["image"] for o in workloads(objects) for c in containers(pod_spec(o))}


# Images ---------------------------------------------------------------------------------


def test_default_images_are_refused_without_a_registry() -> None:
    """Unqualified names are Docker Hub's: ImagePullBackOff, or someone else's code."""
    message = refusal({}, local_images=False)
    for name in IMAGES:
        assert f'images.{name}.repository "mnist-pipeline/{name}"' in message
    assert "images.registry" in message and "images.localNames=true" in message
    assert message.count("Docker Hub") == 1  # one message for the three images


def test_the_registry_prefixes_every_image_but_one_with_its_own_host() -> None:
    values = {"images": {"registry": "registry.example.com/ml/", "triton": NVIDIA_TRITON}}
    gpu = {"triton": {"gpus": 1, "updateStrategy": "Recreate"}}
    objects, _ = render(merge(values, gpu), local_images=False)
    assert images_of(objects) == {
        "registry.example.com/ml/mnist-pipeline/pipeline:0.2.0",
        "registry.example.com/ml/mnist-pipeline/client:0.2.0",
        "nvcr.io/nvidia/tritonserver:24.10-py3",
    }
    # A repository naming a host (a dot, a port or localhost) needs no registry setting.
    own = {n: {"repository": f"localhost:5000/mnist-pipeline/{n}"} for n in IMAGES}
    objects, _ = render({"images": own}, local_images=False)
    assert all(i.startswith("localhost:5000/") for i in images_of(objects))


def test_kind_accepts_the_local_names_as_built() -> None:
    objects, _ = render({"images": {"localNames": True}}, local_images=False)
    assert images_of(objects) == {f"mnist-pipeline/{n}:0.2.0" for n in IMAGES}


def test_gpu_triton_needs_a_cuda_image() -> None:
    assert "images.triton is the project's CPU-only Triton" in refusal({"triton": {"gpus": 1}})
    objects, _ = render(GPU_TRITON)
    (triton,) = pod_spec(find(objects, "Deployment", "triton"))["containers"]
    assert triton["resources"]["limits"]["nvidia.com/gpu"] == 1


def test_triton_keeps_the_images_entrypoint_and_a_writable_home() -> None:
    objects, _ = render(GPU_TRITON)
    (triton,) = pod_spec(find(objects, "Deployment", "triton"))["containers"]
    # NVIDIA's entrypoint (/opt/nvidia/nvidia_entrypoint.sh) runs the args as a command.
    assert "command" not in triton
    assert triton["args"][0] == "tritonserver"
    assert {"name": "HOME", "value": "/tmp"} in triton["env"]
    assert {"name": "tmp", "mountPath": "/tmp"} in triton["volumeMounts"]
    assert "HOME" in refusal({"triton": {"extraEnv": [{"name": "HOME", "value": "/"}]}})


# Placement ------------------------------------------------------------------------------

GPU_NODE = {"nodeSelector": {"nvidia.com/gpu.present": "true"}}
GPU_TAINT = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]


def test_gpu_placement_on_triton_alone_is_refused_under_rwo() -> None:
    """Every pod requires the first pod's node: a GPU node for Triton alone deadlocks."""
    message = refusal(merge(GPU_TRITON, {"triton": {**GPU_NODE, "tolerations": GPU_TAINT}}))
    assert "triton.nodeSelector/tolerations differ from training's" in message
    assert "at the top level" in message


def test_gpu_placement_at_the_top_level_reaches_every_pod() -> None:
    values = merge(
        GPU_TRITON,
        {**GPU_NODE, "tolerations": GPU_TAINT, "runtimeClassName": "nvidia"},
        {"triton": {"runtimeClassName": "nvidia-cdi"}},
    )
    objects, _ = render(values)
    for o in workloads(objects):
        spec = pod_spec(o)
        assert spec["nodeSelector"] == GPU_NODE["nodeSelector"], o["metadata"]["name"]
        assert spec["tolerations"] == GPU_TAINT
        triton = o["kind"] == "Deployment"
        assert spec["runtimeClassName"] == ("nvidia-cdi" if triton else "nvidia")


@pytest.mark.parametrize(
    ("values", "gpus"),
    [
        # Training's GPU and Triton's, held while it waits for training: two at once.
        ({"training": {"gpus": 1}, "images": {"pipeline": {"cuda": True}}}, 2),
        # The rollout's new pod before the old one stops.
        ({"triton": {"updateStrategy": "RollingUpdate"}}, 2),
    ],
)
def test_more_gpus_on_the_one_node_than_it_has_are_refused(
    values: dict[str, Any], gpus: int
) -> None:
    message = refusal(merge(GPU_TRITON, values))
    assert f"at the peak it needs {gpus} GPUs there" in message
    assert "but gpusPerNode is 1" in message
    # Declared: the node has them.
    render(merge(GPU_TRITON, values, {"gpusPerNode": gpus}))


def test_recreate_stops_the_old_triton_first_and_its_grace_covers_the_shutdown() -> None:
    objects, _ = render(GPU_TRITON)
    deployment = find(objects, "Deployment", "triton")
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    spec = pod_spec(deployment)
    # preStop's 5 s, then tritonserver waits up to 30 s for requests in flight.
    assert spec["terminationGracePeriodSeconds"] >= 5 + 30
    objects, _ = render()
    rolling = find(objects, "Deployment", "triton")["spec"]["strategy"]
    assert rolling["rollingUpdate"] == {"maxUnavailable": 0, "maxSurge": 1}


def test_node_autoscalers_do_not_drain_a_node_under_a_running_job() -> None:
    objects, _ = render()
    for component in ("train", "export"):
        meta = find(objects, "Job", component)["spec"]["template"]["metadata"]
        assert meta["annotations"]["cluster-autoscaler.kubernetes.io/safe-to-evict"] == "false"
        assert meta["annotations"]["karpenter.sh/do-not-disrupt"] == "true"
    triton = find(objects, "Deployment", "triton")["spec"]["template"]["metadata"]
    assert "karpenter.sh/do-not-disrupt" not in triton["annotations"]
