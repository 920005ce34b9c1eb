"""The on-disk contract between the stages: its readers, its version folders, and which
version a run serves."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from harness.pipeline import publish_by_hand
from mnist_pipeline.errors import PipelineFailure, UsageError
from mnist_pipeline.repository import Repository, open_repository, resolve_version
from mnist_pipeline.storage import (
    DEFAULT_MODEL_NAME,
    METADATA_FILE,
    METRICS_FILE,
    ExportStatus,
    ModelRepository,
    RunStatus,
    check_model_version,
    is_version_name,
    read_metrics,
    read_record,
)

REPO = Path(__file__).resolve().parents[2]
RUN = "run-a"


def repository(storage: Path) -> Repository:
    return open_repository(ModelRepository(folder=storage / "models"), DEFAULT_MODEL_NAME)


def write_export(storage: Path, run_id: str, **record: object) -> Repository:
    """The run's export record, as export adds an attempt to it."""
    repo = repository(storage)
    attempt = {"status": "published", "model_name": DEFAULT_MODEL_NAME, "version": 2, **record}
    repo.record(run_id, attempt)
    return repo


# Readers --------------------------------------------------------------------------------


def test_a_missing_record_is_none(tmp_path: Path) -> None:
    assert read_metrics(tmp_path) is None
    assert read_record(tmp_path / "no-such-file.json", "inference report") is None
    assert repository(tmp_path).read_record(RUN) is None


def test_a_record_reads_as_its_object(tmp_path: Path) -> None:
    (tmp_path / METRICS_FILE).write_text(json.dumps({"status": "complete"}))
    assert read_metrics(tmp_path) == {"status": RunStatus.COMPLETE}


@pytest.mark.parametrize(
    ("content", "says"),
    [
        (b"", "is empty"),
        (b" \n", "is empty"),
        (b'{"status": "runn', "is damaged: Unterminated string"),
        (b"[1, 2]", "is damaged: a JSON list, not an object"),
        (b'"complete"', "is damaged: a JSON str, not an object"),
        (b"\xff\xfe{}", "is damaged"),
    ],
)
def test_a_damaged_record_is_a_one_line_usage_error_naming_it(
    tmp_path: Path, content: bytes, says: str
) -> None:
    repo = repository(tmp_path)
    path = tmp_path / "models" / DEFAULT_MODEL_NAME / repo.record_key(RUN)
    path.parent.mkdir(parents=True)
    path.write_bytes(content)
    with pytest.raises(UsageError) as raised:
        repo.read_record(RUN)
    message = str(raised.value)
    assert message.startswith(f"export record {path} {says}")
    assert "\n" not in message


def test_read_record_names_what_it_reads(tmp_path: Path) -> None:
    path = tmp_path / "x.json"
    path.write_text("nope")
    with pytest.raises(UsageError, match=f"^inference report {path} is damaged"):
        read_record(path, "inference report")


