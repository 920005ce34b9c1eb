import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict
from pathlib import Path

import torch

from harness.pipeline import cli
from mnist_pipeline import model, progress
from mnist_pipeline.storage import run_dir
from mnist_pipeline.train import TrainConfig, default_run_id, run_state

QUICK = "--limit-train 1500 --limit-test 2000 --batch-size 50 --checkpoint-every 0".split()


def test_short_training_run_end_to_end(storage: Path) -> None:
    result = cli(
        "train", "--storage", storage, "--run-id", "quick", "--epochs", "2", *QUICK, check=True
    )
    out = run_dir(storage, "quick")
    assert sorted(p.name for p in out.iterdir()) == ["metrics.json", "model.pth", "train.log"]

    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["status"] == "complete" and metrics["run_id"] == "quick"
    assert [h["epoch"] for h in metrics["history"]] == [1, 2]
    assert metrics["hyperparameters"]["limit_train"] == 1500
    assert metrics["hyperparameters"]["limit_test"] == 2000
    assert metrics["test_accuracy"] == metrics["history"][-1]["test_accuracy"]
    assert metrics["test_accuracy"] > 0.5  # 1500 images, 2 epochs: far above chance (0.1)
    assert set(metrics["network_bytes"]) == {"received", "sent"}
    assert all(isinstance(v, int) and v >= 0 for v in metrics["network_bytes"].values())
    # Linux counts bytes per interface, not per process: the record says so.
    assert "every process" in metrics["network_bytes_scope"]

    log = (out / "train.log").read_text()
    assert "epoch 1/2: train loss" in log and "epoch 2/2: train loss" in log
    assert "final test accuracy" in log and "network during training" in log
    assert f"network during training, {metrics['network_bytes_scope']}" in log
    assert "final test accuracy" in result.stderr
    # Without a terminal, progress lines; the last one of the run always appears.
    progress = (
        r"step 60/60 epoch 2/2 loss [\d.]+ acc [\d.]+ \| \d+:\d\d elapsed, \d+ images/s, ETA 0:00"
    )
    assert re.search(progress, result.stderr), result.stderr[-2000:]

    payload = torch.load(out / "model.pth", weights_only=True)
    assert payload["test_accuracy"] == metrics["test_accuracy"] and payload["run_id"] == "quick"
    net = model.from_checkpoint(payload)
    assert net(torch.zeros(1, 1, 28, 28)).shape == (1, 10)


def test_environment_variables_configure_training(storage: Path) -> None:
    cli(
        "train",
        *QUICK,
        check=True,
        env={
            "MNIST_PIPELINE_STORAGE": str(storage),
            "MNIST_PIPELINE_RUN_ID": "env",
            "MNIST_PIPELINE_LR": "0.02",
            "MNIST_PIPELINE_DEVICE": "cpu",
            "MNIST_PIPELINE_THREADS": "1",
        },
    )
    metrics = json.loads((run_dir(storage, "env") / "metrics.json").read_text())
    assert metrics["hyperparameters"]["lr"] == 0.02 and metrics["status"] == "complete"
    assert "cpu threads: 1" in (run_dir(storage, "env") / "train.log").read_text()


def test_completed_run_is_not_trained_again(storage: Path) -> None:
    cli("train", "--storage", storage, "--run-id", "done", *QUICK, check=True)
    before = (run_dir(storage, "done") / "model.pth").stat().st_mtime_ns
    again = cli("train", "--storage", storage, "--run-id", "done", *QUICK, check=True)
    assert "already complete" in again.stderr
    assert (run_dir(storage, "done") / "model.pth").stat().st_mtime_ns == before

    changed = cli(
        "train", "--storage", storage, "--run-id", "done", *QUICK, "--lr", "0.2", "--epochs", "2"
    )
    assert changed.returncode == 2, changed.stderr
    assert "already complete with other settings" in changed.stderr
    assert "epochs 1 -> 2" in changed.stderr and "lr 0.05 -> 0.2" in changed.stderr
    assert (run_dir(storage, "done") / "model.pth").stat().st_mtime_ns == before


