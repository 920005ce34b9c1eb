"""What a real cluster adds to a render: registries, GPU nodes and their images, placement
under a ReadWriteOnce claim, DNS egress, CPU counts and storage that shows files late.

Each case is a finding of a review against EKS, GKE, OpenShift and kind that renders and
validates today but would fail on such a cluster; these renders fail on the chart before it.
"""

from __future__ import annotations

import base64
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import helm_python
import kubernetes_validate
import pytest
import yaml
from test_chart_cluster import RWX, merge

from harness.chart import (
    NVIDIA_TRITON,
    PROJECT_TRITON,
    containers,
    find,
    lint,
    pod_spec,
    render,
    workloads,
)
from harness.ports import free_ports
from harness.serving import pin_test_repository
from mnist_pipeline.serve import LocalTriton

IMAGES = ("pipeline", "client", "triton")
MODEL = "resnet18_mnist"
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
    """Unqualified names are Docker Hub's: ImagePullBackOff, or someone else's code.
    NVIDIA's Triton image, the default, names its registry (nvcr.io)."""
    message = refusal({}, local_images=False)
    for name in ("pipeline", "client"):
        assert f'images.{name}.repository "mnist-pipeline/{name}"' in message
    assert "images.triton" not in message
    assert "images.registry" in message and "images.localNames=true" in message
    message = refusal({"images": {"triton": PROJECT_TRITON}}, local_images=False)
    for name in IMAGES:
        assert f'images.{name}.repository "mnist-pipeline/{name}"' in message
    assert message.count("Docker Hub") == 1  # one message for the three images


def test_the_registry_prefixes_every_image_but_one_with_its_own_host() -> None:
    values = {"images": {"registry": "registry.example.com/ml/"}}
    gpu = {"triton": {"gpus": 1, "updateStrategy": "Recreate"}}
    objects, _ = render(merge(values, gpu), local_images=False)
    assert images_of(objects) == {
        "registry.example.com/ml/mnist-pipeline/pipeline:0.2.0",
        "registry.example.com/ml/mnist-pipeline/client:0.2.0",
        "nvcr.io/nvidia/tritonserver:24.10-py3",
    }
    # The project's Triton image is pushed beside the others.
    objects, _ = render(merge(values, {"images": {"triton": PROJECT_TRITON}}), local_images=False)
    assert "registry.example.com/ml/mnist-pipeline/triton:0.2.0" in images_of(objects)
    # A repository naming a host (a dot, a port or localhost) needs no registry setting.
    own = {n: {"repository": f"localhost:5000/mnist-pipeline/{n}"} for n in IMAGES}
    own["triton"] = {**PROJECT_TRITON, **own["triton"]}
    objects, _ = render({"images": own}, local_images=False)
    assert all(i.startswith("localhost:5000/") for i in images_of(objects))


def test_kind_accepts_the_local_names_as_built() -> None:
    local = {"images": {"localNames": True, "triton": PROJECT_TRITON}}
    objects, _ = render(local, local_images=False)
    assert images_of(objects) == {f"mnist-pipeline/{n}:0.2.0" for n in IMAGES}


def test_the_default_triton_is_nvidias_serving_the_export_as_it_is() -> None:
    """NVIDIA's image has the onnxruntime backend: pin writes the config as exported."""
    objects, _ = render()
    spec = pod_spec(find(objects, "Deployment", "triton"))
    (triton,) = spec["containers"]
    assert triton["image"] == "nvcr.io/nvidia/tritonserver:24.10-py3"
    (pin,) = [c for c in spec["initContainers"] if c["name"] == "pin-version"]
    assert "--triton-backend=onnxruntime" in pin["args"]
    objects, _ = render({"images": {"triton": PROJECT_TRITON}})
    spec = pod_spec(find(objects, "Deployment", "triton"))
    assert spec["containers"][0]["image"] == "mnist-pipeline/triton:0.2.0"
    (pin,) = [c for c in spec["initContainers"] if c["name"] == "pin-version"]
    assert "--triton-backend=python" in pin["args"]


