"""Fault suite: processes killed at the worst moment, damaged inputs, a server that is
late, dies or gets hostile requests, storage that is full or read-only.

Every test checks two things: nothing is lost (previous checkpoints and published
versions still load and serve, no partial file is ever visible under a real name) and
the error is clear (exit code, a message naming the file or the cause, no traceback).

Processes are really killed: a small harness (`python -c`) wraps one function of the
package so that the process SIGKILLs itself at that point, then runs the CLI's main().
Production code has no test hooks. Full and read-only storage are real tmpfs mounts
(the tests run as root). docs/RELIABILITY.md maps each fault to the test proving it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from harness.pipeline import cli, snapshot
from harness.ports import free_ports
from harness.serving import pinned_models, triton_processes
from mnist_pipeline import data, model, tritonconfig
from mnist_pipeline.repository import DAMAGED, LEFTOVER, Repository, open_repository
from mnist_pipeline.serve import LocalTriton
from mnist_pipeline.storage import (
    CONFIG_FILE,
    DEFAULT_MODEL_NAME,
    METADATA_FILE,
    MODEL_FILE,
    ModelRepository,
    model_dir,
    raw_data_dir,
    run_dir,
    temp_files,
)

pytestmark = pytest.mark.slow

NAME = DEFAULT_MODEL_NAME
TINY = "--limit-train 1000 --limit-test 1000 --batch-size 50".split()

# Runs the CLI with one function wrapped so that the process SIGKILLs itself there:
#   argv: MODULE FUNCTION MODE N -- CLI ARGS
#   MODE before: die on the N-th call, before it runs; after: once it returned;
#        half: (for torch.save) write half of the N-th file, flush it to disk, then die.
HARNESS = """
import importlib, io, os, signal, sys
module, name, mode, nth = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
target = importlib.import_module(module)
real = getattr(target, name)
calls = 0
def die():
    os.kill(os.getpid(), signal.SIGKILL)
def wrapped(*args, **kwargs):
    global calls
    calls += 1
    if calls != nth:
        return real(*args, **kwargs)
    if mode == "before":
        die()
    if mode == "half":
        buffer = io.BytesIO()
        real(args[0], buffer)
        f = args[1]
        f.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
        f.flush()
        os.fsync(f.fileno())
        die()
    result = real(*args, **kwargs)
    die()
    return result
