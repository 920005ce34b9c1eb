"""Render the Helm chart offline (helm-python-sdk, the Helm v4 library) for the tests."""

from __future__ import annotations

from typing import Any

import helm_python
import yaml

from harness import REPO
from mnist_pipeline import __version__

CHART = REPO / "deploy" / "helm" / "mnist-pipeline"
KUBE_VERSION = "1.30.0"
# The tests run the images `make images` builds and loads, as on kind: the chart refuses
# those registry-less names unless told (its default, for real clusters, is to refuse).
LOCAL_IMAGES: dict[str, Any] = {"images": {"localNames": True}}
# images.triton: NVIDIA's image (the chart's default) serves the exported repository as it
# is, on CPUs or GPUs; the project's CPU image (docker/triton.Dockerfile, what `make images`
# builds) serves it through Triton's python backend.
NVIDIA_TRITON: dict[str, Any] = {
    "repository": "nvcr.io/nvidia/tritonserver",
    "tag": "24.10-py3",
    "cuda": True,
    "backend": "onnxruntime",
}
PROJECT_TRITON: dict[str, Any] = {
    "repository": "mnist-pipeline/triton",
    "tag": __version__,
    "cuda": False,
    "backend": "python",
}


def with_local_images(values: dict[str, Any] | None) -> dict[str, Any]:
    """`values` over LOCAL_IMAGES: what the tests render unless they test the refusal."""
    merged = {**LOCAL_IMAGES, **(values or {})}
    merged["images"] = {**LOCAL_IMAGES["images"], **(values or {}).get("images", {})}
    return merged


def lint(values: dict[str, Any] | None = None, namespace: str = "ml") -> dict[str, Any]:
    return helm_python.lint(
        str(CHART),
        with_local_images(values),
        strict=True,
        kube_version=f"v{KUBE_VERSION}",
        namespace=namespace,
    )


def install_manifest(
    values: dict[str, Any] | None = None, release: str = "demo", namespace: str = "ml"
) -> str:
    """What `helm install --dry-run=client` would apply, in Helm's install order."""
    with helm_python.Config(storage_driver="memory", namespace=namespace) as config:
        rendered = config.install(str(CHART), release, with_local_images(values), dry_run="client")
    return str(rendered["manifest"])


def render(
    values: dict[str, Any] | None = None,
    release: str = "demo",
    namespace: str = "ml",
    revision: int = 1,
    local_images: bool = True,
) -> tuple[list[dict[str, Any]], str]:
    """Every object the chart renders, hooks (helm test) included, and the NOTES."""
    with helm_python.Chart.load(str(CHART)) as chart:
        files = chart.render(
            with_local_images(values) if local_images else values or {},
            name=release,
            namespace=namespace,
            revision=revision,
            is_install=revision == 1,
            is_upgrade=revision > 1,
        )
    objects: list[dict[str, Any]] = []
    notes = ""
    for path, text in sorted(files.items()):
        if path.endswith("NOTES.txt"):
            notes = text
            continue
        objects += [doc for doc in yaml.safe_load_all(text) if doc]
    return objects, notes


def find(objects: list[dict[str, Any]], kind: str, component: str | None = None) -> dict[str, Any]:
    found = [
        o
        for o in objects
        if o["kind"] == kind
        and (
            component is None
            or o["metadata"]["labels"].get("app.kubernetes.io/component") == component
        )
    ]
    assert len(found) == 1, f"expected one {kind} {component or ''}, found {len(found)}"
    return found[0]


def pod_spec(obj: dict[str, Any]) -> dict[str, Any]:
    if obj["kind"] == "Pod":
        return dict(obj["spec"])
    return dict(obj["spec"]["template"]["spec"])


def workloads(objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] in ("Job", "Deployment", "Pod")]


def containers(spec: dict[str, Any]) -> list[dict[str, Any]]:
    return [*spec.get("initContainers", []), *spec["containers"]]


def arg(container: dict[str, Any], name: str) -> str:
    """The value of --name=value in a container's args."""
    values = [a.split("=", 1)[1] for a in container["args"] if a.startswith(f"--{name}=")]
    assert len(values) == 1, f"{container['name']}: --{name} given {len(values)} times"
    return values[0]
