"""resume.pth through the library: what it must hold, and that resuming changes nothing.

Trained in-process on a few hundred images: the loop, checkpoints and resume are what is
under test, not the model's accuracy.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from mnist_pipeline import train as train_stage
from mnist_pipeline.errors import UsageError
from mnist_pipeline.interrupts import Interrupted
from mnist_pipeline.progress import Progress
from mnist_pipeline.storage import run_dir
from mnist_pipeline.train import RankConfig, ResumeState, TrainConfig, train

# 4 steps an epoch, 8 in all.
TINY = TrainConfig(epochs=2, batch_size=50, limit_train=200, limit_test=100)


def a_state(**changes: object) -> dict[str, object]:
    state = ResumeState(
        config=train_stage.hyperparameters(TINY),
        model={"w": torch.ones(2)},
        optimizer={"state": {}, "param_groups": []},
        epoch=1,
        step_in_epoch=3,
        train_seconds=1.5,
        partial={"loss_sum": 2.0, "correct": 3, "seen": 4},
        history=[{"epoch": 1}],
        evals=[],
        started_at="2026-01-01T00:00:00+00:00",
    ).to_dict()
    return {**state, **changes}


def test_a_resume_state_round_trips_through_its_dict(tmp_path: Path) -> None:
    path = tmp_path / "resume.pth"
    torch.save(a_state(), path)
    loaded = ResumeState.load(path, "r", torch.device("cpu"))
    assert loaded.to_dict().keys() == a_state().keys()
    assert loaded.step_in_epoch == 3 and loaded.partial["seen"] == 4
    torch.testing.assert_close(loaded.model["w"], torch.ones(2))


def test_a_state_missing_a_field_is_refused_naming_the_file_and_what_to_do(
    tmp_path: Path,
) -> None:
    path = tmp_path / "resume.pth"
    state = a_state()
    del state["evals"]
    with pytest.raises(UsageError) as refused:
        ResumeState.from_dict(state, path, "old")
    message = str(refused.value)
    assert message.startswith(f"{path}: cannot resume run old from it")
    assert "no evals" in message and "delete it to train this run from the start" in message
    with pytest.raises(UsageError, match="not a resume checkpoint of this project"):
        ResumeState.from_dict([1, 2], path, "old")


def test_training_refuses_an_older_resume_state_instead_of_crashing(storage: Path) -> None:
    """A resume.pth written before metrics kept "evals": a UsageError (exit 2), not KeyError."""
    out = run_dir(storage, "older")
    out.mkdir(parents=True)
    state = a_state()
    del state["evals"]
    torch.save(state, out / "resume.pth")
    with pytest.raises(UsageError, match=r"resume\.pth: cannot resume run older .*no evals"):
        train(storage, TINY, run_id="older", rank=RankConfig(device="cpu", threads=1))
    assert json.loads((out / "metrics.json").read_text())["status"] == "failed"
    assert "no evals" in (out / "train.log").read_text()


def interrupting_at(step: int) -> type[Progress]:
    class Interrupting(Progress):
        def update(self, at: int, text: str) -> None:
            super().update(at, text)
            if at == step:
                raise KeyboardInterrupt

    return Interrupting


def test_same_seed_same_model_and_resuming_changes_nothing(
    storage: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Bitwise: two runs of the same settings end with one model, and a run interrupted
    mid-epoch (after its step-2 checkpoint, in step 3) and resumed ends with it too,
    with the same loss record."""
    caplog.set_level(logging.INFO, logger="mnist_pipeline")  # what the command line sets
    how = {"rank": RankConfig(device="cpu", threads=1, checkpoint_every=2, eval_every=3)}
    first = train(storage, TINY, run_id="first", **how)
    second = train(storage, TINY, run_id="second", **how)
    assert first["parameters_sha256"] == second["parameters_sha256"]

    with monkeypatch.context() as patched:
        patched.setattr(train_stage, "Progress", interrupting_at(3))
        with pytest.raises(Interrupted, match="run the same command again"):
            train(storage, TINY, run_id="resumed", **how)
    out = run_dir(storage, "resumed")
    assert json.loads((out / "metrics.json").read_text())["status"] == "interrupted"
    resumed = train(storage, TINY, run_id="resumed", **how)

    assert resumed["parameters_sha256"] == first["parameters_sha256"]
    for key in ("train_loss", "train_accuracy", "test_loss", "test_accuracy", "lr_end"):
        assert [h[key] for h in resumed["history"]] == [h[key] for h in first["history"]]
    assert [e["step"] for e in resumed["evals"]] == [e["step"] for e in first["evals"]]
    assert [e["step"] for e in first["evals"]] == [3, 4, 6, 8]
    assert "resuming run resumed at epoch 1, step 2/4" in (out / "train.log").read_text()
    assert not (out / "resume.pth").exists()
