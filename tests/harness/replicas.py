"""Triton replicas on one machine as a cluster has them: each tritonserver in its own
network namespace with its own address (a veth pair to a bridge in the root namespace), all
on the same ports, and a name with one A record per replica from a real dnsmasq on a free
loopback port (a headless Service in miniature). Needs root (ip netns); tests and the
replica benchmark share it. Everything is named <prefix>..., with a per-instance tag, and
removed by stop(), also after a failure. Network, the namespaces and the DNS, is the
rehearsal's pod network too (test_rehearsal.py).
"""

from __future__ import annotations

import os
import random
import re
import shutil
import signal
import subprocess
import tempfile
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from harness.ports import free_ports
from harness.processes import require_root_and
from mnist_pipeline.processes import ManagedProcess, Service
from mnist_pipeline.serve import wheel_server

NAME = "triton.replicas.test"  # the name dnsmasq answers, as the cluster DNS would
HTTP, GRPC, METRICS = 8000, 8001, 8002  # each replica's own: its namespace has nothing else


def require_tools() -> None:
    """Fail, saying what to install, where the replicas cannot be made."""
    require_root_and("the replica tests", ip="iproute2", dnsmasq="dnsmasq", taskset="util-linux")


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


class Network(Service):
    """A pod network and its DNS in miniature: a bridge in the root namespace with the
    subnet's .1, network namespaces on it (a veth pair each, the next free address), and a
    real dnsmasq answering the names given to add_name() from a hosts file, on
    `dns_address` (one of this machine's, or the bridge's: "gateway") and `dns_port` (0: a
    free one). Everything is named <prefix><tag>..., and removed by stop(), also after a
    failure. Use it as a context manager."""

    def __init__(
        self, prefix: str, subnet: str, dns_address: str = "127.0.0.1", dns_port: int = 0
    ) -> None:
        self.tag = f"{prefix}{random.randrange(16**4):04x}"  # interface names: 15 chars
        self.subnet = subnet  # the first three octets: "10.77.5"
        self.bridge = f"{self.tag}br"
        self.gateway = f"{subnet}.1"
        self.dns_address = self.gateway if dns_address == "gateway" else dns_address
        self.dns_port = dns_port
        self.workdir = Path(tempfile.mkdtemp(prefix=f"{self.tag}-"))
        self.hosts = self.workdir / "hosts"
        self.namespaces: list[str] = []
        self.dns = ManagedProcess(log_path=self.workdir / "dnsmasq.out")

    def start(self) -> None:
        ip("link", "add", self.bridge, "type", "bridge")
        ip("addr", "add", f"{self.gateway}/24", "dev", self.bridge)
        ip("link", "set", self.bridge, "up")
        self.hosts.write_text("")
        if not self.dns_port:
            (self.dns_port,) = free_ports(1)
        command = [
            "dnsmasq", "--keep-in-foreground", "--conf-file=/dev/null", "--no-resolv",
            "--no-hosts", f"--addn-hosts={self.hosts}", f"--listen-address={self.dns_address}",
            # Every name it does not hold does not exist (NXDOMAIN), so a resolver goes on to
            # the next search domain instead of failing (REFUSED, with no upstream).
            "--local=/#/", "--bind-interfaces", f"--port={self.dns_port}", "--user=root",
            f"--pid-file={self.workdir / 'dnsmasq.pid'}",
            f"--log-facility={self.workdir / 'dnsmasq.log'}",
        ]  # fmt: skip
        self.dns.command = command
        self.dns.start()

    def address(self, i: int) -> str:
        return f"{self.subnet}.{11 + i}"

    def add_namespace(self, search: Sequence[str] = ()) -> tuple[str, str]:
        """One more namespace on the bridge: its name and address. With `search` domains its
        processes (`ip netns exec`) resolve through the dnsmasq as a kubelet's resolv.conf
        makes a pod do (ndots:5); the dnsmasq must then be on port 53."""
        i = len(self.namespaces)
        ns, veth = f"{self.tag}-{i}", f"{self.tag}v{i}"
        self.namespaces.append(ns)
        ip("netns", "add", ns)
        ip("link", "add", veth, "type", "veth", "peer", "name", f"{veth}p")
        ip("link", "set", veth, "master", self.bridge, "up")
        ip("link", "set", f"{veth}p", "netns", ns)
        for args in (
            ("addr", "add", f"{self.address(i)}/24", "dev", f"{veth}p"),
            ("link", "set", f"{veth}p", "up"),
            ("link", "set", "lo", "up"),
        ):
            ip("-n", ns, *args)
        if search:
            assert self.dns_port == 53, "resolv.conf names no port"
            etc = Path("/etc/netns") / ns  # `ip netns exec` mounts it over /etc/resolv.conf
            etc.mkdir(parents=True)
            (etc / "resolv.conf").write_text(
                f"nameserver {self.dns_address}\nsearch {' '.join(search)}\noptions ndots:5\n"
            )
        return ns, self.address(i)

    def add_name(self, address: str, *names: str, only: bool = False) -> None:
        """`names` resolve to `address` too (one more A record: a headless Service's next
        pod), or, `only`, to it alone (a Service whose pod was replaced)."""
        lines = self.hosts.read_text().splitlines()
        if only:
            lines = [line for line in lines if not set(line.split()[1:]) & set(names)]
        self.hosts.write_text(
            "".join(f"{line}\n" for line in [*lines, f"{address} {' '.join(names)}"])
        )
        os.kill(self.dns.pid, signal.SIGHUP)  # dnsmasq re-reads --addn-hosts

    def stop(self) -> None:
        self.dns.stop()
        for ns in self.namespaces:  # its veth end goes with it, and so the pair
            subprocess.run(["ip", "netns", "delete", ns], capture_output=True, check=False)
            shutil.rmtree(Path("/etc/netns") / ns, ignore_errors=True)
        subprocess.run(["ip", "link", "delete", self.bridge], capture_output=True, check=False)
        shutil.rmtree(self.workdir, ignore_errors=True)