setattr(target, name, wrapped)
sys.argv = ["mnist-pipeline", *sys.argv[sys.argv.index("--") + 1 :]]
from mnist_pipeline.cli import main
main()
"""


def killed_at(
    module: str, function: str, mode: str, nth: int, *args: str | Path
) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [sys.executable, "-c", HARNESS, module, function, mode, str(nth), "--", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == -signal.SIGKILL, (result.returncode, result.stderr[-3000:])
    return result


def no_traceback(result: subprocess.CompletedProcess[str]) -> None:
    assert "Traceback" not in result.stderr, result.stderr[-3000:]


def repository(storage: Path) -> Repository:
    return open_repository(ModelRepository(folder=storage / "models"), NAME)


def export_record(storage: Path, run_id: str) -> dict[str, Any]:
    record = repository(storage).read_record(run_id)
    assert record is not None, f"no export record for {run_id}"
    return record


def servable_versions_are_complete(storage: Path) -> list[int]:
    """What a server would be given (pin serves nothing else): config.pbtxt that parses,
    and versions whose every byte is what their metadata.json records."""
    model_path = model_dir(storage, NAME)
    scan = repository(storage).scan()
    assert scan.config_damage is None
    tritonconfig.parse_config((model_path / CONFIG_FILE).read_text())
    for version in scan.servable:
        meta = json.loads((model_path / str(version) / METADATA_FILE).read_text())
        onnx = (model_path / str(version) / MODEL_FILE).read_bytes()
        assert meta["sha256"] == hashlib.sha256(onnx).hexdigest(), f"{version} is partial"
    return scan.servable


def published_state(models: Path) -> dict[str, Any]:
    """Every file of the repository but the runs' export records, which every export
    extends: versions, ledger, config.pbtxt."""
    return {k: v for k, v in snapshot(models).items() if "/.export/runs" not in f"/{k}"}


# Fixtures ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory, mnist_storage: Path) -> dict[str, Any]:
    """A storage with one tiny completed run ("base") published as version 1, and a second
    one ("better") not yet exported, so that exporting it publishes version 2. Export
    measures accuracy itself on all 10000 test images and never republishes the same
    weights, so "base" is "better" with one class silenced (its logit lowered by 50): a
    different model, measurably worse. Tests copy it before changing anything."""
    storage = tmp_path_factory.mktemp("base") / "storage"
    shutil.copytree(mnist_storage / "data", storage / "data")
    cli("train", "--storage", storage, "--run-id", "better", "--epochs", "2", *TINY, check=True)
    payload = torch.load(run_dir(storage, "better") / "model.pth", weights_only=True)
    images, labels = data.load(storage, "test")
    with torch.no_grad():
        logits = model.from_checkpoint(payload)(torch.from_numpy(data.normalize(images)))
    predicted = logits.argmax(1).numpy()
    silenced = int(np.bincount(predicted[predicted == labels], minlength=10).argmax())
    worse = {**payload, "run_id": "base", "state_dict": dict(payload["state_dict"])}
    worse["state_dict"]["fc.bias"] = payload["state_dict"]["fc.bias"].clone()
    worse["state_dict"]["fc.bias"][silenced] -= 50.0
    run_dir(storage, "base").mkdir()
    torch.save(worse, run_dir(storage, "base") / "model.pth")
    metrics = json.loads((run_dir(storage, "better") / "metrics.json").read_text())
    (run_dir(storage, "base") / "metrics.json").write_text(
        json.dumps({**metrics, "run_id": "base"})
    )
    cli("export", "--storage", storage, "--run-id", "base", check=True)
    with torch.no_grad():
        kept = model.from_checkpoint(worse)(torch.from_numpy(data.normalize(images))).argmax(1)
    assert (kept.numpy() == labels).mean() < (predicted == labels).mean()

    # Test images both models classify right, for "a correct request gets a correct answer".
    x = data.normalize(images[:200])
    both = (predicted[:200] == labels[:200]) & (kept.numpy()[:200] == labels[:200])
    right = np.flatnonzero(both)[:4]
    assert len(right) == 4, "the tiny model should get a few of 200 digits right"
    return {"storage": storage, "x": x[right], "labels": labels[right].astype(int)}


def copy_storage(base: dict[str, Any], dest: Path) -> Path:
    shutil.copytree(base["storage"], dest, symlinks=True)
    return dest


def ask(url: str, x: np.ndarray, datatype: str = "FP32", shape: list[int] | None = None) -> Any:
    client = grpcclient.InferenceServerClient(url)
    try:
        tensor = grpcclient.InferInput("input", shape or list(x.shape), datatype)
        tensor.set_data_from_numpy(x)
        return client.infer(NAME, [tensor], client_timeout=60).as_numpy("output")
    finally:
        client.close()


def answers_right(url: str, base: dict[str, Any]) -> None:
    logits = ask(url, base["x"])
    assert logits.argmax(1).tolist() == base["labels"].tolist()


@contextlib.contextmanager
def triton(models: Path, workdir: Path) -> Iterator[LocalTriton]:
    """The real local Triton (what `mnist-pipeline serve` runs) on free loopback ports,
    serving the newest version of the repository folder `models`."""
    http, grpc, metrics = free_ports(3)
    server = LocalTriton(
        pinned_models(models, workdir.parent / f"{workdir.name}-served"),
        workdir=workdir,
        http_port=http,
        grpc_port=grpc,
        metrics_port=metrics,
    )
    try:
        with server:
            yield server
    finally:
        server.stop()
        for pid, _ in triton_processes(str(workdir)):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


# 1. Training killed while writing a checkpoint ---------------------------------------------

# 10 steps: resume.pth after steps 3, 6 and 9 and at the epoch's end, then model.pth.
SHORT = "--epochs 1 --checkpoint-every 3 --limit-train 500 --limit-test 500 --batch-size 50"
TRAIN_KILL = SHORT.split()


@pytest.mark.parametrize(
    ("save_call", "file", "epoch", "step"),
    [(2, "resume.pth", 0, 3), (5, "model.pth", 1, 0)],
    ids=["resume.pth", "model.pth"],
)
def test_killed_while_writing_a_checkpoint_keeps_the_previous_one(
    storage: Path, save_call: int, file: str, epoch: int, step: int
) -> None:
    args = ["train", "--storage", storage, "--run-id", "k", *TRAIN_KILL]
    killed_at("torch", "save", "half", save_call, *args)
    out = run_dir(storage, "k")
    assert temp_files(out, file), "the half-written file should be there, under a temp name"
    state = torch.load(out / "resume.pth", weights_only=True)  # the previous one, whole
    assert (state["epoch"], state["step_in_epoch"]) == (epoch, step)
    assert not (out / "model.pth").exists()
    assert json.loads((out / "metrics.json").read_text())["status"] == "running"

    # The half file is not taken for a checkpoint: export finds no completed run.
    refused = cli("export", "--storage", storage, "--run-id", "k")
    assert refused.returncode == 2 and "is not complete" in refused.stderr
    no_traceback(refused)

    resumed = cli(*args, check=True)
    assert f"resuming run k at epoch {epoch + 1}, step {step}/10" in resumed.stderr
    assert "left by an interrupted checkpoint write" in resumed.stderr
    assert sorted(p.name for p in out.iterdir()) == ["metrics.json", "model.pth", "train.log"]
    model.from_checkpoint(torch.load(out / "model.pth", weights_only=True))
    assert json.loads((out / "metrics.json").read_text())["status"] == "complete"


# 2. Export killed at each step --------------------------------------------------------------

# (module, function, mode, nth): where the export process SIGKILLs itself; then the
# servable versions, and the version the export of "better" publishes after it.
EXPORT_KILLS = {
    # ONNX built and optimised in memory, nothing written, the lock not held.
    "onnx-built": (("mnist_pipeline.export", "check_parity", "before", 1), [1], 2),
    # Version 2 claimed in the ledger and config.pbtxt written, no file of 2 yet.
    "config-written": (("mnist_pipeline.folder", "atomic_write_bytes", "after", 1), [1], 3),
    # 2/model.onnx written, its metadata.json (the marker) not yet: a leftover.
    "onnx-written": (("mnist_pipeline.folder", "atomic_write_bytes", "after", 2), [1], 3),
    # The marker written, the ledger still saying "claimed".
    "marker-written": (("mnist_pipeline.folder", "atomic_write_bytes", "before", 3), [1, 2], 2),
    # Version 2 published, best_model.pth and the run's record not yet updated.
    "version-published": (("mnist_pipeline.export", "point_best_model", "before", 1), [1, 2], 2),
}


@pytest.mark.parametrize("step", EXPORT_KILLS)
def test_export_killed_at_each_step_leaves_a_servable_repository(
    base: dict[str, Any], tmp_path: Path, step: str
) -> None:
    storage = copy_storage(base, tmp_path / "s")
    version_1 = snapshot(model_dir(storage, NAME) / "1")
    kill, servable, republished = EXPORT_KILLS[step]
    killed_at(*kill, "export", "--storage", storage, "--run-id", "better")

    assert servable_versions_are_complete(storage) == servable
    assert snapshot(model_dir(storage, NAME) / "1") == version_1
    with triton(storage / "models", tmp_path / "triton") as server:
        answers_right(server.grpc_url, base)

    again = cli("export", "--storage", storage, "--run-id", "better", check=True)
    no_traceback(again)
    if step != "onnx-built":  # killed holding the lock: its death is proven, no lease waited
        assert "taking over" in again.stderr and "is gone" in again.stderr
    assert servable_versions_are_complete(storage) == [1, republished]
    scan = repository(storage).scan()
    assert scan.having(LEFTOVER, DAMAGED) == []  # what the kill left went under the lock
    assert scan.high_water == republished  # a number claimed once is never given again
    best = (storage / "checkpoints" / "best_model.pth").resolve()
    assert best == (run_dir(storage, "better") / "model.pth").resolve()
    # The record the kill lost is written now: published, never "skipped as identical".
    record = export_record(storage, "better")
    assert (record["status"], record["version"]) == ("published", republished)


def test_first_export_killed_while_publishing_leaves_nothing_to_serve(
    base: dict[str, Any], tmp_path: Path
) -> None:
    storage = copy_storage(base, tmp_path / "s")
    shutil.rmtree(storage / "models")
    (storage / "checkpoints" / "best_model.pth").unlink()
    # Killed once config.pbtxt is written, before any file of version 1.
    killed_at("mnist_pipeline.folder", "atomic_write_bytes", "after", 1, "export",
              "--storage", storage, "--run-id", "base")  # fmt: skip
    assert repository(storage).scan().servable == []
    http, grpc, metrics = free_ports(3)  # whatever listens on Triton's default ports
    ports = [f"--http-port={http}", f"--grpc-port={grpc}", f"--metrics-port={metrics}"]
    refused = cli("serve", "--storage", storage, *ports)
    assert refused.returncode == 2 and "run `mnist-pipeline export`" in refused.stderr
    no_traceback(refused)

    cli("export", "--storage", storage, "--run-id", "base", check=True)
    # 1 was claimed by the killed export: the next number.
    assert servable_versions_are_complete(storage) == [2]
    assert repository(storage).scan().having(LEFTOVER, DAMAGED) == []


def test_a_damaged_published_version_is_noticed_refused_and_republished(
    base: dict[str, Any], tmp_path: Path
) -> None:
    """A truncated served model.onnx was called "identical" (exit 0) by a re-export of its
    run and "not better" by a worse run: the repository stayed unservable. Damage is kept
    and reported, never removed: its number is never given again."""
    storage = copy_storage(base, tmp_path / "s")
    cli("export", "--storage", storage, "--run-id", "better", check=True)  # version 2
    served = model_dir(storage, NAME) / "2" / "model.onnx"
    size = served.stat().st_size
    served.write_bytes(served.read_bytes()[: 1 << 20])
    damage = f"{served} is {1 << 20} bytes, not the {size} bytes {METADATA_FILE} records"
    hint = "re-export the run it came from: mnist-pipeline export --run-id better"

    http, grpc, metrics = free_ports(3)
    ports = [f"--http-port={http}", f"--grpc-port={grpc}", f"--metrics-port={metrics}"]
    refused = cli("serve", "--storage", storage, *ports)
    assert refused.returncode == 1 and damage in refused.stderr and hint in refused.stderr
    no_traceback(refused)
    pinned = cli("pin", "--storage", storage, "--served-repository", tmp_path / "pinned",
                 "--model-version", "2")  # fmt: skip
    assert pinned.returncode == 1 and damage in pinned.stderr and hint in pinned.stderr
    status = cli("status", "--storage", storage, "--json")
    assert status.returncode == 1, status.stderr[-3000:]
    report = json.loads(status.stdout)
    assert report["damaged"] == {"2": damage} and report["servable"] == [1]
    assert [v["remedy"] for v in report["versions"]] == [None, hint]

    before = published_state(storage / "models")
    worse = cli("export", "--storage", storage, "--run-id", "base")  # identical to version 1
    assert worse.returncode == 1, worse.stderr[-3000:]
    assert f"the newest version 2 is damaged: {damage}; {hint}" in worse.stderr
    assert published_state(storage / "models") == before
    assert export_record(storage, "base")["history"][-1]["status"] == "failed"

    again = cli("export", "--storage", storage, "--run-id", "better", check=True)
    assert "identical to the published version" not in again.stderr
    record = export_record(storage, "better")
    assert (record["status"], record["version"]) == ("published", 3)
    assert record["reason"].startswith(f"republished: {damage}")
    scan = repository(storage).scan()
    assert scan.servable == [1, 3] and scan.damaged == {2: damage}
    assert served.stat().st_size == 1 << 20  # kept as it was found, for the operator

    # A config.pbtxt cut short is rewritten from the export's settings, even on a skip.
    config = model_dir(storage, NAME) / CONFIG_FILE
    config.write_text(config.read_text()[:40])
    skipped = cli("export", "--storage", storage, "--run-id", "better", check=True)
    assert "rewritten from this export's settings" in skipped.stderr
    tritonconfig.parse_config(config.read_text())
    with triton(storage / "models", tmp_path / "triton") as server:
        answers_right(server.grpc_url, base)


def test_pin_neither_waits_for_nor_takes_the_repository_lock(
    base: dict[str, Any], tmp_path: Path
) -> None:
    """Readers never lock: a version appears whole (its marker written last) or not at
    all, and pin checks every byte it places. A pin (a Triton pod starting) goes on while
    an export or prune holds the lock."""
    storage = copy_storage(base, tmp_path / "s")
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys; from pathlib import Path\n"
         "from mnist_pipeline.repository import open_repository\n"
         "from mnist_pipeline.storage import ModelRepository\n"
         f"repo = open_repository(ModelRepository(folder=Path({str(storage / 'models')!r})), "
         f"{NAME!r})\n"
         "with repo.lock.held('export'):\n"
         "    print('held', flush=True); sys.stdin.readline()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    pinned = tmp_path / "pinned"
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        pin = cli("pin", "--storage", storage, "--served-repository", pinned, timeout=60)
        assert pin.returncode == 0, pin.stderr[-3000:]
        assert (pinned / NAME / "1" / "model.onnx").is_file()
        lock = repository(storage).lock.holder_now()
        assert lock is not None and lock.pid == holder.pid  # still the export's
    finally:
        holder.communicate("\n", timeout=30)
    assert repository(storage).lock.holder_now() is None


# 3. Bad data reaching the stages that read it from storage ---------------------------------


def _damage(path: Path, offset: int, value: int) -> None:
    content = bytearray(path.read_bytes())
    content[offset] = value
    path.write_bytes(bytes(content))


def test_train_on_damaged_storage_data_names_the_file(storage: Path) -> None:
    labels = raw_data_dir(storage) / "train-labels-idx1-ubyte"
    _damage(labels, 100, 11)
    result = cli("train", "--storage", storage, "--run-id", "bad", *TINY)
    assert result.returncode == 2
    assert f"{labels}: label 11 at record 92 is out of range" in result.stderr
    no_traceback(result)
    assert not (run_dir(storage, "bad") / "model.pth").exists()


def test_infer_on_damaged_storage_data_names_the_file(storage: Path) -> None:
    images = raw_data_dir(storage) / "t10k-images-idx3-ubyte"
    images.write_bytes(images.read_bytes()[:1000])
    result = cli("infer", "--storage", storage, "--url", "127.0.0.1:1", "--timeout", "1")
    assert result.returncode == 2
    assert f"{images}: truncated" in result.stderr
    no_traceback(result)


def test_export_on_damaged_storage_data_names_the_file(
    base: dict[str, Any], tmp_path: Path
) -> None:
    storage = copy_storage(base, tmp_path / "s")
    images = raw_data_dir(storage) / "t10k-images-idx3-ubyte"
    _damage(images, 2, 0x09)  # magic number
    before = published_state(storage / "models")
    result = cli("export", "--storage", storage, "--run-id", "better")
    assert result.returncode == 2
    assert f"{images}: wrong magic number" in result.stderr
    no_traceback(result)
    assert published_state(storage / "models") == before


# 4. A damaged resume.pth --------------------------------------------------------------------


class RunsCode:
    """Unpickling this would run a command."""

    def __init__(self, witness: Path) -> None:
        self.witness = witness

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.witness}",))


@pytest.mark.parametrize("damage", ["garbage", "truncated", "runs-code", "foreign"])
def test_train_refuses_a_damaged_resume_checkpoint(
    storage: Path, tmp_path: Path, damage: str
) -> None:
    out = run_dir(storage, "r")
    out.mkdir(parents=True)
    state = out / "resume.pth"
    witness = tmp_path / "code-ran"
    if damage == "garbage":
        state.write_bytes(os.urandom(4096))
    elif damage == "truncated":
        torch.save({"model": model.build().state_dict()}, state)
        state.write_bytes(state.read_bytes()[:100_000])
    elif damage == "runs-code":
        torch.save({"config": RunsCode(witness)}, state)
    else:
        torch.save({"weights": torch.zeros(3)}, state)
    content = state.read_bytes()

    args = ["train", "--storage", storage, "--run-id", "r", *TRAIN_KILL]
    result = cli(*args)
    assert result.returncode == 2, result.stderr[-2000:]
    assert f"{state}: cannot resume run r from it" in result.stderr
    assert "delete it to train this run from the start, or pick a new --run-id" in result.stderr
    no_traceback(result)
    assert not witness.exists()
    assert state.read_bytes() == content  # the user decides what to do with it
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["status"] == "failed" and "cannot resume" in metrics["error"]

    if damage == "garbage":  # following the advice works
        state.unlink()
        cli(*args, check=True)
        assert json.loads((out / "metrics.json").read_text())["status"] == "complete"


# 5. Server faults ---------------------------------------------------------------------------


def served_count(server: LocalTriton) -> int:
    with urllib.request.urlopen(server.metrics_url, timeout=5) as response:
        text = response.read().decode()
    return sum(
        int(float(line.rsplit(" ", 1)[1]))
        for line in text.splitlines()
        if line.startswith("nv_inference_request_success{") and f'model="{NAME}"' in line
    )


def test_server_ready_late_is_waited_for(base: dict[str, Any], tmp_path: Path) -> None:
    storage = copy_storage(base, tmp_path / "s")
    http, grpc, metrics = free_ports(3)
    t0 = time.monotonic()
    client = subprocess.Popen(
        [sys.executable, "-m", "mnist_pipeline", "infer", "--storage", str(storage), "--url",
         f"127.0.0.1:{grpc}", "--timeout", "90", "--requests", "20", "--warmup", "2"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    server = LocalTriton(
        pinned_models(storage / "models", tmp_path / "served"),
        workdir=tmp_path / "triton",
        http_port=http,
        grpc_port=grpc,
        metrics_port=metrics,
    )
    try:
        time.sleep(3)  # the client is polling a port nobody listens on yet
        assert client.poll() is None
        with server:
            _, err = client.communicate(timeout=120)
    finally:
        if client.poll() is None:
            client.kill()
            client.wait()
        server.stop()
    assert client.returncode == 0, err[-3000:]
    assert time.monotonic() - t0 > 3
    (out,) = (storage / "inference").iterdir()
    report = json.loads((out / "latency.json").read_text())
    assert report["status"] == "complete" and report["count"] == 20


def test_server_killed_mid_run_fails_clearly_and_keeps_measurements(
    base: dict[str, Any], tmp_path: Path
) -> None:
    storage = copy_storage(base, tmp_path / "s")
    with triton(storage / "models", tmp_path / "triton") as server:
        client = subprocess.Popen(
            [sys.executable, "-m", "mnist_pipeline", "infer", "--storage", str(storage),
             "--url", server.grpc_url, "--timeout", "3", "--requests", "1000000",
             "--warmup", "0", "--max-seconds", "120"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 60
            while served_count(server) < 30:
                assert client.poll() is None, client.communicate()[1][-3000:]
                assert time.monotonic() < deadline, "the client sent nothing"
                time.sleep(0.2)
            assert server.process is not None
            os.kill(server.process.pid, signal.SIGKILL)  # tritonserver itself, mid-request
            killed = time.monotonic()
            _, err = client.communicate(timeout=60)
        finally:
            if client.poll() is None:
                client.kill()
                client.wait()
    assert client.returncode == 1, err[-3000:]
    assert time.monotonic() - killed < 30  # retried within its bound, then gave up
    assert "server unavailable" in err and "retrying for up to 3 s" in err
    assert "inference failed" in err and "server unavailable for 3 s" in err
    assert "Traceback" not in err
    (out,) = (storage / "inference").iterdir()
    report = json.loads((out / "latency.json").read_text())
    assert report["status"] == "failed" and report["count"] >= 30
    assert report["p50_ms"] > 0 and report["accuracy"] is not None
    assert len(json.loads((out / "samples.json").read_text())) == 10
    assert (out / "inference.log").is_file()


def test_server_restarted_mid_run_lets_the_client_finish(
    base: dict[str, Any], tmp_path: Path
) -> None:
    """A Triton pod restarted under the client: requests are retried until it is back."""
    storage = copy_storage(base, tmp_path / "s")
    ports = dict(zip(("http_port", "grpc_port", "metrics_port"), free_ports(3), strict=True))
    served = pinned_models(storage / "models", tmp_path / "served")
    first = LocalTriton(served, workdir=tmp_path / "t1", **ports)
    second = LocalTriton(served, workdir=tmp_path / "t2", **ports)
    client = None
    try:
        with first:
            client = subprocess.Popen(
                [sys.executable, "-m", "mnist_pipeline", "infer", "--storage", str(storage),
                 "--url", first.grpc_url, "--timeout", "120", "--requests", "2000",
                 "--warmup", "0"],
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
            )  # fmt: skip
            deadline = time.monotonic() + 60
            while served_count(first) < 20:
                assert client.poll() is None, client.communicate()[1][-3000:]
                assert time.monotonic() < deadline, "the client sent nothing"
                time.sleep(0.1)
            assert first.process is not None
            os.kill(first.process.pid, signal.SIGKILL)
        with second:
            _, err = client.communicate(timeout=300)
    finally:
        if client is not None and client.poll() is None:
            client.kill()
            client.wait()
        first.stop()
        second.stop()
    assert client.returncode == 0, err[-3000:]
    assert "server unavailable" in err and "retrying" in err
    (out,) = (storage / "inference").iterdir()
    report = json.loads((out / "latency.json").read_text())
    assert report["status"] == "complete" and report["count"] == 2000 and report["errors"] == 0


# 6. Hostile requests ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def read_only_models(
    base: dict[str, Any], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Path]:
    """The published repository through a read-only bind mount, as a PVC mounted read-only
    into the Triton pod; the plain folder where mounting is not permitted."""
    source = base["storage"] / "models"
    target = tmp_path_factory.mktemp("ro-models")
    try:
        mount("--bind", source, target)
    except OSError:
        yield source
        return
    try:
        mount("-o", "remount,bind,ro", target)
        yield target
    finally:
        umount(target)


@pytest.fixture(scope="module")
def hostile_server(
    read_only_models: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LocalTriton]:
    with triton(read_only_models, tmp_path_factory.mktemp("triton-hostile")) as server:
        yield server


def _images(n: int) -> np.ndarray:
    return np.random.default_rng(0).normal(size=(n, 1, 28, 28)).astype(np.float32)


HOSTILE = {
    "wrong-shape": (lambda: _images(2)[:, :, :, :27], "FP32", "unexpected shape"),
    "flat-shape": (lambda: _images(2).reshape(2, 784), "FP32", "unexpected shape"),
    "wrong-dtype": (lambda: _images(2).astype(np.float64), "FP64", "data-type"),
    "int-dtype": (lambda: (_images(2) * 100).astype(np.int32), "INT32", "data-type"),
    "batch-17": (lambda: _images(17), "FP32", "batch-size must be <= 16"),
    # 62.7 MB in one request: refused on its batch size, the server unharmed.
    "oversized": (lambda: _images(20_000), "FP32", "batch-size must be <= 16"),
}


@pytest.mark.parametrize("case", HOSTILE)
def test_hostile_request_is_rejected_and_the_server_still_answers(
    hostile_server: LocalTriton, base: dict[str, Any], case: str
) -> None:
    make, datatype, message = HOSTILE[case]
    with pytest.raises(InferenceServerException, match=message):
        ask(hostile_server.grpc_url, make(), datatype)
    answers_right(hostile_server.grpc_url, base)


def test_payload_larger_than_its_declared_shape_is_rejected(
    hostile_server: LocalTriton, base: dict[str, Any]
) -> None:
    client = grpcclient.InferenceServerClient(hostile_server.grpc_url)
    try:
        tensor = grpcclient.InferInput("input", [1, 1, 28, 28], "FP32")
        tensor.set_data_from_numpy(_images(1))
        tensor._raw_content = _images(4).tobytes()  # 4 images' bytes behind a 1-image shape
        with pytest.raises(InferenceServerException, match="byte size mismatch"):
            client.infer(NAME, [tensor], client_timeout=30)
    finally:
        client.close()
    answers_right(hostile_server.grpc_url, base)


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_non_finite_input_gives_non_finite_output(
    hostile_server: LocalTriton, base: dict[str, Any], value: float
) -> None:
    """Served as sent, like the onnxruntime backend does: NaN/Inf pixels reach the network
    and the logits come back NaN, so no digit is claimed. The client never sends such
    input (it normalises real uint8 images); other clients must check their own."""
    x = base["x"][:1].copy()
    x[0, 0, 14, 14] = value
    logits = ask(hostile_server.grpc_url, x)
    assert logits.shape == (1, 10) and not np.isfinite(logits).all()
    answers_right(hostile_server.grpc_url, base)


def test_server_listens_on_loopback_only(hostile_server: LocalTriton) -> None:
    """The default bind address is 127.0.0.1 (the chart sets 0.0.0.0 in the pod)."""
    listening = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            if state == "0A":  # LISTEN
                address, port = local.rsplit(":", 1)
                listening.add((address, int(port, 16)))
    ports = {hostile_server.grpc_port, hostile_server.http_port, hostile_server.metrics_port}
    bound = {(address, port) for address, port in listening if port in ports}
    assert {port for _, port in bound} == ports
    # 127.0.0.1, as IPv4 or IPv4-mapped IPv6 (::ffff:127.0.0.1): nothing else.
    assert {address for address, _ in bound} <= {"0100007F", "0000000000000000FFFF00000100007F"}


# 7. Full and read-only storage --------------------------------------------------------------


def mount(*args: str | Path) -> None:
    result = subprocess.run(["mount", *map(str, args)], capture_output=True, text=True)
    if result.returncode != 0:
        raise OSError(f"mount {' '.join(map(str, args))}: {result.stderr.strip()}")


def umount(path: Path) -> None:
    result = subprocess.run(["umount", str(path)], capture_output=True, text=True)
    if result.returncode != 0:
        subprocess.run(["umount", "-l", str(path)], capture_output=True, text=True)


@pytest.fixture
def volume(tmp_path: Path) -> Iterator[Path]:
    """A real 200 MB tmpfs, unmounted after the test, standing in for the PVC."""
    path = tmp_path / "volume"
    path.mkdir()
    try:
        mount("-t", "tmpfs", "-o", "size=200m,mode=0755", "tmpfs", path)
    except OSError as e:
        pytest.skip(f"needs permission to mount a tmpfs (root, CAP_SYS_ADMIN): {e}")
    try:
        yield path
    finally:
        umount(path)


def fill(volume: Path, leave: int = 0) -> None:
    """Take all but `leave` bytes of the volume's free space."""
    stat = os.statvfs(volume)
    free = stat.f_bavail * stat.f_frsize - leave
    with open(volume / "ballast", "wb") as f:
        if free > 0:
            os.posix_fallocate(f.fileno(), 0, free)


