"""Simulated training nodes: N processes, each in its own network namespace with its own
address, joined through a bridge by links that `tc` shapes (bandwidth, latency) and can cut.

The layout is a switch and N machines' NICs: a hub namespace holds the bridge, node i's
namespace holds eth0 (10.78.<net>.<i+1>), a veth pair to the bridge. Each link is shaped
in both directions (a qdisc on eth0 for what the node sends, on the hub's end for what it
receives), so every node has a full-duplex link of the given rate.

Names resolve as a headless Service would have them: `ip netns exec` mounts
/etc/netns/<namespace>/hosts over /etc/hosts, which maps worker-<i>.<SERVICE> to node i
and this machine's hostname to the node's own address (gloo binds to what the hostname
resolves to, as in a pod). No dnsmasq needed.

Everything is named mpd-<pid>-...: stop() removes it, on failure too, and
remove_stale() removes what a crashed run of this harness left (only names of this
prefix whose process is gone). Needs root. Tests and benchmarks/bench_distributed.py
share it.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from harness.processes import alive, require_root_and
from mnist_pipeline.processes import Service, stop_group

PREFIX = "mpd"
SERVICE = "workers.mpd.test"  # the headless Service's domain the names live in
NETNS_ETC = Path("/etc/netns")


def require_tools() -> None:
    """Fail, saying what to install, where the nodes cannot be made."""
    require_root_and("the netnodes tests", ip="iproute2", tc="iproute2", taskset="util-linux")


def run(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, check=check, capture_output=True, text=True)


@dataclass(frozen=True)
class Link:
    """One node's link: its rate in Mbit/s each way (0: unshaped, veth speed), and the
    delay added each way in ms (netem: only on kernels that have sch_netem)."""

    mbit: float = 0.0
    delay_ms: float = 0.0

    def qdisc(self) -> list[str]:
        if self.delay_ms:
            rate = ["rate", f"{self.mbit}mbit"] if self.mbit else []
            return ["netem", "limit", "100000", "delay", f"{self.delay_ms}ms", *rate]
        # A token bucket of 10 ms at the rate (at least 64 KiB: veth hands over 64 KiB
        # GSO frames), a 50 ms queue before dropping: a NIC's behaviour, roughly.
        burst = max(64 * 1024, int(self.mbit * 1e6 / 8 / 100))
        return ["tbf", "rate", f"{self.mbit}mbit", "burst", str(burst), "latency", "50ms"]


def netem_available() -> bool:
    """Whether this kernel can add delay (sch_netem); the harness's own probe namespace."""
    probe = f"{PREFIX}-{os.getpid()}-probe"
    run("ip", "netns", "add", probe)
    try:
        tc = ("ip", "netns", "exec", probe, "tc", "qdisc", "add", "dev", "lo", "root")
        return run(*tc, "netem", "delay", "1ms", check=False).returncode == 0
    finally:
        delete_namespace(probe)


def remove_stale() -> list[str]:
    """Remove namespaces (with their processes) and hosts files of this prefix left by a
    harness whose process is gone; return their names."""
    pattern = re.compile(rf"^{PREFIX}-(\d+)-\w+$")
    listed = run("ip", "netns", "list", check=False).stdout.split("\n")
    names = {line.split()[0] for line in listed if line.strip()}
    if NETNS_ETC.is_dir():
        names |= {p.name for p in NETNS_ETC.iterdir()}
    stale = sorted(n for n in names if (m := pattern.match(n)) and not alive(int(m.group(1))))
    for name in stale:
        delete_namespace(name)
    return stale


def delete_namespace(name: str) -> None:
    for pid in run("ip", "netns", "pids", name, check=False).stdout.split():
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(pid), signal.SIGKILL)
    run("ip", "netns", "delete", name, check=False)
    shutil.rmtree(NETNS_ETC / name, ignore_errors=True)


