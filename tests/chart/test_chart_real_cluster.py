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
    objects, _ = render(merge(values, {"triton": {"gpus": 1}}), local_images=False)
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
    objects, _ = render({"triton": {"gpus": 1}, "images": {"triton": NVIDIA_TRITON}})
    (triton,) = pod_spec(find(objects, "Deployment", "triton"))["containers"]
    assert triton["resources"]["limits"]["nvidia.com/gpu"] == 1


def test_triton_keeps_the_images_entrypoint_and_a_writable_home() -> None:
    objects, _ = render({"triton": {"gpus": 1}, "images": {"triton": NVIDIA_TRITON}})
    (triton,) = pod_spec(find(objects, "Deployment", "triton"))["containers"]
    # NVIDIA's entrypoint (/opt/nvidia/nvidia_entrypoint.sh) runs the args as a command.
    assert "command" not in triton
    assert triton["args"][0] == "tritonserver"
    assert {"name": "HOME", "value": "/tmp"} in triton["env"]
    assert {"name": "tmp", "mountPath": "/tmp"} in triton["volumeMounts"]
    assert "HOME" in refusal({"triton": {"extraEnv": [{"name": "HOME", "value": "/"}]}})