def test_too_few_images_for_batchnorm_is_a_usage_error(storage: Path) -> None:
    result = cli("train", "--storage", storage, "--limit-train", "1")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "--limit-train 2 or more" in result.stderr


def test_missing_data_is_a_clear_usage_error_that_leaves_no_run_folder(tmp_path: Path) -> None:
    result = cli("train", "--storage", tmp_path, *QUICK)
    assert result.returncode == 2
    assert "missing; run `mnist-pipeline data" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "checkpoints").exists()  # not a cfg-* folder per attempt


def test_bad_option_is_a_usage_error(storage: Path) -> None:
    assert cli("train", "--storage", storage, "--epochs", "0").returncode == 2


def _train_args(storage: Path, run_id: str) -> list[str]:
    quick = "--epochs 2 --limit-train 1000 --limit-test 1000 --batch-size 50 --checkpoint-every 10"
    return ["train", "--storage", str(storage), "--run-id", run_id, *quick.split()]


def _kill_after_first_checkpoint(storage: Path, run_id: str, args: list[str] | None = None) -> None:
    """Start training run `run_id` (by `args`, default its own train arguments) and SIGKILL
    it mid-epoch, after a step checkpoint."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "mnist_pipeline", *(args or _train_args(storage, run_id))],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 300
    while not (run_dir(storage, run_id) / "resume.pth").exists():
        assert proc.poll() is None and time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.05)
    time.sleep(0.5)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def test_killed_run_resumes_from_its_last_checkpoint(storage: Path) -> None:
    """SIGKILL mid-epoch (as an evicted pod), then the same command: it continues, and ends
    where an uninterrupted run ends."""
    out = run_dir(storage, "killed")
    _kill_after_first_checkpoint(storage, "killed")
    killed_metrics = json.loads((out / "metrics.json").read_text())
    assert killed_metrics["status"] == "running" and not (out / "model.pth").exists()

    resumed = cli(*_train_args(storage, "killed"), check=True)
    assert "resuming run killed at epoch" in resumed.stderr
    assert not (out / "resume.pth").exists()

    cli(*_train_args(storage, "straight"), check=True)
    a = torch.load(out / "model.pth", weights_only=True)["state_dict"]
    b = torch.load(run_dir(storage, "straight") / "model.pth", weights_only=True)["state_dict"]
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-3, atol=1e-4)
    assert "resuming" in (out / "train.log").read_text()


def test_a_fractional_epoch_ends_within_the_pass_and_resumes(storage: Path) -> None:
    """--epochs 1.5 on 20-step epochs: 30 steps, the second epoch cut at its tenth; killed
    and resumed, it ends where an uninterrupted run ends."""
    quick = "--epochs 1.5 --limit-train 1000 --limit-test 1000 --batch-size 50"
    args = ["train", "--storage", str(storage), *quick.split(), "--checkpoint-every", "5"]
    _kill_after_first_checkpoint(storage, "fraction", [*args, "--run-id", "fraction"])
    resumed = cli(*args, "--run-id", "fraction", check=True)
    assert "resuming run fraction at epoch" in resumed.stderr
    assert re.search(r"step 30/30 epoch 2/2 ", resumed.stderr), resumed.stderr[-2000:]
    cli(*args, "--run-id", "straight", check=True)

    out = run_dir(storage, "fraction")
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["hyperparameters"]["epochs"] == 1.5
    assert [h["epoch"] for h in metrics["history"]] == [1, 2]
    a = torch.load(out / "model.pth", weights_only=True)["state_dict"]
    b = torch.load(run_dir(storage, "straight") / "model.pth", weights_only=True)["state_dict"]
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-3, atol=1e-4)
    # A whole number of epochs keeps the run id it had when epochs were integers.
    assert default_run_id(TrainConfig(epochs=2.0)) == default_run_id(TrainConfig(epochs=2))
    assert cli("train", "--storage", storage, "--epochs", "1001").returncode == 2


def test_resume_with_other_settings_is_refused(storage: Path) -> None:
    _kill_after_first_checkpoint(storage, "changed")
    result = cli(*_train_args(storage, "changed"), "--lr", "0.3")
    assert result.returncode == 2 and "started with other settings" in result.stderr


def test_the_default_run_id_is_a_function_of_the_settings(storage: Path) -> None:
    """Repeating a command without --run-id resumes its interrupted run, then
    reuses the completed one, instead of training the same model anew under a new id."""
    args = [a for a in _train_args(storage, "x") if a not in ("--run-id", "x")]
    cfg = TrainConfig(epochs=2, limit_train=1000, limit_test=1000, batch_size=50)
    run_id = default_run_id(cfg)
    assert run_id.startswith("cfg-") and run_id == default_run_id(TrainConfig(**asdict(cfg)))
    assert default_run_id(TrainConfig(**{**asdict(cfg), "seed": 1})) != run_id

    _kill_after_first_checkpoint(storage, run_id, args)

    resumed = cli(*args, check=True)
    assert f"resuming run {run_id} at epoch" in resumed.stderr
    again = cli(*args, check=True)
    assert f"run {run_id} is already complete" in again.stderr
    assert [p.name for p in (storage / "checkpoints").iterdir()] == [run_id]


def test_a_failure_is_printed_once_and_kept_in_train_log(storage: Path) -> None:
    """The error line appears once on the terminal, and in train.log."""
    out = run_dir(storage, "damaged")
    out.mkdir(parents=True)
    (out / "resume.pth").write_bytes(b"not a checkpoint")
    result = cli("train", "--storage", storage, "--run-id", "damaged", *QUICK)
    assert result.returncode == 2
    lines = [ln for ln in result.stderr.splitlines() if "cannot resume run damaged" in ln]
    assert len(lines) == 1, result.stderr
    assert "cannot resume run damaged" in (out / "train.log").read_text()
    assert "weights_only=False" not in result.stderr


def test_an_older_resume_state_is_a_usage_error_naming_what_it_lacks(storage: Path) -> None:
    """A resume.pth without a field this version saves (here "evals") exits 2 saying which
    file, what is missing and what to do; it used to die with a bare KeyError."""
    out = run_dir(storage, "older")
    out.mkdir(parents=True)
    torch.save({"config": {}, "model": {}, "epoch": 0}, out / "resume.pth")
    result = cli("train", "--storage", storage, "--run-id", "older", *QUICK)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert f"{out / 'resume.pth'}: cannot resume run older" in result.stderr
    assert "no optimizer, step_in_epoch" in result.stderr and "evals" in result.stderr
    assert "delete it to train this run from the start" in result.stderr


def test_ctrl_c_on_a_terminal_records_the_interruption_and_says_how_to_resume(
    storage: Path,
) -> None:
    """Ctrl-C mid-run on a terminal (a real pseudo-terminal, so the progress bar
    is drawn): exit 130 as documented, the error on a line of its own with the way to
    resume, and metrics.json saying "interrupted", not "running"."""
    out = run_dir(storage, "ctrl-c")
    controller, terminal = os.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "mnist_pipeline", *_train_args(storage, "ctrl-c")],
        stdin=subprocess.DEVNULL,
        stdout=terminal,
        stderr=terminal,
        # As in a terminal's foreground: a shell without job control starts its background
        # commands (CI run with `&`) with SIGINT ignored, which Python then honours.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    os.close(terminal)
    chunks: list[bytes] = []
    reader = threading.Thread(target=_drain, args=(controller, chunks))
    reader.start()  # a full terminal buffer would block the bar's writes
    while not (out / "resume.pth").exists():
        assert proc.poll() is None, b"".join(chunks).decode(errors="replace")[-2000:]
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=120) == 130
    reader.join(timeout=60)
    lines = b"".join(chunks).decode(errors="replace").replace("\r\n", "\n").split("\n")
    (error,) = [line for line in lines if "interrupted" in line]
    assert "images/s" not in error and "\r" not in error, error  # not glued to the bar
    assert "run the same command again to resume it from its last checkpoint" in error
    assert json.loads((out / "metrics.json").read_text())["status"] == "interrupted"
    assert run_state(storage, "ctrl-c").startswith("interrupted before: resuming it")


def _drain(fd: int, chunks: list[bytes]) -> None:
    while True:
        try:
            chunk = os.read(fd, 65536)
        except OSError:  # EIO: every writer has closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(fd)


def test_a_second_trainer_of_a_run_is_refused_naming_the_first(storage: Path) -> None:
    """Two trainers of one run id both trained in full, interleaved train.log, and the
    second rewrote model.pth after the first had marked the run complete."""
    args = (
        "train",
        "--storage",
        storage,
        "--run-id",
        "one",
        "--threads",
        "1",
        "--epochs",
        "4",
        *QUICK,
    )
    first = subprocess.Popen(
        [sys.executable, "-m", "mnist_pipeline", *map(str, args)],
        stderr=subprocess.PIPE,
        text=True,
    )
    out = run_dir(storage, "one")
    try:
        deadline = time.monotonic() + 120
        while not (out / "train.log").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        second = cli(*args)
        assert first.poll() is None, "the first trainer ended before the second started"
    finally:
        _, first_err = first.communicate(timeout=600)
    assert second.returncode == 2, second.stderr
    assert f"run one is being trained by process {first.pid} on " in second.stderr
    assert len(second.stderr.strip().splitlines()) == 1
    assert first.returncode == 0, first_err
    assert json.loads((out / "metrics.json").read_text())["status"] == "complete"
    assert "being trained" not in (out / "train.log").read_text()
    # The lock goes with its holder: the run folder holds only the run.
    assert sorted(p.name for p in out.iterdir()) == ["metrics.json", "model.pth", "train.log"]
    assert cli(*args).returncode == 0  # and the run is free again (complete: nothing to do)


def test_sigterm_records_the_interruption_and_says_how_to_resume(storage: Path) -> None:
    """A stopped pod or `kill` (SIGTERM) exited 143 silently and left metrics.json "running"."""
    out = run_dir(storage, "term")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mnist_pipeline", *_train_args(storage, "term")],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        while not (out / "resume.pth").exists():
            assert proc.poll() is None
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 143
    assert "run the same command again to resume it from its last checkpoint (SIGTERM)" in err
    assert "Traceback" not in err
    assert json.loads((out / "metrics.json").read_text())["status"] == "interrupted"


def test_network_traffic_never_goes_negative_as_interfaces_come_and_go(tmp_path: Path) -> None:
    """A busy interface that disappears, one that appears, one made again under its name:
    each counts only its own traffic since the start, never less than nothing."""
    header = "Inter-|   Receive ...\n face |bytes ...\n"

    def dev(**interfaces: tuple[int, int]) -> None:
        rows = [
            f"{name}: {rx} 0 0 0 0 0 0 0 {tx} 0 0 0 0 0 0 0"
            for name, (rx, tx) in interfaces.items()
        ]
        (tmp_path / "dev").write_text(header + "\n".join(rows) + "\n")

    dev(lo=(10**9, 10**9), eth0=(1000, 500), veth1=(4_465_205, 302_152), veth2=(50, 50))
    meter = progress.NetworkMeter(tmp_path / "dev")
    dev(lo=(2 * 10**9, 10**9), eth0=(1500, 700), veth3=(30, 20), veth2=(5, 5))
    assert meter.so_far() == {"received": 500 + 30 + 5, "sent": 200 + 20 + 5}