class Nodes(Service):
    """with Nodes(2, Link(1000)) as nodes: nodes.popen(0, [...]); nodes.cut(1)"""

    def __init__(self, count: int, link: Link = Link(), cpus: Sequence[str] = ()) -> None:
        if not 2 <= count <= 16:
            raise ValueError(f"{count} nodes: 2 to 16")
        self.count, self.cpus = count, list(cpus)
        self.tag = f"{PREFIX}-{os.getpid()}"
        self.net = f"10.78.{os.getpid() % 250}"  # any: the namespaces see only each other
        self.hub = f"{self.tag}-hub"
        self.links = [link] * count
        self.made: list[str] = []
        self.processes: list[subprocess.Popen[str]] = []

    def namespace(self, i: int) -> str:
        return f"{self.tag}-r{i}"

    def address(self, i: int) -> str:
        return f"{self.net}.{i + 1}"

    def hostname(self, i: int) -> str:
        return f"worker-{i}"

    def name(self, i: int) -> str:
        """Node i's DNS name, as <job>-<index>.<headless service> in the chart."""
        return f"{self.hostname(i)}.{SERVICE}"

    def start(self) -> None:
        require_tools()
        remove_stale()
        self.made.append(self.hub)
        run("ip", "netns", "add", self.hub)
        run("ip", "-n", self.hub, "link", "add", "br0", "type", "bridge")
        run("ip", "-n", self.hub, "link", "set", "br0", "up")
        names = [f"{self.address(i)} {self.name(i)} {self.hostname(i)}" for i in range(self.count)]
        for i in range(self.count):
            ns = self.namespace(i)
            self.made.append(ns)
            run("ip", "netns", "add", ns)
            run("ip", "-n", self.hub, "link", "add", f"v{i}", "type", "veth", "peer", "eth0",
                "netns", ns)  # fmt: skip
            run("ip", "-n", self.hub, "link", "set", f"v{i}", "master", "br0", "up")
            run("ip", "-n", ns, "addr", "add", f"{self.address(i)}/24", "dev", "eth0")
            run("ip", "-n", ns, "link", "set", "eth0", "up")
            run("ip", "-n", ns, "link", "set", "lo", "up")
            etc = NETNS_ETC / ns
            etc.mkdir(parents=True, exist_ok=True)
            (etc / "hosts").write_text("\n".join(["127.0.0.1 localhost", *names, ""]))
            self.shape(i, self.links[i])

    def shape(self, i: int, link: Link) -> None:
        """Give node i's link `link`, both directions."""
        self.links[i] = link
        for where, dev in ((self.namespace(i), "eth0"), (self.hub, f"v{i}")):
            tc = ("ip", "netns", "exec", where, "tc", "qdisc")
            run(*tc, "del", "dev", dev, "root", check=False)
            if link.mbit or link.delay_ms:
                run(*tc, "add", "dev", dev, "root", *link.qdisc())

    def cut(self, i: int, cut: bool = True) -> None:
        """Unplug node i's cable (cut=False: plug it back). Its connections stay open,
        as a switch failure leaves them: TCP retransmits until it gives up or the link
        is back."""
        run("ip", "-n", self.hub, "link", "set", f"v{i}", "down" if cut else "up")

    def popen(
        self,
        i: int,
        argv: Sequence[str],
        env: dict[str, str] | None = None,
        log: Path | None = None,
    ) -> subprocess.Popen[str]:
        """Run `argv` on node i (pinned to its CPU if cpus were given), in its own session;
        its output to `log` (else piped)."""
        pin = ["taskset", "-c", self.cpus[i % len(self.cpus)]] if self.cpus else []
        # Its own UTS namespace too: torchrun's c10d rendezvous hands out the hosting
        # node's hostname, which must name that node everywhere, as a pod's does.
        command = [
            "ip", "netns", "exec", self.namespace(i), "unshare", "--uts", "--",
            "sh", "-c", 'hostname "$0" && exec "$@"', self.hostname(i), *pin, *argv,
        ]  # fmt: skip
        out = open(log, "w") if log else subprocess.PIPE  # noqa: SIM115 (the child keeps it)
        try:
            process = subprocess.Popen(
                command, env=env, stdin=subprocess.DEVNULL, stdout=out,
                stderr=subprocess.STDOUT, text=True, start_new_session=True,
            )  # fmt: skip
        finally:
            if log:
                out.close()  # type: ignore[union-attr]
        self.processes.append(process)
        return process

    def pids(self, i: int) -> list[int]:
        """Every process in node i's namespace."""
        return [int(p) for p in run("ip", "netns", "pids", self.namespace(i)).stdout.split()]

    def stop(self) -> None:
        for process in self.processes:
            stop_group(process)
        for name in reversed(self.made):  # veth pairs go with their namespaces
            delete_namespace(name)
        self.made.clear()
