"""`mnist-pipeline prune`: bounded runs, versions and inference folders on the volume."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from mnist_pipeline.repository import GONE, PUBLISHED, Repository, open_repository
from mnist_pipeline.storage import DEFAULT_MODEL_NAME as MODEL
from mnist_pipeline.storage import ModelRepository
from mnist_pipeline.tritonconfig import TritonConfig, render_config

REPO = Path(__file__).resolve().parents[2]
# Holds the repository's lock as an export does, until a line comes on stdin.
HOLDER = """
import sys
from pathlib import Path
from mnist_pipeline.repository import open_repository
from mnist_pipeline.storage import ModelRepository
repo = open_repository(ModelRepository(folder=Path(sys.argv[1])), sys.argv[2])
with repo.lock.held("export"):
    print("held", flush=True)
    sys.stdin.readline()
"""


def repository(storage: Path) -> Repository:
    return open_repository(ModelRepository(folder=storage / "models"), MODEL)


def make_storage(root: Path, version_runs: dict[int, str] | None = None) -> Path:
    """Six runs (run-c still running, best_model.pth at run-b) and six versions published
    through the repository (2 by run-b, the others by runs no longer on the volume)."""
    checkpoints = root / "checkpoints"
    for i, run in enumerate(["run-a", "run-b", "run-c", "run-d", "run-e", "run-f"]):
        folder = checkpoints / run
        folder.mkdir(parents=True)
        status = "running" if run == "run-c" else "complete"
        (folder / "metrics.json").write_text(json.dumps({"status": status}))
        (folder / "model.pth").write_bytes(b"weights")
        os.utime(folder, (1_000_000 + i, 1_000_000 + i))  # run-a oldest, run-f newest
    (checkpoints / "best_model.pth").symlink_to("run-b/model.pth")
    runs = {v: "run-b" if v == 2 else f"other-{v}" for v in range(1, 7)} | (version_runs or {})
    repo = repository(root)
    with repo.lock.held("export"):
        for version in range(1, 7):
            model = f"onnx {version}".encode()
            published = repo.publish(render_config(TritonConfig()), {"model.onnx": model},
                                     {"run_id": runs[version]})  # fmt: skip
            assert published == version
    for i in range(6):
        (root / "inference" / f"20261124T10000{i}Z").mkdir(parents=True)
    return root


def prune(storage: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mnist_pipeline", "prune", f"--storage={storage}", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(REPO / "src")},
    )


def names(folder: Path) -> list[str]:
    """What is in `folder`, but the repository's own records (.export)."""
    return sorted(p.name for p in folder.iterdir() if not p.name.startswith(".export"))


def test_prune_keeps_the_limits_and_never_the_protected(tmp_path: Path) -> None:
    storage = make_storage(tmp_path / "s")
    for run in ("run-d", "run-e"):  # a canary analysis's probe results
        (storage / "canary" / run / "20261124T100000Z").mkdir(parents=True)
    result = prune(
        storage,
        "--keep-runs=2",
        "--keep-versions=2",
        "--keep-inference=3",
        "--keep-version=1",
        "--run-id=run-a",
    )
    assert result.returncode == 0, result.stderr
    # Runs: the two newest, plus the current (a), best_model's (b) and a running one (c).
    assert names(storage / "checkpoints") == [
        "best_model.pth",
        "run-a",
        "run-b",
        "run-c",
        "run-e",
        "run-f",
    ]
    assert (storage / "checkpoints" / "best_model.pth").resolve().is_file()
    assert names(storage / "canary") == ["run-e"]  # pruned with their run
    # Versions: the two newest (6 serves), 1 asked to be kept, 2 published by the best run.
    assert names(storage / "models" / MODEL) == ["1", "2", "5", "6", "config.pbtxt"]
    assert names(storage / "inference") == [f"20261124T10000{i}Z" for i in (3, 4, 5)]
    assert "removed" in result.stderr
    # The ledger keeps the numbers of the versions deleted: they are never given again.
    scan = repository(storage).scan()
    assert {n: v.state for n, v in scan.versions.items()} == {
        1: PUBLISHED, 2: PUBLISHED, 3: GONE, 4: GONE, 5: PUBLISHED, 6: PUBLISHED
    }  # fmt: skip
    assert scan.high_water == 6