def read_only(volume: Path) -> None:
    mount("-o", "remount,ro", volume)


def assert_no_temp_files(root: Path) -> None:
    assert not [p for p in root.rglob(".*") if p.name.endswith(".tmp")], "partial files left"


def test_data_on_full_or_read_only_storage(volume: Path) -> None:
    storage = volume / "storage"
    fill(volume, leave=1 << 20)
    full = cli("data", "--storage", storage)
    assert full.returncode == 1, full.stderr[-2000:]
    assert "No space left on device: " in full.stderr and str(raw_data_dir(storage)) in full.stderr
    no_traceback(full)
    assert list(raw_data_dir(storage).iterdir()) == []  # staging removed, nothing half placed

    (volume / "ballast").unlink()
    read_only(volume)
    ro = cli("data", "--storage", storage)
    assert ro.returncode == 1 and f"Read-only file system: {raw_data_dir(storage)}" in ro.stderr
    no_traceback(ro)


def test_checkpoint_write_on_a_full_volume_keeps_the_previous_checkpoint(
    volume: Path, mnist_storage: Path
) -> None:
    storage = volume / "storage"
    storage.mkdir()
    (storage / "data").symlink_to(mnist_storage / "data")  # only checkpoints on the volume
    out = run_dir(storage, "full")
    out.mkdir(parents=True)
    args = ["train", "--storage", storage, "--run-id", "full", *TRAIN_KILL]
    # Room for one resume.pth (~90 MB) and the logs, not for a second beside it.
    fill(volume, leave=130 << 20)
    result = cli(*args)
    assert result.returncode == 1, result.stderr[-3000:]
    assert f"No space left on device: {out / 'resume.pth'}" in result.stderr
    no_traceback(result)
    state = torch.load(out / "resume.pth", weights_only=True)
    assert (state["epoch"], state["step_in_epoch"]) == (0, 3)
    assert_no_temp_files(storage)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["status"] == "failed" and "No space left" in metrics["error"]

    (volume / "ballast").unlink()  # space freed: the run goes on from where it stopped
    resumed = cli(*args, check=True)
    assert "resuming run full at epoch 1, step 3/10" in resumed.stderr
    model.from_checkpoint(torch.load(out / "model.pth", weights_only=True))


