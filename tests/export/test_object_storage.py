"""A model repository on object storage, against a real S3 server (Ceph's radosgw, started
fresh for the session) and the real tritonserver: export publishes to the bucket, pin and
serve download from it, prune deletes from it, wait export reads it without a volume.

One repository lives through a story (exports cost ~20 s each on 2 cores): first
publication, identical re-export, an upload the server refuses half-way (a bucket quota),
two exports from two volumes at once that clean it up and publish one version, prune,
and a worse model kept out. The whole file: about 140 s on 2 shared cores (radosgw's
start, 12 s, overlaps the training; six export builds of ~20 s are most of it).
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

from mnist_pipeline.serve import LocalTriton, wheel_server
from support.objectstore import LocalRadosgw
from support.ports import free_ports

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
    return subprocess.Popen(
        [sys.executable, "-m", "mnist_pipeline", "train", "--storage", str(storage),
         "--run-id", run_id, "--limit-train", limit, "--seed", seed, *quick],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


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


def servable(objects: list[str]) -> list[int]:
    from mnist_pipeline.storage import servable_in

    root = f"{PREFIX}/{NAME}/"
    return servable_in(k[len(root) :] for k in objects if k.startswith(root))


def record(rgw: LocalRadosgw, bucket: str, run_id: str) -> dict[str, Any]:
    key = f"{PREFIX}/{NAME}/.export/runs/{run_id}.json"
    body = rgw.client().get_object(Bucket=bucket, Key=key)["Body"].read()
    return dict(json.loads(body))


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

    # radosgw refuses the version's 4th object (its marker): an upload failed half-way.
    rgw.set_bucket_quota(bucket, len(steps["after_first"]) + 2)
    steps["refused"] = cli("export", "--storage", volume_a, "--run-id", "high", env=env)
    steps["after_refused"] = bucket_state(rgw, bucket)
    steps["refused_record"] = json.loads((volume_a / "checkpoints/high/export.json").read_text())
    steps["pinned_refused"] = root / "pinned-refused"
    steps["pin_refused"] = pin(env, steps["pinned_refused"])
    rgw.set_bucket_quota(bucket, -1)

    # Two volumes export the better run at once; volume a also holds the leftovers' claim.
    both = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "mnist_pipeline",
                "export",
                "--storage",
                str(volume),
                "--run-id",
                "high",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, **env},
        )
        for volume in (volume_a, volume_b)
    ]
    logs = [p.communicate(timeout=300)[1] for p in both]
    steps["concurrent"] = [(p.returncode, log) for p, log in zip(both, logs, strict=True)]
    steps["after_concurrent"] = bucket_state(rgw, bucket)

    # The volume that won: its best_model.pth backs the new version, not version 1.
    (winner,) = [v for v, (_, err) in zip((volume_a, volume_b), steps["concurrent"], strict=True)
                 if "published resnet18_mnist version" in err]  # fmt: skip
    steps["winner"] = winner
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
    assert f"{root}/.export/lock.json" not in objects  # released
    on_volume = json.loads((story["a"] / "checkpoints/low/export.json").read_text())
    assert on_volume["status"] == "published" and on_volume["version"] == 1
    assert record(story["rgw"], story["bucket"], "low")["status"] == "published"


def test_pin_downloads_the_checked_version_and_triton_serves_it_at_its_accuracy(
    story: dict[str, Any], tmp_path: Path
) -> None:
    ok(story["pin_first"])
    served = story["pinned_first"] / NAME
    assert sorted(p.name for p in served.iterdir()) == ["1", "config.pbtxt"]
    assert not (served / "1").is_symlink()
    meta = json.loads((served / "1" / "metadata.json").read_text())
    assert "version_policy" in (served / "config.pbtxt").read_text()
    http, grpc, metrics = free_ports(3)
    with LocalTriton(
        story["pinned_first"],
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
    version = servable(story["after_worse"])[-1]
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


def test_a_truncated_version_in_the_bucket_is_republished_by_its_run(
    story: dict[str, Any],
) -> None:
    """A damaged served version is never "identical": exporting its run again publishes
    it anew, saying why."""
    other, version, env = copy_with_damaged_model(story, lambda b: b[: len(b) // 2])
    again = ok(cli("export", "--storage", story["winner"], "--run-id", "high", env=env))
    assert "identical to the published version" not in again.stderr
    assert f"published resnet18_mnist version {version + 1} (republished: " in again.stderr
    assert f"/{version}/model.onnx is " in again.stderr and "bytes metadata.json records" in (
        again.stderr
    )
    assert servable(bucket_state(story["rgw"], other)) == [version, version + 1]


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
    assert servable(objects) == [1]
    ok(story["pin_refused"])  # the newest version is still 1
    assert sorted(p.name for p in (story["pinned_refused"] / NAME).iterdir()) == [
        "1",
        "config.pbtxt",
    ]
    on_volume = story["refused_record"]
    assert on_volume["status"] == "failed" and "publication failed" in on_volume["reason"]


def test_two_exports_at_once_clean_the_leftovers_and_publish_one_version(
    story: dict[str, Any],
) -> None:
    codes = [code for code, _ in story["concurrent"]]
    logs = "\n".join(err for _, err in story["concurrent"])
    assert codes == [0, 0], logs[-3000:]
    assert logs.count("published resnet18_mnist version") == 1, logs[-3000:]
    assert logs.count("identical to the published version") == 1, logs[-3000:]
    assert "left by an interrupted export" in logs
    objects = story["after_concurrent"]
    new = [v for v in servable(objects) if v != 1]
    assert len(new) == 1
    leftovers = {k.split("/")[-2] for k in objects if k.startswith(f"{PREFIX}/{NAME}/")}
    assert leftovers <= {"1", str(new[0]), NAME, "runs"}
    assert record(story["rgw"], story["bucket"], "high")["version"] == new[0]


def test_prune_deletes_old_versions_from_the_bucket(story: dict[str, Any]) -> None:
    ok(story["prune"])
    before, after = servable(story["after_concurrent"]), servable(story["after_prune"])
    assert after == before[-1:]
    assert not [k for k in story["after_prune"] if k.startswith(f"{PREFIX}/{NAME}/1/")]
    removals = [line for line in story["prune"].stderr.splitlines() if " removed s3://" in line]
    assert len(removals) == len(before) - 1, removals  # each said once


def test_a_worse_model_is_not_published(story: dict[str, Any]) -> None:
    ok(story["worse"])
    assert "not better" in story["worse"].stderr
    assert servable(story["after_worse"]) == servable(story["after_prune"])
    assert record(story["rgw"], story["bucket"], "low")["status"] == "published"  # standing


def test_serve_downloads_the_newest_version_and_removes_it_on_exit(
    story: dict[str, Any], tmp_path: Path
) -> None:
    http, grpc, metrics = free_ports(3)
    version = servable(story["after_worse"])[-1]
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
    version = servable(story["after_worse"])[-1]
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
    """What the bucket's export lock rests on (If-None-Match: *)."""
    from mnist_pipeline.objectstore import Bucket
    from mnist_pipeline.settings import parse_model_repository

    for variable, value in radosgw.env.items():
        monkeypatch.setenv(variable, value)
    store = Bucket(parse_model_repository(radosgw.url(radosgw.new_bucket())))
    assert store.put("claim", b"first", exclusive=True)
    assert not store.put("claim", b"second", exclusive=True)
    assert store.get("claim") == b"first"


