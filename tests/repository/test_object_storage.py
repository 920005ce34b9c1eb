"""A model repository on object storage, against a real S3 server (Ceph's radosgw, started
fresh for the session) and the real tritonserver: export publishes to the bucket, pin and
serve download from it, prune deletes from it, wait export reads it without a volume.

One repository lives through a story (exports cost ~20 s each on 2 cores): first
publication, identical re-export, an upload the server refuses half-way (a bucket quota),
two exports from two volumes at once that clean it up and publish one version, prune,
and a worse model kept out. What every repository guarantees whatever holds it (damage
kept and reported, numbers never given again, the lock and its holders, status) is
tests/repository/test_repository.py's, on a folder and on a bucket alike. The whole file:
2 to 2.5 minutes on 2 shared cores (radosgw's start, 12 s, overlaps the training; five
export builds of ~15 s are most of it).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from harness.objectstore import LocalRadosgw
from harness.pipeline import cli_background
from harness.ports import free_ports
from mnist_pipeline.serve import LocalTriton, wheel_server

pytestmark = pytest.mark.slow

NAME = "resnet18_mnist"
PREFIX = "repo/models"


def cli(
    *args: str | Path, env: dict[str, str], timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mnist_pipeline", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **env},
    )


def ok(result: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def error_lines(result: subprocess.CompletedProcess[str]) -> list[str]:
    return [line for line in result.stderr.splitlines() if " ERROR " in line]


def train(storage: Path, run_id: str, limit: str, seed: str) -> subprocess.Popen[str]:
    quick = ["--limit-test", "500", "--checkpoint-every", "0", "--threads", "1"]
    return cli_background("train", "--storage", storage, "--run-id", run_id,
                          "--limit-train", limit, "--seed", seed, *quick)  # fmt: skip


@pytest.fixture(scope="module")
def trained(
    tmp_path_factory: pytest.TempPathFactory, mnist_storage: Path, request: pytest.FixtureRequest
) -> dict[str, Any]:
    """Two tiny runs of different accuracy, trained while radosgw starts."""
    storage = tmp_path_factory.mktemp("s3-trained") / "storage"
    shutil.copytree(mnist_storage / "data", storage / "data")
    procs = [train(storage, "low", "256", "1"), train(storage, "high", "768", "2")]
    rgw = request.getfixturevalue("radosgw")
    for proc in procs:
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err
    return {"storage": storage, "rgw": rgw}


def bucket_state(rgw: LocalRadosgw, bucket: str) -> list[str]:
    return rgw.bucket_objects(bucket)


def marked(objects: list[str]) -> list[int]:
    """The versions with their marker (metadata.json) among the bucket's objects."""
    root = f"{PREFIX}/{NAME}/"
    keys = [k[len(root) :].split("/") for k in objects if k.startswith(root)]
    return sorted(int(k[0]) for k in keys if k[0].isdigit() and k[1:] == ["metadata.json"])


def read(rgw: LocalRadosgw, bucket: str, key: str) -> dict[str, Any] | None:
    try:
        body = rgw.client().get_object(Bucket=bucket, Key=f"{PREFIX}/{NAME}/{key}")["Body"]
    except rgw.client().exceptions.NoSuchKey:
        return None
    return dict(json.loads(body.read()))


def record(rgw: LocalRadosgw, bucket: str, run_id: str) -> dict[str, Any]:
    found = read(rgw, bucket, f".export/runs/{run_id}.json")
    assert found is not None
    return found


def pin(env: dict[str, str], out: Path, *more: str) -> subprocess.CompletedProcess[str]:
    return cli(
        "pin", "--storage", "/nonexistent-volume", "--served-repository", out,
        "--instance-count", "1", "--server-cpus", "1", "--triton-backend", "python", *more,
        env=env,
    )  # fmt: skip