# Each wrong pairing of images.triton and its backend, refused with one message.
WRONG_PAIRINGS = {
    "project image, onnxruntime": (
        {"images": {"triton": {**PROJECT_TRITON, "backend": "onnxruntime"}}},
        'images.triton.repository "mnist-pipeline/triton" is the project\'s CPU image: '
        "it has no onnxruntime backend",
    ),
    "project image from a registry, onnxruntime": (
        {
            "images": {
                "triton": {
                    **PROJECT_TRITON,
                    "repository": "registry.example.com/ml/mnist-pipeline/triton",
                    "backend": "onnxruntime",
                }
            }
        },
        "is the project's CPU image: it has no onnxruntime backend",
    ),
    "NVIDIA's image, python": (
        {"images": {"triton": {**NVIDIA_TRITON, "backend": "python"}}},
        'images.triton.repository "nvcr.io/nvidia/tritonserver" is NVIDIA\'s tritonserver',
    ),
    "python backend on GPUs": (
        {"images": {"triton": PROJECT_TRITON}, "triton": {"gpus": 1, "updateStrategy": "Recreate"}},
        "triton.gpus is 1 (KIND_GPU instances), but images.triton.backend python runs the "
        "model on CPUs only",
    ),
}


@pytest.mark.parametrize("pairing", WRONG_PAIRINGS)
def test_a_wrong_triton_image_and_backend_pairing_is_refused(pairing: str) -> None:
    values, expected = WRONG_PAIRINGS[pairing]
    message = refusal(values)
    assert expected in message
    assert message.count("\n- ") == 1, message  # that one message, nothing else


def test_gpu_triton_needs_a_cuda_image() -> None:
    no_cuda = {"images": {"triton": {"cuda": False}}, "triton": {"gpus": 1}}
    assert "triton.gpus > 0, but images.triton.cuda is false" in refusal(no_cuda)
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


# Network --------------------------------------------------------------------------------

EXPOSED = {
    "triton": {"service": {"type": "LoadBalancer"}},
    "networkPolicy": {"tritonIngressFrom": [{"ipBlock": {"cidr": "10.0.0.0/8"}}]},
}


def dns_rules(values: dict[str, Any]) -> list[dict[str, Any]]:
    objects, _ = render(merge({"networkPolicy": {"egress": {"enabled": True}}}, values))
    (egress,) = [o for o in objects if o["metadata"]["name"].endswith("-egress")]
    return [
        r for r in egress["spec"]["egress"] if {"port": 53, "protocol": "UDP"} in r.get("ports", [])
    ]


def test_dns_egress_presets_reach_each_clusters_dns() -> None:
    (kube_dns,) = dns_rules({})
    assert kube_dns["to"][0]["podSelector"]["matchLabels"] == {"k8s-app": "kube-dns"}
    # OpenShift's DNS pods answer on 5353 behind the Service's 53: the policy sees 5353.
    (openshift,) = dns_rules({"networkPolicy": {"egress": {"dns": {"preset": "openshift"}}}})
    assert {"port": 5353, "protocol": "UDP"} in openshift["ports"]
    assert openshift["to"][0]["namespaceSelector"]["matchLabels"] == {
        "kubernetes.io/metadata.name": "openshift-dns"
    }
    nodelocal = dns_rules({"networkPolicy": {"egress": {"dns": {"preset": "nodelocal"}}}})
    assert [r["to"][0].get("ipBlock") for r in nodelocal] == [{"cidr": "169.254.20.10/32"}, None]
    own = {"to": [{"ipBlock": {"cidr": "10.96.0.10/32"}}], "ports": [53, 1053]}
    (custom,) = dns_rules({"networkPolicy": {"egress": {"dns": {"preset": "custom", **own}}}})
    assert custom["to"] == own["to"] and {"port": 1053, "protocol": "TCP"} in custom["ports"]
    empty = {"networkPolicy": {"egress": {"enabled": True, "dns": {"preset": "custom"}}}}
    assert "dns.to or dns.ports is empty" in refusal(empty)


def restricted_args(values: dict[str, Any]) -> list[str]:
    objects, _ = render(values)
    (triton,) = pod_spec(find(objects, "Deployment", "triton"))["containers"]
    return [a for a in triton["args"] if "restricted" in a]