def test_a_damaged_record_reaches_the_user_as_exit_2_without_a_traceback(tmp_path: Path) -> None:
    """export --run-id on a run whose metrics.json was cut short."""
    metrics = tmp_path / "checkpoints" / RUN / METRICS_FILE
    metrics.parent.mkdir(parents=True)
    metrics.write_text("")
    args = ["export", f"--storage={tmp_path}", f"--run-id={RUN}"]
    result = subprocess.run(
        [sys.executable, "-m", "mnist_pipeline", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={"PYTHONPATH": str(REPO / "src"), "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 2, result.stderr
    assert f"training record {metrics} is empty" in result.stderr
    assert "Traceback" not in result.stderr


def test_status_words_are_the_strings_on_disk() -> None:
    assert json.dumps([RunStatus.INTERRUPTED, ExportStatus.SKIPPED]) == '["interrupted", "skipped"]'
    assert {s.value for s in RunStatus} == {
        "running",
        "complete",
        "failed",
        "interrupted",
        "retrying",
    }
    assert {s.value for s in ExportStatus} == {"published", "skipped", "failed", "interrupted"}


# Version folders ------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["1", "2", "10", "9223372036854775807"])
def test_version_names(name: str) -> None:
    assert is_version_name(name)


@pytest.mark.parametrize(
    "name", ["0", "01", "007", "-1", "+1", "1.0", " 1", "1\n", "", "v1", "١", "9223372036854775808"]
)
def test_not_version_names(name: str) -> None:
    assert not is_version_name(name)


COMPLETE = ("model.onnx", METADATA_FILE)


def make_model(root: Path, folders: dict[str, tuple[str, ...]], config: bool = True) -> Path:
    """Version folders by hand: a complete one (model.onnx and metadata.json) as export
    writes it, anything else with placeholder files."""
    model = root / "models" / DEFAULT_MODEL_NAME
    model.mkdir(parents=True)
    if config:
        (model / "config.pbtxt").write_text(f'name: "{DEFAULT_MODEL_NAME}"\n')
    for name, files in folders.items():
        if files == COMPLETE:
            publish_by_hand(model / name, b"onnx " + name.encode())
            continue
        (model / name).mkdir()
        for file in files:
            (model / name / file).write_text("{}")
    return model


def test_versions_are_sorted_by_number_and_only_version_folders(tmp_path: Path) -> None:
    model = make_model(
        tmp_path,
        {
            "10": COMPLETE,
            "9": COMPLETE,
            "01": COMPLETE,
            ".staging-x": COMPLETE,
            "2": ("model.onnx",),
        },
    )
    (model / "3").write_text("a file, not a folder")
    scan = repository(tmp_path).scan()
    assert list(scan.versions) == [2, 9, 10]
    assert scan.servable == [9, 10]
    # 2 lacks its metadata and no export recorded it: reported and kept, never served.
    assert scan.damaged == {2: f"{model / '2'} holds no {METADATA_FILE} and no export recorded it"}
    assert scan.champion is not None and scan.champion.number == 10
    assert scan.high_water == 10
    assert repository(tmp_path / "absent").scan().versions == {}


def test_without_a_config_nothing_is_servable(tmp_path: Path) -> None:
    model = make_model(tmp_path, {"1": COMPLETE}, config=False)
    scan = repository(tmp_path).scan()
    assert list(scan.versions) == [1]
    assert scan.servable == []
    assert scan.config_damage == f"{model / 'config.pbtxt'} is missing"


def test_a_config_that_does_not_parse_makes_nothing_servable(tmp_path: Path) -> None:
    model = make_model(tmp_path, {"1": COMPLETE})
    (model / "config.pbtxt").write_text('name: "resnet18_mn')
    scan = repository(tmp_path).scan()
    assert list(scan.versions) == [1]
    assert scan.servable == []
    assert scan.config_damage is not None
    assert scan.config_damage.startswith(f"{model / 'config.pbtxt'} does not parse")


# The served version ---------------------------------------------------------------------


@pytest.mark.parametrize("value", ["", "run", "challenger", "1", "42"])
def test_model_versions_accepted(value: str) -> None:
    assert check_model_version(value) == value


@pytest.mark.parametrize("value", ["01", "0", "newest", "-1", "1.5"])
def test_model_versions_refused(value: str) -> None:
    with pytest.raises(UsageError) as raised:
        check_model_version(value)
    assert str(raised.value) == (
        f"model version {value!r}: expected run, challenger, a version number such as 1 "
        "(Triton numbers versions 1, 2, ...), or nothing for the champion"
    )


def test_a_number_or_nothing_resolves_to_itself(tmp_path: Path) -> None:
    repo = repository(tmp_path)
    assert resolve_version(repo, "3", RUN) == "3"
    assert resolve_version(repo, "", RUN) == ""
    assert resolve_version(repo, "run", None) == ""
    # No canary release awaits a decision: a canary replica serves the champion.
    assert resolve_version(repo, "challenger", RUN) == ""


@pytest.mark.parametrize("status", ["published", "skipped"])
def test_run_resolves_to_the_version_its_export_chose(tmp_path: Path, status: str) -> None:
    repo = write_export(tmp_path, RUN, status=status, version=2)
    assert resolve_version(repo, "run", RUN) == "2"


def test_run_resolves_to_its_publication_after_a_later_skip(tmp_path: Path) -> None:
    """The standing outcome of the run's record: a skip never erases the publication."""
    write_export(tmp_path, RUN, status="published", version=2)
    repo = write_export(tmp_path, RUN, status="skipped", version=3, reason="not better")
    assert resolve_version(repo, "run", RUN) == "2"
    record = repo.read_record(RUN)
    assert record is not None
    assert [a["status"] for a in record["history"]] == ["published", "skipped"]


def test_run_without_an_export_record_is_a_usage_error(tmp_path: Path) -> None:
    repo = repository(tmp_path)
    record = tmp_path / "models" / DEFAULT_MODEL_NAME / ".export" / "runs" / f"{RUN}.json"
    with pytest.raises(UsageError) as raised:
        resolve_version(repo, "run", RUN)
    assert str(raised.value) == (
        f"training run {RUN} has not been exported ({record} does not exist): "
        f"run `mnist-pipeline export --run-id {RUN}` first"
    )


def test_run_whose_export_chose_nothing_fails(tmp_path: Path) -> None:
    repo = write_export(tmp_path, RUN, status="failed", version=None, reason="parity check failed")
    with pytest.raises(PipelineFailure, match=r"chose no version .*parity check failed"):
        resolve_version(repo, "run", RUN)


def test_a_bad_wanted_version_is_refused_before_anything_is_read(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="model version '01'"):
        resolve_version(repository(tmp_path), "01", RUN)