def test_a_lock_left_by_a_killed_export_is_taken_over_from_its_volume_only(
    radosgw: LocalRadosgw,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An exporter killed while holding the bucket's lock: the next export from the same
    volume takes the lock over at once; one from another volume must wait for the lease."""
    from mnist_pipeline.objectstore import LOCK, S3Model
    from mnist_pipeline.settings import parse_model_repository

    for variable, value in radosgw.env.items():
        monkeypatch.setenv(variable, value)
    url = radosgw.url(radosgw.new_bucket(), PREFIX)
    volume = tmp_path / "volume-work"
    holder = (
        "import os, signal\n"
        "from pathlib import Path\n"
        "from mnist_pipeline.objectstore import S3Model\n"
        "from mnist_pipeline.settings import parse_model_repository\n"
        f"store = S3Model(parse_model_repository({url!r}), {NAME!r}, work=Path({str(volume)!r}))\n"
        "with store.exclusive():\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    killed = subprocess.run([sys.executable, "-c", holder], env={**os.environ}, timeout=60)
    assert killed.returncode == -9
    repo = parse_model_repository(url)
    assert LOCK in [k.split(f"{NAME}/", 1)[1] for k in radosgw.bucket_objects(repo.bucket)]
    assert not S3Model(repo, NAME, work=tmp_path / "other-volume")._lock_dead()
    same_volume = S3Model(repo, NAME, work=volume)
    with same_volume.exclusive():  # at once, not after the 600 s lease
        held = radosgw.client().get_object(Bucket=repo.bucket, Key=same_volume.root + LOCK)
        assert same_volume._held is not None and held["Body"].read() == same_volume._held[0]
    assert not [k for k in radosgw.bucket_objects(repo.bucket) if k.endswith(LOCK)]
    assert not list((volume / "bucket-locks").iterdir())
