"""A real S3 server for the tests and benchmarks: Ceph's radosgw (Debian's ceph 16.2).

One monitor, one memstore OSD and one radosgw, all on free loopback ports in a folder of
their own, with auth "none" inside the cluster (S3 requests are still signed and checked
against the user created here). memstore keeps nothing across restarts, so every session
builds a fresh cluster (about 12 s) and stops it by the PIDs it started, also on failure.

    with LocalRadosgw(workdir) as rgw:
        rgw.endpoint, rgw.env  (AWS_* variables of its user)
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from harness.ports import free_ports
from mnist_pipeline.processes import ManagedProcess

DEBS = "radosgw ceph-mon ceph-osd ceph-common"
ACCESS_KEY = "MNISTPIPELINETEST"
SECRET_KEY = "mnist-pipeline-test-secret"
REGION = "us-east-1"  # radosgw answers any region of its zonegroup's default

CONFIG = """[global]
fsid = {fsid}
mon_host = [v2:127.0.0.1:{mon2},v1:127.0.0.1:{mon1}]
auth_cluster_required = none
auth_service_required = none
auth_client_required = none
osd_pool_default_size = 1
osd_pool_default_min_size = 1
mon_allow_pool_size_one = true
osd_crush_chooseleaf_type = 0
mon_data_avail_crit = 1
run_dir = {root}/run
admin_socket = {root}/run/$name.asok
log_file = {root}/log/$name.log
pid_file = {root}/run/$name.pid
ms_bind_port_min = {bind_min}
ms_bind_port_max = {bind_max}
ms_bind_ipv4 = true
ms_bind_ipv6 = false
public_addr = 127.0.0.1
[mon.a]
mon_data = {root}/mon
[osd.0]
osd_objectstore = memstore
osd_data = {root}/osd
memstore_device_bytes = 2147483648
[client.rgw.a]
rgw_frontends = beast endpoint=127.0.0.1:{rgw}
rgw_data = {root}/rgw
# Without it radosgw, with auth none, hangs 300 s (get_initial_auth_request returned -13).
ms_mon_client_mode = crc
rgw_bucket_quota_ttl = 0
"""


def missing_binaries() -> list[str]:
    return [b for b in ("ceph-mon", "ceph-osd", "radosgw", "monmaptool") if not shutil.which(b)]


class LocalRadosgw(ManagedProcess):
    """A single-node Ceph cluster serving S3 on 127.0.0.1:PORT: radosgw, and the monitor
    and OSD it stands on (started before it, stopped after it)."""

    name = "radosgw"

    def __init__(self, root: Path) -> None:
        super().__init__(log_path=root / "log" / "radosgw.out")
        self.root = root
        self.port = 0
        self.cluster: list[ManagedProcess] = []
        self.buckets = 0

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def env(self) -> dict[str, str]:
        """The variables every S3 client here runs with (never without credentials)."""
        return {
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_DEFAULT_REGION": REGION,
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def url(self, bucket: str, prefix: str = "models") -> str:
        return f"s3://127.0.0.1:{self.port}/{bucket}/{prefix}".rstrip("/")

    def ceph(self, *args: str, timeout: float = 60) -> str:
        result = subprocess.run(
            [*args, "-c", str(self.root / "ceph.conf")],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(args)}: exit {result.returncode}: {result.stderr}")
        return result.stdout

    def start(self) -> None:
        missing = missing_binaries()
        if missing:
            raise FileNotFoundError(
                f"{', '.join(missing)} not found: install the Debian packages {DEBS} "
                "(make test-deps does)"
            )
        for sub in ("run", "log", "mon", "osd", "rgw"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        mon2, mon1, self.port = free_ports(3)
        bind_min = 20000 + (os.getpid() * 37) % 30000  # daemons' own ports: a private range
        fsid = str(uuid.uuid4())
        (self.root / "ceph.conf").write_text(
            CONFIG.format(
                fsid=fsid,
                mon1=mon1,
                mon2=mon2,
                rgw=self.port,
                root=self.root,
                bind_min=bind_min,
                bind_max=bind_min + 200,
            )
        )
        monmap = str(self.root / "monmap")
        addr = f"[v2:127.0.0.1:{mon2},v1:127.0.0.1:{mon1}]"
        self.ceph("monmaptool", "--create", "--addv", "a", addr, "--fsid", fsid, monmap)
        self.ceph("ceph-mon", "--mkfs", "-i", "a", "--monmap", monmap)
        self.start_daemon("ceph-mon", "-i", "a")
        osd_uuid = str(uuid.uuid4())
        osd_id = self.ceph("ceph", "osd", "new", osd_uuid).strip()
        self.ceph("ceph-osd", "-i", osd_id, "--mkfs", "--osd-uuid", osd_uuid)
        self.start_daemon("ceph-osd", "-i", osd_id)
        self.command = self.daemon("radosgw", "-n", "client.rgw.a")
        super().start()

    def daemon(self, *cmd: str) -> list[str]:
        """A daemon's command line: in the foreground of its own process (-f), its PID ours."""
        return [*cmd, "-f", "-c", str(self.root / "ceph.conf")]

    def start_daemon(self, *cmd: str) -> None:
        process = ManagedProcess(self.daemon(*cmd), self.root / "log" / f"{cmd[0]}.out")
        self.cluster.append(process)
        process.start()

    def ready(self) -> bool:
        try:
            urllib.request.urlopen(self.endpoint, timeout=2).close()
            return True
        except urllib.error.HTTPError:
            return True  # it answers (anonymous listing refused or not): S3 is up
        except OSError:
            return False

    def wait_ready(self, timeout: float | None = None) -> None:
        super().wait_ready(timeout)
        self.ceph(
            "radosgw-admin", "user", "create", "--uid=mnist", "--display-name=mnist",
            f"--access-key={ACCESS_KEY}", f"--secret-key={SECRET_KEY}",
        )  # fmt: skip

    @property
    def rgw_pid(self) -> int:
        return self.pid

    def client(self, secret: str = SECRET_KEY) -> Any:
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=secret,
            region_name=REGION,
            config=Config(s3={"addressing_style": "path"}),
        )

    def new_bucket(self) -> str:
        """A bucket of its own for one test."""
        self.buckets += 1
        name = f"test-{os.getpid()}-{self.buckets}"
        self.client().create_bucket(Bucket=name)
        return name

    def bucket_objects(self, bucket: str) -> list[str]:
        """The object names radosgw holds in `bucket`, read without any S3 client."""
        listing = json.loads(self.ceph("radosgw-admin", "bucket", "list", f"--bucket={bucket}"))
        return sorted(entry["name"] for entry in listing)

    def set_bucket_quota(self, bucket: str, max_objects: int) -> None:
        """A bucket quota (radosgw refuses writes beyond it); -1 lifts it."""
        self.ceph(
            "radosgw-admin", "quota", "set", "--quota-scope=bucket", f"--bucket={bucket}",
            f"--max-objects={max_objects}",
        )  # fmt: skip
        self.ceph("radosgw-admin", "quota", "enable", "--quota-scope=bucket", f"--bucket={bucket}")

    def stop(self) -> None:
        """Kill every daemon started here, by its PID (memstore: nothing to flush)."""
        super().stop()
        for daemon in reversed(self.cluster):
            daemon.stop()
        self.cluster = []


@pytest.fixture(scope="session")
def radosgw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalRadosgw]:
    """One fresh Ceph cluster for the test session, stopped at the end (on failure too).
    In CI missing Ceph packages fail the tests; elsewhere they are skipped, saying so."""
    if missing_binaries() and os.environ.get("CI") != "true":
        pytest.skip(f"radosgw tests did NOT run: install {DEBS} (make test-deps)")
    with LocalRadosgw(tmp_path_factory.mktemp("radosgw")) as rgw:
        yield rgw
