"""Rehearse the chart: its own command lines drive the whole pipeline, in two ways.

Each container's command, args and env are taken from the rendered manifests and they run
in the chart's order, with the project's Triton image (images.triton.backend python: the
pin writes the repository for Triton's python backend; NVIDIA's image, the chart's default,
cannot be pulled here), either

- as host processes (`host`): /storage is rewritten to a temporary folder; the
  tritonserver container runs the real `tritonserver` 2.51 of the nvidia-pytriton wheel,
  the image's: its python backend assembled from the wheel (`wheel_server`), with the
  rendered args and env and what that server needs besides (its backend directory, library
  path, and this environment's ONNX Runtime). The pods that talk to each other (Triton's,
  the client's, helm test's) each get a network namespace and address of their own and the
  kubelet's resolv.conf; a real dnsmasq resolves the Services' names to them
  (pod_network). Triton listens on its rendered ports, and the probes, the waits and the
  client reach it by address and name as on a cluster; or
- in the built images (`container`, a real dockerd: harness/engine.py), as the kubelet
  would run them: the rendered image, command (else the image's entrypoint), args, env,
  user, group and fsGroup, read-only root filesystem, dropped capabilities, no privilege
  escalation, CPU and memory limits (no swap: past its limit a container is OOM-killed, as
  on a node), the claim as one folder mounted where the pod mounts it (writable to fsGroup),
  each pod's emptyDirs its own. Containers share the host's network (never a bridge): the
  Services' addresses are rewritten to Triton's local ports on 127.0.0.1. A wrong user,
  entrypoint, missing writable path or missing file in an image fails it.

What only a cluster gives is left out: the service account token (the waits then read
storage alone), scheduling, volume drivers, admission, kube-proxy (a Service's port must
be its pod's).

A flag tritonserver rejects fails the rehearsal. The waits (initContainers), helm test's
included, are started FIRST, before what they wait for, and must hold until their stage is
done, then let it through. Triton's startup, liveness and readiness probes are requested as
rendered (path, named port) and must answer 200, readiness once the model is ready.

With `training.workers: 2` the train Job is Indexed: both worker pods run at once, with
what Kubernetes gives them (JOB_COMPLETION_INDEX, the job-name label, `$(VAR)` expanded in
args) and the pod names cluster DNS would resolve through the headless Service mapped to
127.0.0.1, so the rendered torchrun command lines rendezvous for real. Worker 1's pod is
lost mid-run (every process in it SIGKILLed, its container killed) and a new pod for its
index joins: the run completes, and export's wait never gives up meanwhile.

An upgrade (a new run id on the same volume, its waits ignoring the first run's
artifacts, export publishing version 2, the new Triton serving it) is rehearsed once, as
host processes, by test_rehearsal_flows.py.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from harness.chart import PROJECT_TRITON, REPO, arg, containers, find, pod_spec, render
from harness.engine import Container, Engine, cpus, memory
from harness.objectstore import LocalRadosgw
from harness.ports import free_ports
from harness.processes import kill_tree
from harness.replicas import Network, require_tools
from mnist_pipeline.serve import wheel_server

pytestmark = pytest.mark.slow

Running = subprocess.Popen[bytes] | Container

# Every trained model here must clear the helm test's floor by a wide margin on any CPU:
# 8 steps (512 images) scored 0.098 on an AMD EPYC where a Xeon had passed, so each
# training below takes at least 48 steps. Measured on the AMD EPYC (2 cores), accuracy on
# the 10 000 test images: 3072 images 0.923, 6144 images 0.964, two ranks on 1024 images
# for 2 epochs 0.807 (on 1000); the floor, 0.5, is five times chance.
VALUES: dict[str, Any] = {
    "training": {
        "epochs": 1,
        "batchSize": 64,
        "extraEnv": [{"name": "MNIST_PIPELINE_LIMIT_TRAIN", "value": "3072"}],
    },
    "client": {"requests": 20, "concurrency": 2},
    "tests": {"requests": 5, "minAccuracy": 0.5, "waitTimeoutSeconds": 600},
    "waits": {"intervalSeconds": 1, "timeoutSeconds": 600},
    # A valid tritonserver flag that no wrapper knows: it must reach the server untouched.
    "triton": {"extraArgs": ["--pinned-memory-pool-byte-size=0"]},
    # The project's CPU image, which the engine builds (and the host variant stands for).
    "images": {"triton": PROJECT_TRITON},
}


@pytest.fixture(params=["host", "container"])
def engine(request: pytest.FixtureRequest) -> Engine | None:
    """How each pod runs: None, as host processes; else in the built images."""
    if request.param == "host":
        return None
    return request.getfixturevalue("container_engine")


@pytest.fixture
def pod_network() -> Iterator[Network | None]:
    """The pods that talk to each other (Triton's, the client's, helm test's) each in a
    network namespace of its own, the Services' names resolved to them by a real dnsmasq on
    the bridge (port 53, as resolv.conf requires): a wrong port, a loopback-only bind or a
    wrong name fails as on a cluster. Where the machine cannot (not root, no iproute2 or
    dnsmasq) all share its loopback, except in CI, where that fails."""
    try:
        require_tools()
    except (PermissionError, FileNotFoundError) as error:
        if os.environ.get("CI") == "true":
            pytest.fail(f"the rehearsal's pod network must run in CI: {error}")
        yield None
        return
    subnet = f"10.79.{random.randrange(1, 250)}"
    with Network("mpr", subnet, dns_address="gateway", dns_port=53) as network:
        yield network


class Rehearsal:
    def __init__(
        self,
        storage: Path,
        logs: Path,
        objects: list[dict[str, Any]],
        engine: Engine | None,
        secrets: dict[str, dict[str, str]] | None = None,
        network: Network | None = None,
    ) -> None:
        self.storage = storage
        self.secrets = secrets or {}
        self.logs = logs
        self.logs.mkdir(parents=True)
        self.engine = engine
        self.empty_dirs: dict[tuple[int, str], Path] = {}
        self.tmp = logs / "tmp"
        self.tmp.mkdir()
        self.objects = objects
        assert network is None or engine is None, "pods in namespaces run as host processes"
        self.network = network
        self.pod_netns: dict[int, tuple[str, str]] = {}  # id(pod) → (namespace, address)
        triton = pod_spec(find(objects, "Deployment", "triton"))["containers"][0]
        self.addresses: dict[str, str] = {}
        if network is not None:
            # Placed pods have ports and names of their own (place()): nothing to rewrite.
            self.local_port = {p["containerPort"]: p["containerPort"] for p in triton["ports"]}
        else:
            self._local_services(objects, triton)
        # Every pod name the cluster DNS would resolve (a multi-worker Job's): this machine.
        self.addresses |= dict.fromkeys(dns_names(objects), "127.0.0.1")
        self.env = {
            "PATH": os.environ["PATH"],
            "HOME": str(logs),
            "PYTHONPATH": str(REPO / "src"),
        }

    def _local_services(self, objects: list[dict[str, Any]], triton: dict[str, Any]) -> None:
        """Triton on free local ports, and the Services' addresses rewritten to them."""
        service = find(objects, "Service", "triton")
        local = dict(zip(("http", "grpc", "metrics"), free_ports(3), strict=True))
        self.local_port = {p["containerPort"]: local[p["name"]] for p in triton["ports"]}
        host = f"{service['metadata']['name']}.{service['metadata']['namespace']}.svc"
        # The Service's address → the port the local Triton listens on for that target.
        self.addresses = {
            f"{host}:{p['port']}": f"127.0.0.1:{local[p['targetPort']]}"
            for p in service["spec"]["ports"]
        }
        # The headless one's name resolves to the pods (here the one local Triton):
        # dns:///<name>.<ns>.svc.cluster.local:<port> becomes dns:///127.0.0.1:<port>.
        headless = find(objects, "Service", "triton-grpc")
        meta = headless["metadata"]
        self.addresses |= {
            f"{meta['name']}.{meta['namespace']}.svc.cluster.local:{p['port']}": (
                f"127.0.0.1:{local[p['targetPort']]}"
            )
            for p in headless["spec"]["ports"]
        }

    def place(self, pod: dict[str, Any]) -> str:
        """Give `pod` a network namespace and address of its own, with the kubelet's
        resolv.conf, and to every Service selecting it the cluster DNS name
        <service>.<namespace>.svc.cluster.local, resolving to it; its address. A ClusterIP
        Service stands for its pod here (no kube-proxy): its ports must be the pod's."""
        assert self.network is not None
        namespace = next(o["metadata"]["namespace"] for o in self.objects if o["kind"] == "Job")
        search = [f"{namespace}.svc.cluster.local", "svc.cluster.local", "cluster.local"]
        netns, address = self.network.add_namespace(search)
        self.pod_netns[id(pod)] = (netns, address)
        labels = pod["metadata"]["labels"].items()
        names = []
        for service in (o for o in self.objects if o["kind"] == "Service"):
            if not service["spec"].get("selector", {}).items() <= labels:
                continue
            meta = service["metadata"]
            names.append(f"{meta['name']}.{meta['namespace']}.svc.cluster.local")
            for port in service["spec"]["ports"]:
                number = self.container_port(pod, port.get("targetPort", port["port"]))
                assert port["port"] == number, f"{meta['name']}: port {port} needs kube-proxy"
        if names:
            self.network.add_name(address, *names, only=True)
        return address

    def container_port(self, pod: dict[str, Any], port: int | str) -> int:
        """A port by number, or by name through the pod's containers' ports."""
        if isinstance(port, int):
            return port
        named = {p["name"]: p["containerPort"] for c in containers(pod["spec"])
                 for p in c.get("ports", [])}  # fmt: skip
        return named[port]

    def reach(self, pod: dict[str, Any], port: int | str) -> str:
        """host:port where the kubelet (this machine's namespace) reaches `port` of `pod`."""
        number = self.container_port(pod, port)
        if id(pod) in self.pod_netns:
            return f"{self.pod_netns[id(pod)][1]}:{number}"
        return f"127.0.0.1:{self.local_port[number]}"

    def rewrite(self, value: str) -> str:
        for address, here in self.addresses.items():
            value = value.replace(address, here)
        if self.engine is not None:  # containers mount the claim and emptyDirs where the pod does
            return value
        # The mount points as whole path components, in one pass: never inside a rewritten
        # one. /pinned is Triton's emptyDir: one per rehearsed revision; /tmp, one for
        # all the host processes of a revision (the helm test writes its results there).
        mounts = {"/storage": self.storage, "/pinned": self.logs / "pinned", "/tmp": self.tmp}
        return re.sub(
            r"(?<![\w.-])(/storage|/pinned|/tmp)(?![\w.-])", lambda m: str(mounts[m[1]]), value
        )

    def pod_tmp(self, pod: dict[str, Any]) -> Path:
        """Where the pod's /tmp (its emptyDir) lies on this machine."""
        return self.tmp if self.engine is None else self.empty_dir(pod, "tmp")

    def resolve(
        self, container: dict[str, Any], pod: dict[str, Any]
    ) -> tuple[dict[str, Any], dict[str, str]]:
        """The container with its args and env as the kubelet expands them, addresses (and
        Triton's ports) mapped to this machine."""
        declared = container_env(container, pod, self.secrets)
        env = {name: self.rewrite(value) for name, value in declared.items()}
        args = [self.rewrite(expand(a, declared)) for a in container.get("args", [])]
        if container["name"] == "tritonserver" and id(pod) not in self.pod_netns:
            remapped = []
            for a in args:
                flag, _, value = a.partition("=")
                if flag.endswith("-port"):
                    a = f"{flag}={self.local_port[int(value)]}"
                remapped.append(a)
            args = remapped
        return {**container, "args": args}, env

    def argv_env(
        self, container: dict[str, Any], pod: dict[str, Any]
    ) -> tuple[list[str], dict[str, str]]:
        """The host process that stands for the container."""
        container, declared = self.resolve(container, pod)
        env = {**self.env, **declared}
        command, args = container.get("command"), container["args"]
        if command is None and args[0] == "tritonserver":
            # No command: the image's entrypoint runs the args, the image's tritonserver with
            # its python backend: here the wheel's, as the image has it, with the rendered
            # args after the backend directory (a repeated flag: the last wins).
            assert container["image"].startswith(f"{PROJECT_TRITON['repository']}:")
            prefix, server_env = wheel_server(self.logs / "backends")
            return [*prefix, *args[1:]], {**env, **server_env}
        assert command == ["mnist-pipeline"], command
        return [sys.executable, "-m", "mnist_pipeline", *args], env

    def run_args(self, container: dict[str, Any], pod: dict[str, Any]) -> list[str]:
        """`docker run` options, image and arguments that run the container as the kubelet
        does."""
        assert self.engine is not None
        container, env = self.resolve(container, pod)
        spec = pod["spec"]
        pod_context = spec.get("securityContext", {})
        context = {**pod_context, **container.get("securityContext", {})}
        image = container["image"]
        options = ["--network=host"]
        if "runAsUser" in context:
            user = str(context["runAsUser"])
            group = context.get("runAsGroup")
            options.append(f"--user={user}" if group is None else f"--user={user}:{group}")
        else:
            inspected = self.engine.docker("image", "inspect", "-f", "{{.Config.User}}", image)
            user = inspected.stdout.strip().partition(":")[0]
        if context.get("runAsNonRoot"):
            # The kubelet refuses a user it cannot verify as non-root (not numeric, or 0).
            assert user.isdigit() and int(user) != 0, f"{container['name']}: user {user!r}"
        if "fsGroup" in pod_context:
            options.append(f"--group-add={pod_context['fsGroup']}")
        if context.get("readOnlyRootFilesystem"):
            options.append("--read-only")
        if context.get("allowPrivilegeEscalation") is False:
            options.append("--security-opt=no-new-privileges")
        assert not context.get("privileged"), container["name"]
        capabilities = context.get("capabilities", {})
        options += [f"--cap-drop={c}" for c in capabilities.get("drop", [])]
        options += [f"--cap-add={c}" for c in capabilities.get("add", [])]
        limits = container.get("resources", {}).get("limits", {})
        if "cpu" in limits:
            options.append(f"--cpus={cpus(str(limits['cpu']))}")
        if "memory" in limits:
            options += memory(str(limits["memory"]))
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        for mount in container.get("volumeMounts", []):
            volume = volumes[mount["name"]]
            if "persistentVolumeClaim" in volume:
                source = self.claim(pod_context.get("fsGroup"))
            elif "emptyDir" in volume:
                source = self.empty_dir(pod, mount["name"])
            elif "projected" in volume:
                continue  # the service account token: a cluster's API server, not here
            else:
                raise AssertionError(f"the rehearsal does not mount volume {volume}")
            if mount.get("subPath"):
                source = source / mount["subPath"]
            read_only = ",readonly" if mount.get("readOnly") else ""
            options.append(
                f"--mount=type=bind,source={source},target={mount['mountPath']}{read_only}"
            )
        options += [f"--env={name}={value}" for name, value in env.items()]
        command = container.get("command")
        if command:
            return [*options, f"--entrypoint={command[0]}", image, *command[1:], *container["args"]]
        return [*options, image, *container["args"]]

    def claim(self, fs_group: int | None) -> Path:
        """The volume, writable to the pod's fsGroup as the kubelet makes it."""
        self.storage.mkdir(parents=True, exist_ok=True)
        if fs_group is not None:
            os.chown(self.storage, -1, fs_group)
            self.storage.chmod(0o2775)
        return self.storage

    def empty_dir(self, pod: dict[str, Any], name: str) -> Path:
        """One folder per pod and volume, mode 0777 as the kubelet creates it."""
        key = (id(pod), name)
        if key not in self.empty_dirs:
            folder = self.logs / "volumes" / f"{len(self.empty_dirs)}-{name}"
            folder.mkdir(parents=True)
            folder.chmod(0o777)
            self.empty_dirs[key] = folder
        return self.empty_dirs[key]

    def start(self, container: dict[str, Any], pod: dict[str, Any], tag: str) -> Running:
        log = self.logs / f"{tag}.log"
        if self.engine is not None:
            name = f"rehearsal-{self.logs.parent.name}-{self.logs.name}-{tag}"
            return Container(self.engine, name, self.run_args(container, pod), log)
        argv, env = self.argv_env(container, pod)
        if id(pod) in self.pod_netns:  # `ip netns exec` execs it: same process
            argv = ["ip", "netns", "exec", self.pod_netns[id(pod)][0], *argv]
        with open(log, "wb") as out:
            return subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT)

    def run(
        self, container: dict[str, Any], pod: dict[str, Any], tag: str, timeout: float = 600
    ) -> None:
        self.run_together([(container, pod, tag)], timeout)

    def run_together(
        self, runs: list[tuple[dict[str, Any], dict[str, Any], str]], timeout: float = 600
    ) -> None:
        """Start every (container, pod, tag) at once; each must exit 0."""
        processes = [(self.start(container, pod, tag), tag) for container, pod, tag in runs]
        try:
            for process, tag in processes:
                assert process.wait(timeout) == 0, self.log(tag)
        finally:
            for process, _ in processes:
                if process.poll() is None:
                    process.kill()
                    process.wait()

    def lose(self, process: Running) -> None:
        """The pod is lost (its node gone, or OOM-killed): every process in it at once."""
        if isinstance(process, Container):
            process.kill()
        else:
            kill_tree(process.pid)
        process.wait()

    def log(self, tag: str) -> str:
        return f"{tag} failed:\n" + (self.logs / f"{tag}.log").read_text()[-4000:]