def test_defaults_keep_a_small_volume_whole(tmp_path: Path) -> None:
    storage = make_storage(tmp_path / "s")

    def contents() -> list[str]:  # the lock prune took is gone again: nothing changed
        return sorted(str(p.relative_to(storage)) for p in storage.rglob("*"))

    before = contents()
    assert prune(storage, "--keep-versions=0", "--keep-runs=0").returncode == 0
    assert contents() == before
    assert prune(storage, "--keep-runs=-1").returncode == 2


def test_the_current_runs_version_is_kept(tmp_path: Path) -> None:
    storage = make_storage(tmp_path / "s")
    assert prune(storage, "--keep-versions=1", "--run-id=other-3").returncode == 0
    assert names(storage / "models" / MODEL) == ["2", "3", "6", "config.pbtxt"]


def test_prune_on_a_missing_storage_is_a_usage_error(tmp_path: Path) -> None:
    """A mistyped --storage must not report a clean volume (exit 0)."""
    result = prune(tmp_path / "nowhere")
    assert result.returncode == 2, result.stderr
    assert f"storage {tmp_path / 'nowhere'} does not exist" in result.stderr
    assert not (tmp_path / "nowhere").exists()


def test_prune_says_what_it_keeps_in_words(tmp_path: Path) -> None:
    result = prune(make_storage(tmp_path / "s"), "--keep-runs=0")
    assert result.returncode == 0, result.stderr
    assert "keeping all runs, the newest 3 versions, the newest 20 inference folders" in (
        result.stderr
    )
    assert "Limits(" not in result.stderr


def test_a_run_left_running_is_reclaimed_after_the_grace_period(tmp_path: Path) -> None:
    """`helm uninstall` mid-training leaves a run marked running forever (~90 MB): once
    nothing in it changed for --abandoned-after seconds it goes like a finished run."""
    storage = make_storage(tmp_path / "s")
    run_c = storage / "checkpoints" / "run-c"
    args = ("--keep-runs=2", "--keep-versions=0", "--keep-inference=0")
    assert prune(storage, *args, "--abandoned-after=3600").returncode == 0
    assert run_c.is_dir()  # written just now: a live run
    for path in (run_c, *run_c.iterdir()):
        os.utime(path, (1_000_000, 1_000_000))
    assert prune(storage, *args).returncode == 0
    assert run_c.is_dir()  # without a grace period, never
    result = prune(storage, *args, "--abandoned-after=3600")
    assert result.returncode == 0, result.stderr
    assert not run_c.exists()
    assert names(storage / "checkpoints") == ["best_model.pth", "run-b", "run-e", "run-f"]


def test_only_version_folders_count_as_versions(tmp_path: Path) -> None:
    """ "01" is no version (Triton's version 1 is "1"): never counted, never deleted."""
    storage = make_storage(tmp_path / "s")
    (storage / "models" / MODEL / "01").mkdir()
    assert prune(storage, "--keep-versions=5").returncode == 0
    assert names(storage / "models" / MODEL) == ["01", "2", "3", "4", "5", "6", "config.pbtxt"]