def free_subnet(first: str) -> str:
    """A /24 under `first` (two octets) that no interface of this machine is on, so that
    networks made at the same time never share a route."""
    used = subprocess.run(["ip", "-4", "-o", "addr"], capture_output=True, text=True).stdout
    free = [n for n in range(1, 250) if f" {first}.{n}." not in used]
    return f"{first}.{random.choice(free)}"


class Replica(ManagedProcess):
    """One tritonserver in a network namespace of its own, at `address` (`ip netns exec`
    and taskset exec it: its PID is ours)."""

    name = "replica"

    def __init__(
        self, command: Sequence[str], log_path: Path, env: dict[str, str], address: str
    ) -> None:
        super().__init__(command, log_path, env)
        self.address = address

    def get(self, path: str, port: int = HTTP) -> bytes:
        with urllib.request.urlopen(f"http://{self.address}:{port}{path}", timeout=2) as response:
            return bytes(response.read())

    def ready(self) -> bool:
        try:
            self.get("/v2/health/ready")
        except OSError:
            return False
        return True


class Replicas(Service):
    """with Replicas(served, extra_args=[...]) as r: r.add(); r.add(); r.target ...

    `served`: a repository pinned for the python backend (serve.pinned), as the wheel's
    tritonserver serves."""

    def __init__(
        self,
        repository: Path,
        extra_args: Sequence[str] = (),
        prefix: str = "sc",
        cpus: Sequence[str] = (),
    ) -> None:
        self.repository, self.extra_args = repository, list(extra_args)
        self.cpus = list(cpus)  # taskset CPU list of replica i (cycled); none: unpinned
        self.network = Network(prefix, free_subnet("10.77"))
        self.servers: list[Replica] = []

    @property
    def target(self) -> str:
        """The gRPC target of every replica: dns://<dnsmasq>/<name>:<port>."""
        return f"dns://127.0.0.1:{self.network.dns_port}/{NAME}:{GRPC}"

    def address(self, i: int) -> str:
        return self.network.address(i)

    def start(self) -> None:
        self.network.start()

    def add(self, ready_timeout: float = 120.0, repository: Path | None = None) -> int:
        """Start one more replica and, once it is ready, add it to the name; its index.
        `repository`: another than the replicas' own (a canary serving another version)."""
        i = len(self.servers)
        ns, address = self.network.add_namespace()
        pin = ["taskset", "-c", self.cpus[i % len(self.cpus)]] if self.cpus else []
        server, env = wheel_server(self.network.workdir / "backends")
        command = [
            "ip", "netns", "exec", ns, *pin, *server,
            f"--model-repository={repository or self.repository}",
            "--model-control-mode=none", "--allow-gpu-metrics=false",
            f"--http-port={HTTP}", f"--grpc-port={GRPC}", f"--metrics-port={METRICS}",
            *self.extra_args,
        ]  # fmt: skip
        replica = Replica(command, self.network.workdir / f"triton-{i}.log", env, address)
        self.servers.append(replica)
        replica.start()
        replica.wait_ready(ready_timeout)
        self.network.add_name(address, NAME)
        return i

    def inference_counts(self, model: str) -> list[int]:
        """Successful inference requests of `model` each replica has answered, from its
        own metrics endpoint (nv_inference_request_success, summed over versions)."""
        pattern = re.compile(
            rf'^nv_inference_request_success{{model="{model}",[^}}]*}} (\S+)$', re.M
        )
        counts = []
        for server in self.servers:
            text = server.get("/metrics", port=METRICS).decode()
            counts.append(sum(int(float(v)) for v in pattern.findall(text)))
        return counts

    def stop(self) -> None:
        for server in self.servers:
            server.stop()
        self.network.stop()