JOB_INDEX = "batch.kubernetes.io/job-completion-index"


def job_pods(job: dict[str, Any]) -> list[dict[str, Any]]:
    """The pods the Job controller makes: the template with its labels added; for an Indexed
    Job one per index, hostname <job>-<index>, and JOB_COMPLETION_INDEX in every container."""
    name = job["metadata"]["name"]
    template = job["spec"]["template"]
    labels = {**template["metadata"].get("labels", {}), "job-name": name}
    labels["batch.kubernetes.io/job-name"] = name
    if job["spec"].get("completionMode") != "Indexed":
        return [{"metadata": {"labels": labels}, "spec": template["spec"]}]
    index_env = {
        "name": "JOB_COMPLETION_INDEX",
        "valueFrom": {"fieldRef": {"fieldPath": f"metadata.annotations['{JOB_INDEX}']"}},
    }
    pods = []
    for index in range(job["spec"]["completions"]):
        spec = dict(template["spec"])
        for key in ("initContainers", "containers"):
            spec[key] = [{**c, "env": [*c.get("env", []), index_env]} for c in spec.get(key, [])]
        metadata = {
            "labels": {**labels, JOB_INDEX: str(index)},
            "annotations": {JOB_INDEX: str(index)},
        }
        pods.append({"metadata": metadata, "spec": {**spec, "hostname": f"{name}-{index}"}})
    return pods