def test_export_on_full_or_read_only_storage_changes_nothing(
    volume: Path, base: dict[str, Any]
) -> None:
    storage = volume / "storage"
    storage.mkdir()
    (storage / "data").symlink_to(base["storage"] / "data")
    shutil.copytree(base["storage"] / "checkpoints", storage / "checkpoints", symlinks=True)
    shutil.copytree(base["storage"] / "models", storage / "models")
    version_1 = snapshot(model_dir(storage, NAME) / "1")
    fill(volume, leave=4 << 20)  # not enough for a second model.onnx (~45 MB)

    full = cli("export", "--storage", storage, "--run-id", "better")
    assert full.returncode == 1, full.stderr[-3000:]
    assert "No space left on device: " in full.stderr and "model.onnx" in full.stderr
    no_traceback(full)
    assert snapshot(model_dir(storage, NAME) / "1") == version_1
    scan = repository(storage).scan()
    # Its claim of 2 is a leftover the next export's repair removes; never damage.
    assert scan.servable == [1] and scan.damaged == {}
    assert [v.number for v in scan.having(LEFTOVER)] in ([], [2])
    # Recorded, so that the chart's `wait export` fails now instead of at its timeout.
    attempt = export_record(storage, "better")
    assert attempt["history"][-1]["status"] == "failed"
    assert "No space left on device" in attempt["history"][-1]["reason"]
    assert_no_temp_files(storage / "models")
    before = snapshot(storage / "models")

    (volume / "ballast").unlink()
    read_only(volume)
    ro = cli("export", "--storage", storage, "--run-id", "better")
    assert ro.returncode == 1 and "Read-only file system: " in ro.stderr
    assert str(storage) in ro.stderr
    no_traceback(ro)
    assert snapshot(storage / "models") == before


def test_infer_on_full_or_read_only_storage_names_the_path(
    volume: Path, mnist_storage: Path, hostile_server: LocalTriton
) -> None:
    storage = volume / "storage"
    storage.mkdir()
    (storage / "data").symlink_to(mnist_storage / "data")
    (storage / "inference").mkdir()
    fill(volume)
    args = ["infer", "--storage", storage, "--url", hostile_server.grpc_url, "--requests", "5"]
    full = cli(*args)
    assert full.returncode == 1, full.stderr[-3000:]
    assert "No space left on device: " in full.stderr and str(storage) in full.stderr
    no_traceback(full)
    assert_no_temp_files(storage)

    (volume / "ballast").unlink()
    shutil.rmtree(storage / "inference")
    read_only(volume)
    ro = cli(*args)
    assert ro.returncode == 1
    assert f"Read-only file system: {storage / 'inference'}" in ro.stderr
    no_traceback(ro)
