"""`mnist-pipeline prune`: bounded runs, versions and inference folders on the volume."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mnist_pipeline.storage import DEFAULT_MODEL_NAME as MODEL

REPO = Path(__file__).resolve().parents[2]


def make_storage(root: Path) -> Path:
    checkpoints = root / "checkpoints"
    for i, run in enumerate(["run-a", "run-b", "run-c", "run-d", "run-e", "run-f"]):
        folder = checkpoints / run
        folder.mkdir(parents=True)
        status = "running" if run == "run-c" else "complete"
        (folder / "metrics.json").write_text(json.dumps({"status": status}))
        (folder / "model.pth").write_bytes(b"weights")
        os.utime(folder, (1_000_000 + i, 1_000_000 + i))  # run-a oldest, run-f newest
    (checkpoints / "best_model.pth").symlink_to("run-b/model.pth")
    for version in range(1, 7):
        folder = root / "models" / MODEL / str(version)
        folder.mkdir(parents=True)
        (folder / "model.onnx").write_bytes(b"onnx")
        run = "run-b" if version == 2 else f"other-{version}"
        (folder / "metadata.json").write_text(json.dumps({"run_id": run}))
    (root / "models" / MODEL / "config.pbtxt").write_text('name: "resnet18_mnist"\n')
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
    return sorted(p.name for p in folder.iterdir())


def test_prune_keeps_the_limits_and_never_the_protected(tmp_path: Path) -> None:
    storage = make_storage(tmp_path / "s")
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
    # Versions: the two newest (6 serves), 1 asked to be kept, 2 published by the best run.
    assert names(storage / "models" / MODEL) == ["1", "2", "5", "6", "config.pbtxt"]
    assert names(storage / "inference") == [f"20261124T10000{i}Z" for i in (3, 4, 5)]
    assert "removed" in result.stderr


def test_defaults_keep_a_small_volume_whole(tmp_path: Path) -> None:
    storage = make_storage(tmp_path / "s")

    def contents() -> list[str]:  # but the export lock prune takes, as every export does
        return sorted(
            str(p.relative_to(storage)) for p in storage.rglob("*") if ".export" not in p.parts
        )

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


def test_the_version_the_current_runs_export_kept_is_kept(tmp_path: Path) -> None:
    """run-f's export was skipped, keeping version 3 (better): its pods serve 3."""
    storage = make_storage(tmp_path / "s")
    record = {"status": "skipped", "model_name": MODEL, "version": 3, "reason": "not better"}
    (storage / "checkpoints" / "run-f" / "export.json").write_text(json.dumps(record))
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
    storage = make_storage(tmp_path / "s")
    (storage / "models" / MODEL / "1" / "metadata.json").write_text(json.dumps({"run_id": "run-a"}))
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


def test_prune_waits_for_an_export_in_progress(tmp_path: Path) -> None:
    """An export holds the lock while it publishes an older run's checkpoint: prune must
    not remove that run under it."""
    storage = make_storage(tmp_path / "s")
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from pathlib import Path; from mnist_pipeline import repository\n"
            f"with repository.locked(Path({str(storage)!r}), {MODEL!r}):\n"
            "    print('held', flush=True); sys.stdin.readline()",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO / "src")},
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        pruning = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "mnist_pipeline",
                "prune",
                f"--storage={storage}",
                "--keep-runs=1",
            ],
            env={**os.environ, "PYTHONPATH": str(REPO / "src")},
            stderr=subprocess.PIPE,
        )
        with pytest.raises(subprocess.TimeoutExpired):
            pruning.wait(timeout=3)
        assert (storage / "checkpoints" / "run-a").is_dir()
    finally:
        holder.communicate("\n", timeout=30)
    assert pruning.wait(timeout=60) == 0
    assert not (storage / "checkpoints" / "run-a").exists()