def dns_names(objects: list[dict[str, Any]]) -> list[str]:
    """What cluster DNS resolves to a Job's pods: <hostname>.<subdomain> when a headless
    Service of that name selects the pod, in the namespace's search path; longest first."""
    names = []
    for service in objects:
        if service["kind"] != "Service" or service["spec"].get("clusterIP") != "None":
            continue
        selector = service["spec"]["selector"].items()
        for pod in (p for job in objects if job["kind"] == "Job" for p in job_pods(job)):
            spec = pod["spec"]
            if (
                spec.get("subdomain") == service["metadata"]["name"]
                and "hostname" in spec
                and selector <= pod["metadata"]["labels"].items()
            ):
                short = f"{spec['hostname']}.{spec['subdomain']}"
                fqdn = f"{short}.{service['metadata']['namespace']}.svc"
                names += [f"{fqdn}.cluster.local", fqdn, short]
    return names


def container_env(
    container: dict[str, Any], pod: dict[str, Any], secrets: dict[str, dict[str, str]]
) -> dict[str, str]:
    """The container's env as the kubelet sets it: fieldRefs read from the pod, secretKeyRefs
    from `secrets` (the namespace's Secrets), $(VAR) expanded from the variables before it."""
    env: dict[str, str] = {}
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = expand(var["value"], env)
            continue
        if "secretKeyRef" in var["valueFrom"]:
            ref = var["valueFrom"]["secretKeyRef"]
            secret = secrets[ref["name"]]  # a missing Secret keeps the pod from starting
            if ref["key"] in secret:
                env[var["name"]] = secret[ref["key"]]
            else:
                assert ref.get("optional"), f"Secret {ref['name']} has no key {ref['key']}"
            continue
        if "resourceFieldRef" in var["valueFrom"]:
            env[var["name"]] = resource_field(container, var["valueFrom"]["resourceFieldRef"])
            continue
        path = var["valueFrom"]["fieldRef"]["fieldPath"]
        field = re.fullmatch(r"metadata\.(labels|annotations)\['(.+)'\]", path)
        assert field, f"the rehearsal does not resolve fieldPath {path}"
        env[var["name"]] = pod["metadata"][field[1]][field[2]]
    return env