def test_a_version_folder_no_export_recorded_is_reported_and_kept(tmp_path: Path) -> None:
    """A folder without metadata.json that no export recorded (copied by hand, or a marker
    lost): prune neither counts it nor removes it, and its number is never given again."""
    storage = make_storage(tmp_path / "s")
    stray = storage / "models" / MODEL / "7"
    stray.mkdir()
    (stray / "model.onnx").write_bytes(b"onnx")
    result = prune(storage, "--keep-versions=1")
    assert result.returncode == 0, result.stderr
    assert names(storage / "models" / MODEL) == ["2", "6", "7", "config.pbtxt"]
    assert (stray / "model.onnx").read_bytes() == b"onnx"
    scan = repository(storage).scan()
    assert scan.damaged == {7: f"{stray} holds no metadata.json and no export recorded it"}
    assert scan.champion is not None and scan.champion.number == 6
    assert scan.high_water == 7


def test_the_version_the_current_runs_export_kept_is_kept(tmp_path: Path) -> None:
    """run-f's export was skipped, keeping version 3 (better): its pods serve 3."""
    storage = make_storage(tmp_path / "s")
    record = {"status": "skipped", "model_name": MODEL, "version": 3, "reason": "not better"}
    repository(storage).record("run-f", record)
    assert prune(storage, "--keep-versions=1", "--run-id=run-f").returncode == 0
    assert names(storage / "models" / MODEL) == ["2", "3", "6", "config.pbtxt"]


def test_a_damaged_run_record_stops_prune_naming_it(tmp_path: Path) -> None:
    """Never delete a run whose state cannot be read: it may be one that resumes."""
    storage = make_storage(tmp_path / "s")
    metrics = storage / "checkpoints" / "run-a" / "metrics.json"
    metrics.write_text("")
    result = prune(storage, "--keep-runs=1")
    assert result.returncode == 2
    assert f"training record {metrics} is empty" in result.stderr
    assert "Traceback" not in result.stderr


def test_the_checkpoint_behind_a_kept_version_is_kept(tmp_path: Path) -> None:
    """A pinned version stays servable and re-exportable: the run it came from stays too."""
    storage = make_storage(tmp_path / "s", version_runs={1: "run-a"})
    assert prune(storage, "--keep-runs=1", "--keep-versions=1", "--keep-version=1").returncode == 0
    assert names(storage / "checkpoints") == ["best_model.pth", "run-a", "run-b", "run-c", "run-f"]


def test_a_run_folder_that_is_a_link_loses_the_link_not_its_target(tmp_path: Path) -> None:
    storage = make_storage(tmp_path / "s")
    elsewhere = tmp_path / "elsewhere"
    (storage / "checkpoints" / "run-a").rename(elsewhere)
    (storage / "checkpoints" / "run-a").symlink_to(elsewhere)
    result = prune(storage, "--keep-runs=1")
    assert result.returncode == 0, result.stderr
    assert not (storage / "checkpoints" / "run-a").is_symlink()
    assert (elsewhere / "model.pth").read_bytes() == b"weights"
    assert names(storage / "checkpoints") == ["best_model.pth", "run-b", "run-c", "run-f"]


def test_a_folder_that_cannot_go_is_named_and_the_rest_still_goes(tmp_path: Path) -> None:
    """An immutable file (chattr +i: even root cannot delete it) stands for any I/O fault."""
    storage = make_storage(tmp_path / "s")
    stuck = storage / "checkpoints" / "run-a" / "model.pth"
    subprocess.run(["chattr", "+i", str(stuck)], check=True)
    try:
        result = prune(storage, "--keep-runs=1", "--keep-inference=1")
        assert result.returncode == 1
        hidden = stuck.parent.parent / ".deleting-run-a"
        assert f"could not remove {hidden / 'model.pth'}: Operation not permitted" in result.stderr
        assert "Traceback" not in result.stderr
        # Everything else beyond the limits went, inference folders included.
        assert names(storage / "checkpoints") == [
            ".deleting-run-a",
            "best_model.pth",
            "run-b",
            "run-c",
            "run-f",
        ]
        assert names(storage / "inference") == ["20261124T100005Z"]
    finally:
        subprocess.run(["chattr", "-i", str(hidden / "model.pth")], check=True)
    # The next prune finishes what the last one could not.
    assert prune(storage, "--keep-runs=1").returncode == 0
    assert ".deleting-run-a" not in names(storage / "checkpoints")