def test_an_exposed_triton_restricts_its_admin_apis_in_the_real_server(
    test_repository: Path, tmp_path: Path
) -> None:
    assert restricted_args({}) == []  # reached by the release's pods alone
    args = restricted_args(EXPOSED)
    assert len(args) == 2
    objects, _ = render(EXPOSED)
    (secret,) = [o for o in objects if o["kind"] == "Secret"]
    assert len(base64.b64decode(secret["data"]["admin-key"])) == 40
    # The kubelet expands $(TRITON_ADMIN_KEY) from that Secret; here, a known value.
    key = "k" * 40
    http, grpc, metrics = free_ports(3)
    expanded = [a.replace("$(TRITON_ADMIN_KEY)", key) for a in args]
    served = pin_test_repository(test_repository, tmp_path / "served")
    with LocalTriton(
        served, tmp_path, http_port=http, grpc_port=grpc, metrics_port=metrics,
        extra_args=expanded,
    ) as server:  # fmt: skip
        base = f"http://127.0.0.1:{server.http_port}"
        index = f"{base}/v2/repository/index"
        assert status(index, b"{}") == 403
        assert status(index, b"{}", {"triton-admin-key": key}) == 200
        assert status(f"{base}/v2/logging") == 403
        assert status(f"{base}/v2/models/{MODEL}/ready") == 200  # inference stays open
        import tritonclient.grpc as grpcclient
        from tritonclient.utils import InferenceServerException

        client = grpcclient.InferenceServerClient(server.grpc_url)
        with pytest.raises(InferenceServerException, match=r"restricted|PERMISSION_DENIED"):
            client.get_model_repository_index()
        assert client.is_model_ready(MODEL)
        # Over gRPC Triton expects the header with a prefix of its own (2.51).
        grpc_header = {"triton-grpc-protocol-triton-admin-key": key}
        assert client.get_model_repository_index(headers=grpc_header)


def status(url: str, body: bytes | None = None, headers: dict[str, str] | None = None) -> int:
    request = urllib.request.Request(url, data=body, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return int(response.status)
    except urllib.error.HTTPError as e:
        return e.code


# CPUs -----------------------------------------------------------------------------------


def test_training_and_export_get_their_cpu_limit_from_the_downward_api() -> None:
    """No pod depends on reading cgroups (v1 nodes report the quota elsewhere)."""
    objects, _ = render({"training": {"workers": 2}, **RWX})
    limit = {
        "name": "MNIST_PIPELINE_CPU_LIMIT",
        "valueFrom": {"resourceFieldRef": {"resource": "limits.cpu", "divisor": "1"}},
    }
    for component in ("train", "export"):
        spec = pod_spec(find(objects, "Job", component))
        (main,) = spec["containers"]
        assert limit in main["env"], component
    extra = {"export": {"extraEnv": [{"name": "MNIST_PIPELINE_CPU_LIMIT", "value": "8"}]}}
    assert "export.extraEnv sets MNIST_PIPELINE_CPU_LIMIT" in refusal(extra)


# First install on EKS / GKE / OpenShift / kind -------------------------------------------

EXAMPLES = Path(__file__).resolve().parents[2] / "deploy" / "helm" / "values"


@pytest.mark.parametrize("cluster", ["eks", "gke", "openshift", "kind"])
def test_each_clusters_values_example_installs_as_printed(cluster: str) -> None:
    """The files docs/KUBERNETES.md's first-install section names, with the --set its
    command line adds: they render, validate against the API's schema and pass lint."""
    values = yaml.safe_load((EXAMPLES / f"{cluster}.yaml").read_text())
    header = (EXAMPLES / f"{cluster}.yaml").read_text()
    if cluster != "kind":
        assert "--set images.registry=" in header
        values = merge(values, {"images": {"registry": "registry.example.com/ml"}})
    objects, notes = render(values, local_images=False)
    for obj in objects:
        kubernetes_validate.validate(obj, "1.30.0", strict=True)
    result = lint(values)
    assert result["errors"] == [] and not [m for m in result["messages"] if m["severity"] > 1]
    claim = find(objects, "PersistentVolumeClaim")
    if cluster in ("eks", "gke"):
        assert claim["spec"]["storageClassName"] == values["persistence"]["storageClass"]
        assert "names no storageClass" not in notes
    else:
        assert "names no storageClass" in notes
    if cluster == "openshift":
        for o in workloads(objects):
            assert "runAsUser" not in pod_spec(o)["securityContext"]