def resource_field(container: dict[str, Any], ref: dict[str, Any]) -> str:
    """The downward API's limits.cpu as the kubelet gives it: the container's limit over the
    divisor, rounded up; without a limit, the node's CPUs (this machine's)."""
    assert ref["resource"] == "limits.cpu", f"the rehearsal does not resolve {ref}"
    limit = container.get("resources", {}).get("limits", {}).get("cpu")
    if limit is None:
        return str(os.cpu_count())
    divisor = cpu_quantity(str(ref.get("divisor", "1")))
    return str(math.ceil(cpu_quantity(str(limit)) / divisor))


def cpu_quantity(q: str) -> float:
    return int(q[:-1]) / 1000 if q.endswith("m") else float(q)


def expand(value: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion: $$ is a literal $; an unknown name is left as written."""
    return re.sub(
        r"\$\$|\$\(([-._a-zA-Z0-9]+)\)",
        lambda m: "$" if m[0] == "$$" else env.get(m[1], m[0]),
        value,
    )


PROBES = ("startupProbe", "livenessProbe", "readinessProbe")


def probe_urls(r: Rehearsal, container: dict[str, Any], pod: dict[str, Any]) -> dict[str, str]:
    """Each probe's httpGet as the kubelet requests it: a named port is the container's port
    of that name, on the pod's address (else the local port Triton listens on for it)."""
    urls = {}
    for probe in PROBES:
        get = container[probe]["httpGet"]
        scheme = get.get("scheme", "HTTP").lower()
        urls[probe] = f"{scheme}://{r.reach(pod, get['port'])}{get['path']}"
    return urls


def http_status(url: str, timeout: float) -> int | None:
    """The status the kubelet would see: an answer's, or None (refused, timed out)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return int(response.status)
    except urllib.error.HTTPError as e:
        return e.code
    except OSError:
        return None


def check_probes(
    r: Rehearsal, container: dict[str, Any], pod: dict[str, Any], server: Running, model: str
) -> None:
    """The rendered probes against the rehearsed Triton, in the kubelet's order: the startup
    probe answers 200 within its budget (else the kubelet restarts the container), then the
    liveness probe; the readiness probe answers 200 only once `model` (<name>/versions/<v>)
    is loaded and ready."""
    urls = probe_urls(r, container, pod)
    startup = container["startupProbe"]
    budget = startup.get("initialDelaySeconds", 0) + startup.get("periodSeconds", 10) * (
        startup.get("failureThreshold", 3)
    )
    deadline = time.monotonic() + budget
    while http_status(urls["startupProbe"], startup.get("timeoutSeconds", 1)) != 200:
        assert server.poll() is None, r.log("tritonserver")
        assert time.monotonic() < deadline, f"startup probe {urls['startupProbe']}: no 200"
        time.sleep(0.2)
    live = container["livenessProbe"].get("timeoutSeconds", 1)
    assert http_status(urls["livenessProbe"], live) == 200, urls["livenessProbe"]
    readiness = container["readinessProbe"]
    model_ready = f"http://{r.reach(pod, 'http')}/v2/models/{model}/ready"
    while http_status(urls["readinessProbe"], readiness.get("timeoutSeconds", 1)) != 200:
        assert server.poll() is None and time.monotonic() < deadline, r.log("tritonserver")
        time.sleep(0.2)
    assert http_status(model_ready, 5) == 200, f"ready before {model_ready} was"


def wait_exit(process: Running, timeout: float) -> int | None:
    try:
        return process.wait(timeout)
    except subprocess.TimeoutExpired:
        return None


def pod_tag(stage: str, pod: dict[str, Any], container: dict[str, Any]) -> str:
    """train-train for one pod, train-1-train for worker 1's: the log's name."""
    index = pod["metadata"].get("annotations", {}).get(JOB_INDEX)
    return "-".join(p for p in (stage, index, container["name"]) if p is not None)


def read(path: Path) -> dict[str, Any]:
    return dict(json.loads(path.read_text()))


def export_record(
    r: Rehearsal, pin: dict[str, Any], pod: dict[str, Any], run_id: str
) -> dict[str, Any]:
    """The run's export record, read where the chart's pin reads it (the volume's
    repository, or the bucket with the pod's credentials) by `mnist-pipeline status`."""
    env = {**os.environ, **container_env(pin, pod, r.secrets)}
    result = subprocess.run(
        [sys.executable, "-m", "mnist_pipeline", "status", "--json", f"--storage={r.storage}",
         f"--model-name={arg(pin, 'model-name')}"],
        capture_output=True, text=True, timeout=60, env=env,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return dict(json.loads(result.stdout)["runs"][run_id])


def rehearse(
    r: Rehearsal, objects: list[dict[str, Any]], lose_worker: int | None = None
) -> dict[str, Any]:
    """One release revision, in the chart's order; return its export outcome. With
    `lose_worker`, that worker's pod is lost mid-training and replaced."""
    train_pods = job_pods(find(objects, "Job", "train"))
    (export_pod,) = job_pods(find(objects, "Job", "export"))
    triton_pod = find(objects, "Deployment", "triton")["spec"]["template"]
    (client_pod,) = job_pods(find(objects, "Job", "client"))
    (helm_test,) = [o for o in objects if o["kind"] == "Pod"]
    export, triton, client = (pod["spec"] for pod in (export_pod, triton_pod, client_pod))
    run_id = find(objects, "Job", "train")["metadata"]["annotations"]["mnist-pipeline/run-id"]
    inference = r.storage / "inference"
    results_before = set(inference.iterdir()) if inference.is_dir() else set()
    if r.network is not None:  # the pods that talk to each other, each on its own address
        for pod in (triton_pod, client_pod, helm_test):
            r.place(pod)

    # Every wait starts now, before anything it waits for exists (whatever an earlier
    # revision left on the volume).
    (wait_training,) = export["initContainers"]
    wait_export, pin = triton["initContainers"]
    wait_serving, prune = client["initContainers"]
    # `helm test` run before export finishes: its pod waits as the client's does.
    (test_wait,) = helm_test["spec"]["initContainers"]
    waits = {
        "wait-for-training": r.start(wait_training, export_pod, "wait-for-training"),
        "wait-for-export": r.start(wait_export, triton_pod, "wait-for-export"),
        "wait-for-serving": r.start(wait_serving, client_pod, "wait-for-serving"),
        "helm-test-wait": r.start(test_wait, helm_test, "helm-test-wait"),
    }
    server = None
    try:
        # seed-data, then train, in every worker's pod at once (one pod unless workers > 1)
        for step in zip(*(containers(pod["spec"]) for pod in train_pods), strict=True):
            assert waits["wait-for-training"].poll() is None, "export started before training"
            runs = [
                (container, pod, pod_tag("train", pod, container))
                for container, pod in zip(step, train_pods, strict=True)
            ]
            if lose_worker is not None and step[0]["name"] == "train":
                replace_a_lost_worker(r, runs, lose_worker, run_id, waits["wait-for-training"])
            else:
                r.run_together(runs)
        assert read(r.storage / "checkpoints" / run_id / "metrics.json")["status"] == "complete"
        assert wait_exit(waits["wait-for-training"], 30) == 0, r.log("wait-for-training")
        assert waits["wait-for-export"].poll() is None, "Triton's wait let it start before export"

        (export_container,) = export["containers"]
        r.run(export_container, export_pod, "export")
        outcome = export_record(r, pin, triton_pod, run_id)
        assert wait_exit(waits["wait-for-export"], 30) == 0, r.log("wait-for-export")
        assert waits["wait-for-serving"].poll() is None, "the client's wait let it start early"
        assert waits["helm-test-wait"].poll() is None, "helm test's wait let it start early"

        r.run(pin, triton_pod, "pin-version")  # the repository Triton serves, into its emptyDir
        (tritonserver,) = triton["containers"]
        server = r.start(tritonserver, triton_pod, "tritonserver")
        model = f"{arg(pin, 'model-name')}/versions/{outcome['version']}"
        check_probes(r, tritonserver, triton_pod, server, model)
        assert wait_exit(waits["wait-for-serving"], 240) == 0, r.log("wait-for-serving")

        r.run(prune, client_pod, "prune")  # retention, before the client's results arrive
        (infer,) = client["containers"]
        r.run(infer, client_pod, "client")
        (result,) = set(inference.iterdir()) - results_before
        latency = read(result / "latency.json")
        assert latency["count"] == VALUES["client"]["requests"]
        assert len(read_samples(result)) == 10
        assert latency["model_version_served"] == str(outcome["version"])

        # `helm test`: the hook Pod's command line against the same Service. It checks the
        # served version and the accuracy floor, and writes nothing to the volume.
        (test_container,) = helm_test["spec"]["containers"]
        assert wait_exit(waits["helm-test-wait"], 60) == 0, r.log("helm-test-wait")
        r.run(test_container, helm_test, "helm-test")
        (tested,) = (r.pod_tmp(helm_test) / "helm-test").iterdir()
        assert read(tested / "latency.json")["model_version_served"] == str(outcome["version"])
        # A perfect floor over 1000 images: no model trained on a subset meets it.
        perfect = ["--min-accuracy=1", "--requests=125", "--images-per-request=8"]
        impossible = {**test_container, "args": [*test_container["args"], *perfect]}
        assert r.start(impossible, helm_test, "helm-test-floor").wait(300) == 1
        assert "below --min-accuracy" in (r.logs / "helm-test-floor.log").read_text()
        assert len(set(inference.iterdir()) - results_before) == 1
    finally:
        for process in waits.values():
            if process.poll() is None:
                process.kill()
        if server is not None:
            server.send_signal(signal.SIGTERM)
            try:
                server.wait(60)
            except subprocess.TimeoutExpired:
                server.kill()
    assert server.returncode == 0, r.log("tritonserver")
    return outcome


def replace_a_lost_worker(
    r: Rehearsal,
    runs: list[tuple[dict[str, Any], dict[str, Any], str]],
    lost: int,
    run_id: str,
    wait_training: Running,
) -> None:
    """Worker `lost`'s pod is lost after the first checkpoint; the Indexed Job starts a new
    pod for its index (the chart's podFailurePolicy retries what is not a usage error).
    Worker 0's torchrun restarts its rank, the new pod joins the same rendezvous, and both
    resume the run; export's wait holds throughout (the run says "retrying", not failed)."""
    out = r.storage / "checkpoints" / run_id
    processes = [r.start(*run) for run in runs]
    try:
        deadline = time.monotonic() + 300
        while not (out / "resume.pth").exists():
            assert all(p.poll() is None for p in processes), [r.log(t) for *_, t in runs]
            assert time.monotonic() < deadline, "no checkpoint within 300 s"
            time.sleep(0.1)
        r.lose(processes[lost])
        deadline = time.monotonic() + 120
        while read(out / "metrics.json")["status"] != "retrying":
            assert time.monotonic() < deadline, read(out / "metrics.json")
            time.sleep(0.2)
        assert wait_training.poll() is None, "export's wait gave up on a retried training"
        container, pod, tag = runs[lost]
        processes[lost] = r.start(container, pod, f"{tag}-replacement")
        for process, (*_, tag) in zip(processes, runs, strict=True):
            assert process.wait(600) == 0, r.log(tag)
    finally:
        for process in processes:
            if process.poll() is None:
                r.lose(process)


def test_install_runs_from_the_charts_command_lines(
    tmp_path: Path, engine: Engine | None, request: pytest.FixtureRequest
) -> None:
    """As host processes the talking pods have their own addresses and DNS (pod_network)."""
    network = request.getfixturevalue("pod_network") if engine is None else None
    install, _ = render(VALUES, release="rehearsal", namespace="ml")
    r = Rehearsal(tmp_path / "storage", tmp_path / "r1", install, engine, network=network)
    first = rehearse(r, install)
    assert first["status"] == "published" and first["version"] == 1, first


def test_an_object_storage_repository_is_rehearsed_against_radosgw(
    tmp_path: Path, radosgw: LocalRadosgw
) -> None:
    """The chart with modelRepository.url on a real radosgw: export publishes to the bucket,
    Triton's pod (no claim) waits for and pins the version from it, the client and helm
    test are served it. Host processes: the containers' network is this machine's."""
    bucket = radosgw.new_bucket()
    values = {
        **VALUES,
        "modelRepository": {"url": radosgw.url(bucket, "models"), "existingSecret": "s3"},
    }
    objects, _ = render(values, release="rehearsal", namespace="ml")
    triton = pod_spec(find(objects, "Deployment", "triton"))
    assert not [v for v in triton.get("volumes", []) if "persistentVolumeClaim" in v]
    assert "affinity" not in triton or "podAffinity" not in triton["affinity"]
    keys = {k: radosgw.env[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    storage = tmp_path / "storage"
    rehearsal = Rehearsal(storage, tmp_path / "r1", objects, None, secrets={"s3": keys})
    outcome = rehearse(rehearsal, objects)
    assert outcome["status"] == "published" and outcome["version"] == 1, outcome
    published = radosgw.bucket_objects(bucket)
    assert {"models/resnet18_mnist/1/model.onnx", "models/resnet18_mnist/1/metadata.json"} <= (
        set(published)
    )
    assert not (storage / "models").exists()  # the volume holds checkpoints and data only


def test_two_workers_train_one_run_through_a_lost_worker_then_it_is_served(
    tmp_path: Path, container_engine: Engine
) -> None:
    """training.workers: 2 — both pods of the Indexed Job run the rendered command line
    (which starts torchrun) at once, with what Kubernetes injects (JOB_COMPLETION_INDEX,
    JOB_NAME from the pod's label) and worker 0's DNS name resolving to this machine;
    worker 1's pod is lost after the first checkpoint and replaced, and the run resumes;
    then the same export, Triton and client as one worker. In the images only: as host
    processes it ran the same command lines, ranks and lost pod (50 s of CI for nothing
    more)."""
    (port,) = free_ports(1)  # the rendezvous: masterPort is a value
    extra_env = [
        {"name": "MNIST_PIPELINE_LIMIT_TRAIN", "value": "1024"},
        {"name": "MNIST_PIPELINE_LIMIT_TEST", "value": "1000"},
        # A pod's CPU limit is its own; here both ranks share 2 cores: one thread each.
        {"name": "MNIST_PIPELINE_THREADS", "value": "1"},
    ]
    values = {
        **VALUES,
        "persistence": {"accessModes": ["ReadWriteMany"]},
        "training": {
            **VALUES["training"],
            "workers": 2,
            "masterPort": port,
            # 64 steps: at 8 (one epoch of 64) rank 0's BatchNorm running statistics have
            # not settled and the model scored 0.09 and 0.13; at 32, 0.58 on a Xeon but 0.50
            # on an AMD EPYC; at 64, 0.807 there (on 1000 images).
            "epochs": 2,
            "batchSize": 32,
            "extraEnv": extra_env,
        },
    }
    objects, _ = render(values, release="rehearsal", namespace="ml")
    r = Rehearsal(tmp_path / "storage", tmp_path / "logs", objects, container_engine)
    # Worker 0's name as the pods expand it must be one cluster DNS resolves (torchrun would
    # retry an unknown one until its rendezvous times out, minutes later).
    for pod in job_pods(find(objects, "Job", "train")):
        container, _ = r.resolve(pod["spec"]["containers"][0], pod)
        assert "--master-addr=127.0.0.1" in container["args"], container["args"]
    outcome = rehearse(r, objects, lose_worker=1)
    assert outcome["status"] == "published" and outcome["version"] == 1, outcome

    run_id = find(objects, "Job", "train")["metadata"]["annotations"]["mnist-pipeline/run-id"]
    out = r.storage / "checkpoints" / run_id
    metrics = read(out / "metrics.json")
    assert metrics["world_size"] == 2 and metrics["status"] == "complete", metrics
    assert sorted(p.name for p in out.iterdir()) == [  # train's alone
        "metrics.json",
        "model.pth",
        "train.log",
    ]
    names = ("train-0-train.log", "train-1-train-replacement.log")
    logs = [(r.logs / name).read_text() for name in names]
    # Worker 0's torchrun restarted its rank, which resumed with the replacement pod's.
    for rank, log in enumerate(logs):
        assert re.search(rf"rank {rank}: resuming run {run_id} at epoch \d+, step", log), log
    # Rank 0 alone wrote model.pth; both ranks ended with the same parameters.
    assert "rank 0: final test accuracy" in logs[0] and "final test accuracy" not in logs[1]
    assert "rank 1: done; rank 0 wrote" in logs[1]
    digest = metrics["parameters_sha256"]
    for rank, log in enumerate(logs):
        assert f"rank {rank}: parameters sha256 {digest}, identical on all 2 ranks" in log


def read_samples(folder: Path) -> list[Any]:
    samples = json.loads((folder / "samples.json").read_text())
    return list(samples["samples"] if isinstance(samples, dict) else samples)


def test_a_new_run_waits_for_its_own_artifacts_not_the_first(tmp_path: Path) -> None:
    """An upgrade that changes training ignores the complete artifacts of the run before."""
    pinned = {**VALUES, "run": {"id": "rehearsal"}}
    first, _ = render(pinned, release="rehearsal", namespace="ml")
    more_epochs = {**pinned, "training": {**VALUES["training"], "epochs": 2}}
    second, _ = render(more_epochs, release="rehearsal", namespace="ml", revision=2)
    r = Rehearsal(tmp_path / "storage", tmp_path / "logs", first, engine=None)
    first_run = find(first, "Job", "train")["metadata"]["annotations"]["mnist-pipeline/run-id"]
    done = r.storage / "checkpoints" / first_run
    done.mkdir(parents=True)
    (done / "metrics.json").write_text('{"status": "complete"}')
    (export_pod,) = job_pods(find(second, "Job", "export"))
    (wait,) = export_pod["spec"]["initContainers"]
    wait = {**wait, "args": [*wait["args"], "--wait-timeout=2"]}  # the last --wait-timeout wins
    process = r.start(wait, export_pod, "wait")
    assert process.wait(60) == 1
    assert "gave up after 2 s" in (r.logs / "wait.log").read_text()


def test_helm_test_before_export_waits_then_gives_up_in_one_line(tmp_path: Path) -> None:
    """`helm test` right after an install: its pod waits for Triton to serve the run (rehearse
    lets it through once served). Before, its client failed at once, the run not yet exported.
    With nothing coming it gives up at tests.waitTimeoutSeconds: one line, exit 1."""
    values = {**VALUES, "tests": {**VALUES["tests"], "waitTimeoutSeconds": 2}}
    objects, _ = render(values, release="rehearsal", namespace="ml")
    (helm_test,) = [o for o in objects if o["kind"] == "Pod"]
    (test_wait,) = helm_test["spec"]["initContainers"]
    r = Rehearsal(tmp_path / "storage", tmp_path / "logs", objects, engine=None)
    r.storage.mkdir()
    assert r.start(test_wait, helm_test, "helm-test-wait").wait(60) == 1
    log = (r.logs / "helm-test-wait.log").read_text()
    assert "gave up after 2 s, still waiting for" in log and "Traceback" not in log, log
    assert "metrics.json to appear" in log.splitlines()[-1], log


def test_a_triton_bound_to_loopback_fails_the_kubelets_probes(
    tmp_path: Path, pod_network: Network | None
) -> None:
    """In a namespace of its own, as on a cluster, Triton must listen on the pod's address:
    bound to loopback alone (--http-address=127.0.0.1) it starts, and the kubelet's probes,
    from outside the pod, get no answer; the chart's own arguments answer 200. (Sharing this
    machine's loopback, the rehearsal passed both.) An empty repository: no model to load."""
    assert pod_network is not None, "needs the pod network (root, iproute2, dnsmasq)"
    for extra, expected in (([], 200), (["--http-address=127.0.0.1"], None)):
        args = [*VALUES["triton"]["extraArgs"], *extra]
        objects, _ = render({**VALUES, "triton": {"extraArgs": args}})
        logs = tmp_path / f"logs-{len(extra)}"
        r = Rehearsal(tmp_path / "storage", logs, objects, None, network=pod_network)
        (logs / "pinned").mkdir()
        pod = find(objects, "Deployment", "triton")["spec"]["template"]
        r.place(pod)
        (tritonserver,) = pod["spec"]["containers"]
        server = r.start(tritonserver, pod, "tritonserver")
        try:
            deadline = time.monotonic() + 60
            while "Started HTTPService at" not in (logs / "tritonserver.log").read_text():
                assert server.poll() is None and time.monotonic() < deadline, r.log("tritonserver")
                time.sleep(0.2)
            for url in probe_urls(r, tritonserver, pod).values():
                assert http_status(url, 1) == expected, (url, extra)
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(60)


def test_a_flag_tritonserver_rejects_fails_the_rehearsal(
    tmp_path: Path, engine: Engine | None
) -> None:
    """The chart's Triton arguments reach the real tritonserver: a bad one fails there."""
    objects, _ = render({**VALUES, "triton": {"extraArgs": ["--host=0.0.0.0"]}})
    r = Rehearsal(tmp_path / "storage", tmp_path / "logs", objects, engine)
    pod = find(objects, "Deployment", "triton")["spec"]["template"]
    (tritonserver,) = pod["spec"]["containers"]
    process = r.start(tritonserver, pod, "tritonserver")
    assert wait_exit(process, 60) not in (0, None), r.log("tritonserver")
    assert "--host-policy option format" in (r.logs / "tritonserver.log").read_text()