def hold_lock(storage: Path) -> subprocess.Popen[str]:
    """Another process holding the repository's lock, as an export does."""
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(storage / "models"), MODEL],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO / "src")},
    )
    assert holder.stdout is not None and holder.stdout.readline() == "held\n"
    return holder


def start_prune(storage: Path, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "mnist_pipeline", "prune", f"--storage={storage}", *args],
        env={**os.environ, "PYTHONPATH": str(REPO / "src")},
        stderr=subprocess.PIPE,
        text=True,
    )


def test_prune_waits_for_an_export_in_progress_and_says_who_holds_the_lock(
    tmp_path: Path,
) -> None:
    """An export holds the lock while it publishes an older run's checkpoint: prune must
    not remove that run under it."""
    storage = make_storage(tmp_path / "s")
    holder = hold_lock(storage)
    try:
        pruning = start_prune(storage, "--keep-runs=1")
        with pytest.raises(subprocess.TimeoutExpired):
            pruning.wait(timeout=3)
        assert (storage / "checkpoints" / "run-a").is_dir()
    finally:
        holder.communicate("\n", timeout=30)
    _, err = pruning.communicate(timeout=60)
    assert pruning.returncode == 0, err
    assert not (storage / "checkpoints" / "run-a").exists()
    lock = storage / "models" / MODEL / ".export" / "lock.json"
    waiting = f"waiting for the repository lock {lock}: export by process {holder.pid} on "
    assert f"{waiting}{socket.gethostname()} since " in err
    assert not lock.exists()  # released when prune was done


def test_the_lock_of_an_export_that_was_killed_is_taken_over_at_once(tmp_path: Path) -> None:
    """A process that holds the lock no more (SIGKILL, OOM) cannot release it: on the same
    host its death is proven, so prune takes the lock over instead of waiting out the lease."""
    storage = make_storage(tmp_path / "s")
    holder = hold_lock(storage)
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=30)
    lock = storage / "models" / MODEL / ".export" / "lock.json"
    assert json.loads(lock.read_text())["pid"] == holder.pid  # left behind
    result = prune(storage, "--keep-runs=1")
    assert result.returncode == 0, result.stderr
    assert f"taking over {lock}, held by export by process {holder.pid}" in result.stderr
    assert f"process {holder.pid} is gone" in result.stderr
    assert not (storage / "checkpoints" / "run-a").exists()
    assert not lock.exists()


def test_a_version_a_pin_still_holds_is_kept_until_its_folder_goes(tmp_path: Path) -> None:
    """pin records the version it placed in the repository; prune keeps it while the
    served folder on this host still holds it."""
    storage = make_storage(tmp_path / "s")
    served = tmp_path / "served"
    pinned = subprocess.run(
        [sys.executable, "-m", "mnist_pipeline", "pin", f"--storage={storage}",
         f"--served-repository={served}", "--model-version=3"],
        capture_output=True, text=True, timeout=120,
        env={**os.environ, "PYTHONPATH": str(REPO / "src")},
    )  # fmt: skip
    assert pinned.returncode == 0, pinned.stderr
    assert (served / MODEL / "3" / "model.onnx").read_bytes() == b"onnx 3"
    (record,) = repository(storage).served().values()
    assert record["version"] == 3 and record["host"] == socket.gethostname()

    assert prune(storage, "--keep-versions=1").returncode == 0
    assert names(storage / "models" / MODEL) == ["2", "3", "6", "config.pbtxt"]

    shutil.rmtree(served / MODEL / "3")  # the server moved on (a pod gone, another pin)
    assert prune(storage, "--keep-versions=1").returncode == 0
    assert names(storage / "models" / MODEL) == ["2", "6", "config.pbtxt"]
    assert repository(storage).served() == {}