@pytest.fixture(scope="module")
def story(trained: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One bucket repository through its life; each step's results kept for the tests."""
    rgw: LocalRadosgw = trained["rgw"]
    bucket = rgw.new_bucket()
    env = {**rgw.env, "MNIST_PIPELINE_MODEL_REPOSITORY": rgw.url(bucket, PREFIX)}
    root = tmp_path_factory.mktemp("s3-story")
    volume_a = root / "a"
    shutil.copytree(trained["storage"], volume_a)
    volume_b = root / "b"
    shutil.copytree(trained["storage"], volume_b)
    steps: dict[str, Any] = {"rgw": rgw, "bucket": bucket, "env": env, "a": volume_a}

    steps["first"] = cli("export", "--storage", volume_a, "--run-id", "low", env=env)
    steps["after_first"] = bucket_state(rgw, bucket)
    steps["pinned_first"] = root / "pinned-first"
    steps["pin_first"] = pin(
        env, steps["pinned_first"], "--model-version", "run", "--run-id", "low"
    )
    steps["again"] = cli("export", "--storage", volume_a, "--run-id", "low", env=env)

    # The lock, the version's claim and its model.onnx fit under the quota; its marker
    # does not (nor any new record): an upload failed half-way.
    rgw.set_bucket_quota(bucket, len(bucket_state(rgw, bucket)) + 3)
    steps["refused"] = cli("export", "--storage", volume_a, "--run-id", "high", env=env)
    steps["after_refused"] = bucket_state(rgw, bucket)
    steps["refused_claim"] = read(rgw, bucket, ".export/versions/2.json")
    steps["pinned_refused"] = root / "pinned-refused"
    steps["pin_refused"] = pin(env, steps["pinned_refused"])
    steps["pin_refused_listing"] = sorted(
        p.name for p in (steps["pinned_refused"] / NAME).iterdir()
    )
    rgw.set_bucket_quota(bucket, -1)

    # Two volumes export the better run at once; the first to hold the lock cleans what
    # the refused upload left (the ledger says its claim never finished).
    both = [
        cli_background("export", "--storage", volume, "--run-id", "high", env=env)
        for volume in (volume_a, volume_b)
    ]
    logs = [p.communicate(timeout=300)[1] for p in both]
    steps["concurrent"] = [(p.returncode, log) for p, log in zip(both, logs, strict=True)]
    steps["after_concurrent"] = bucket_state(rgw, bucket)

    # The volume that won: its best_model.pth backs the new version, not version 1.
    (winner,) = [v for v, (_, err) in zip((volume_a, volume_b), steps["concurrent"], strict=True)
                 if "published resnet18_mnist version" in err]  # fmt: skip
    steps["winner"] = winner
    # The servers the two pins wrote for are gone (the Triton test serves a copy): their
    # records no longer keep version 1 from prune.
    steps["served_copy"] = root / "served-copy"
    shutil.move(steps["pinned_first"], steps["served_copy"])
    shutil.rmtree(steps["pinned_refused"])
    steps["prune"] = cli("prune", "--storage", winner, "--keep-versions", "1", env=env)
    steps["after_prune"] = bucket_state(rgw, bucket)
    steps["worse"] = cli("export", "--storage", winner, "--run-id", "low", env=env)
    steps["after_worse"] = bucket_state(rgw, bucket)
    return steps


def test_export_publishes_to_the_bucket_with_its_marker_and_the_run_s_record(
    story: dict[str, Any],
) -> None:
    ok(story["first"])
    objects = story["after_first"]
    root = f"{PREFIX}/{NAME}"
    assert f"{root}/config.pbtxt" in objects
    assert {f"{root}/1/model.onnx", f"{root}/1/metadata.json"} <= set(objects)
    assert f"{root}/.export/runs/low.json" in objects
    assert f"{root}/.export/versions/1.json" in objects  # the ledger
    assert f"{root}/.export/lock.json" not in objects  # released
    assert not (story["a"] / "checkpoints/low/export.json").exists()  # the bucket holds it
    on_bucket = record(story["rgw"], story["bucket"], "low")
    assert on_bucket["status"] == "published" and on_bucket["version"] == 1


def test_pin_downloads_the_checked_version_and_triton_serves_it_at_its_accuracy(
    story: dict[str, Any], tmp_path: Path
) -> None:
    ok(story["pin_first"])
    served = story["served_copy"] / NAME
    assert sorted(p.name for p in served.iterdir()) == ["1", "config.pbtxt"]
    assert not (served / "1").is_symlink()
    meta = json.loads((served / "1" / "metadata.json").read_text())
    assert "version_policy" in (served / "config.pbtxt").read_text()
    http, grpc, metrics = free_ports(3)
    with LocalTriton(
        story["served_copy"],
        http_port=http,
        grpc_port=grpc,
        metrics_port=metrics,
    ) as server:
        result = ok(
            cli(
                "infer",
                "--url",
                server.grpc_url,
                "--requests",
                "625",
                "--images-per-request",
                "16",
                "--concurrency",
                "2",
                "--warmup",
                "0",
                "--output",
                tmp_path,
                "--storage",
                story["a"],
                env=story["env"],
            )
        )
    (out,) = tmp_path.glob("*/latency.json")
    latency = json.loads(out.read_text())
    assert latency["images"] == 10000, result.stderr[-500:]
    # Triton's onnxruntime 1.19 against the exporter's newer one: a tie may break apart.
    assert abs(latency["accuracy"] - meta["accuracy"]) <= 0.0005


def copy_with_damaged_model(
    story: dict[str, Any], damage: Callable[[bytes], bytes]
) -> tuple[str, int, dict[str, str]]:
    """The story's newest version and config.pbtxt copied into a new bucket, its
    model.onnx passed through `damage`; the bucket, the version and an env naming it."""
    rgw, bucket = story["rgw"], story["bucket"]
    other = rgw.new_bucket()
    client = rgw.client()
    version = marked(story["after_worse"])[-1]
    for key in story["after_worse"]:
        if key.startswith(f"{PREFIX}/{NAME}/{version}/") or key.endswith("config.pbtxt"):
            body = client.get_object(Bucket=bucket, Key=key)["Body"].read()
            if key.endswith("model.onnx"):
                body = damage(body)
            client.put_object(Bucket=other, Key=key, Body=body)
    env = {**story["env"], "MNIST_PIPELINE_MODEL_REPOSITORY": rgw.url(other, PREFIX)}
    return other, version, env


def test_a_checksum_mismatch_is_refused_and_nothing_is_served(
    story: dict[str, Any], tmp_path: Path
) -> None:
    _, version, env = copy_with_damaged_model(story, lambda b: b[:-1] + bytes([b[-1] ^ 1]))
    result = pin(env, tmp_path / "served")
    assert result.returncode == 1
    (line,) = error_lines(result)
    assert "model.onnx" in line and "sha256" in line
    assert not (tmp_path / "served" / NAME / str(version)).exists()


def test_an_identical_re_export_is_skipped_and_the_bucket_unchanged(story: dict[str, Any]) -> None:
    ok(story["again"])
    assert "identical to the published version 1" in story["again"].stderr


def test_an_upload_refused_half_way_leaves_the_served_version_and_no_counted_version(
    story: dict[str, Any],
) -> None:
    refused = story["refused"]
    assert refused.returncode == 1
    (line,) = error_lines(refused)
    assert "QuotaExceeded" in line and story["bucket"] in line
    objects = story["after_refused"]
    assert f"{PREFIX}/{NAME}/2/model.onnx" in objects  # uploaded, then the marker refused
    assert f"{PREFIX}/{NAME}/2/metadata.json" not in objects
    assert marked(objects) == [1]
    assert (story["refused_claim"] or {}).get("state") == "claimed"  # cleaned by the next
    assert f"{PREFIX}/{NAME}/.export/lock.json" not in objects  # released all the same
    ok(story["pin_refused"])  # the newest version is still 1
    assert story["pin_refused_listing"] == ["1", "config.pbtxt"]


def test_an_upload_refused_half_way_is_what_the_export_reports(story: dict[str, Any]) -> None:
    refused = story["refused"]
    (line,) = error_lines(refused)
    assert f"{NAME}/2/metadata.json: QuotaExceeded" in line, line
    assert "the outcome could not be recorded" in refused.stderr


def test_two_exports_at_once_clean_the_leftovers_and_publish_one_version(
    story: dict[str, Any],
) -> None:
    codes = [code for code, _ in story["concurrent"]]
    logs = "\n".join(err for _, err in story["concurrent"])
    assert codes == [0, 0], logs[-3000:]
    assert logs.count("published resnet18_mnist version") == 1, logs[-3000:]
    assert logs.count("identical to the published version") == 1, logs[-3000:]
    assert "/2: left by an export that did not finish (" in logs
    objects = story["after_concurrent"]
    assert marked(objects) == [1, 3]  # 2 stays claimed, then deleted, in the ledger
    folders = {k.split("/")[-2] for k in objects if k.startswith(f"{PREFIX}/{NAME}/")}
    assert folders == {"1", "3", NAME, "versions", "runs", "served"}
    assert (read(story["rgw"], story["bucket"], ".export/versions/2.json") or {}).get(
        "state"
    ) == "deleted"
    assert record(story["rgw"], story["bucket"], "high")["version"] == 3


def test_prune_deletes_old_versions_from_the_bucket(story: dict[str, Any]) -> None:
    ok(story["prune"])
    before, after = marked(story["after_concurrent"]), marked(story["after_prune"])
    assert after == before[-1:]
    assert not [k for k in story["after_prune"] if k.startswith(f"{PREFIX}/{NAME}/1/")]
    removals = [line for line in story["prune"].stderr.splitlines() if " removed s3://" in line]
    assert len(removals) == len(before) - 1, removals  # each said once


def test_a_worse_model_is_not_published(story: dict[str, Any]) -> None:
    ok(story["worse"])
    assert "not better" in story["worse"].stderr
    assert marked(story["after_worse"]) == marked(story["after_prune"])
    assert record(story["rgw"], story["bucket"], "low")["status"] == "published"  # standing


def test_serve_downloads_the_newest_version_and_removes_it_on_exit(
    story: dict[str, Any], tmp_path: Path
) -> None:
    http, grpc, metrics = free_ports(3)
    version = marked(story["after_worse"])[-1]
    command = [
        sys.executable, "-m", "mnist_pipeline", "serve", "--storage", "/nonexistent-volume",
        "--http-port", str(http), "--grpc-port", str(grpc), "--metrics-port", str(metrics),
    ]  # fmt: skip
    env = {**os.environ, **story["env"], "TMPDIR": str(tmp_path)}
    server = subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{http}/v2/models/{NAME}/versions/{version}/ready"
    try:
        assert ready(url, server), server.stderr.read() if server.stderr else ""
        downloaded = list(tmp_path.glob(f"mnist-served-*/{NAME}/{version}/model.onnx"))
        assert len(downloaded) == 1
    finally:
        server.terminate()
        server.communicate(timeout=60)
    assert server.returncode == 143  # SIGTERM, as documented
    assert not list(tmp_path.glob("mnist-served-*"))


def ready(url: str, server: subprocess.Popen[Any], timeout: float = 60) -> bool:
    """Whether `url` answers 200 before `server` exits or the time is up."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and server.poll() is None:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                return bool(response.status == 200)
        except OSError:
            time.sleep(0.3)
    return False


def test_wait_export_reads_the_bucket_without_a_volume(story: dict[str, Any]) -> None:
    wait = ("wait", "export", "--storage", "/nonexistent-volume", "--wait-interval", "0.2")
    ok(cli(*wait, "--run-id", "high", env=story["env"]))
    result = cli(*wait, "--run-id", "never", "--wait-timeout", "1", env=story["env"])
    assert result.returncode == 1
    assert ".export/runs/never.json to appear" in error_lines(result)[0]


def test_the_bucket_layout_is_read_by_tritonserver_itself(
    story: dict[str, Any], tmp_path: Path
) -> None:
    """Triton reads the prefix directly, as NVIDIA's image does: it finds the model and its
    newest version (its .export folder is no model to it). Loading it takes the onnxruntime
    backend of NVIDIA's image, which the wheel's tritonserver lacks: it says so by name."""
    http, grpc, metrics = free_ports(3)
    rgw, bucket = story["rgw"], story["bucket"]
    server_command, server_env = wheel_server(tmp_path / "backends")
    cmd = [
        *server_command, f"--model-repository={rgw.url(bucket, PREFIX)}",
        "--model-control-mode=none", "--exit-on-error=false", f"--http-port={http}",
        f"--grpc-port={grpc}", f"--metrics-port={metrics}", "--allow-gpu-metrics=false",
        "--http-address=127.0.0.1", "--grpc-address=127.0.0.1", "--metrics-address=127.0.0.1",
    ]  # fmt: skip
    version = marked(story["after_worse"])[-1]
    server = subprocess.Popen(
        cmd, env={**os.environ, **server_env, **rgw.env}, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    try:
        assert ready(f"http://127.0.0.1:{http}/v2/health/live", server), server.poll()
        request = urllib.request.Request(
            f"http://127.0.0.1:{http}/v2/repository/index", data=b"{}", method="POST"
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            index = json.loads(response.read())
    finally:
        os.killpg(server.pid, 9)
        out = server.communicate()[0]
    assert b"Unable to create S3" not in out, out[-2000:]
    (model,) = index
    assert (model["name"], model["version"]) == (NAME, str(version)), index
    assert "backend library for backend 'onnxruntime'" in model["reason"], index


@pytest.mark.parametrize(
    ("what", "change", "code", "says"),
    [
        ("no credentials", {"AWS_SECRET_ACCESS_KEY": ""}, 2, "no credentials"),
        ("a wrong secret", {"AWS_SECRET_ACCESS_KEY": "wrong"}, 2, "refused these credentials"),
        ("no such bucket", {"bucket": "no-such-bucket"}, 2, "does not exist"),
        ("nothing listening", {"port": "free"}, 1, "Could not connect"),
    ],
)
def test_a_repository_that_cannot_be_used_is_one_line(
    radosgw: LocalRadosgw,
    tmp_path: Path,
    what: str,
    change: dict[str, str],
    code: int,
    says: str,
) -> None:
    bucket = change.get("bucket") or radosgw.new_bucket()
    url = radosgw.url(bucket, PREFIX)
    if "port" in change:
        url = url.replace(f":{radosgw.port}/", f":{free_ports(1)[0]}/")
    env = {**radosgw.env, **change, "MNIST_PIPELINE_MODEL_REPOSITORY": url}
    result = pin(env, tmp_path / "served")
    assert result.returncode == code, result.stderr
    assert "Traceback" not in result.stderr
    (line,) = error_lines(result)
    assert says in line and url.split("://", 1)[1].split("/", 1)[0] in line, line


def test_radosgw_honours_conditional_creates(
    radosgw: LocalRadosgw,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """What the repository's lock and its version claims rest on (If-None-Match: *)."""
    from mnist_pipeline.objectstore import BucketFiles
    from mnist_pipeline.settings import parse_model_repository

    for variable, value in radosgw.env.items():
        monkeypatch.setenv(variable, value)
    files = BucketFiles(parse_model_repository(radosgw.url(radosgw.new_bucket())), NAME)
    assert files.create("claim", b"first")
    assert not files.create("claim", b"second")
    assert files.get("claim") == b"first"
