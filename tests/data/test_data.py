import gzip
import hashlib
import shutil
from pathlib import Path

import numpy as np
import pytest

from harness.pipeline import MNIST_SOURCE, cli
from mnist_pipeline import data
from mnist_pipeline.errors import UsageError
from mnist_pipeline.storage import raw_data_dir

TRAIN_LABELS = "train-labels-idx1-ubyte"
TEST_IMAGES = "t10k-images-idx3-ubyte"


@pytest.fixture
def raw_source(tmp_path: Path) -> Path:
    """The shipped MNIST, decompressed into a folder a test may damage."""
    src = tmp_path / "src"
    src.mkdir()
    for spec in data.FILES.values():
        (src / spec.name).write_bytes(
            gzip.decompress((MNIST_SOURCE / f"{spec.name}.gz").read_bytes())
        )
    return src


def test_places_verified_files_in_torchvision_layout(tmp_path: Path) -> None:
    result = cli("data", "--storage", tmp_path, "--source", MNIST_SOURCE, check=True)
    raw = raw_data_dir(tmp_path)
    assert sorted(p.name for p in raw.iterdir()) == sorted(s.name for s in data.FILES.values())
    for spec in data.FILES.values():
        assert hashlib.sha256((raw / spec.name).read_bytes()).hexdigest() == spec.sha256
    assert "placed MNIST" in result.stderr


def test_default_source_is_the_shipped_copy(tmp_path: Path) -> None:
    cli("data", "--storage", tmp_path, check=True)
    images, labels = data.load(tmp_path, "test")
    assert images.shape == (10000, 28, 28) and labels.shape == (10000,)
    # The README's label counts for the test set.
    assert np.bincount(labels).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def test_rerun_with_valid_data_in_place_does_nothing(tmp_path: Path) -> None:
    cli("data", "--storage", tmp_path, check=True)
    raw = raw_data_dir(tmp_path)
    before = {p.name: p.stat().st_mtime_ns for p in raw.iterdir()}
    result = cli("data", "--storage", tmp_path, check=True)
    assert "already in place" in result.stderr
    assert {p.name: p.stat().st_mtime_ns for p in raw.iterdir()} == before


@pytest.mark.parametrize("how", ["option", "environment"])
def test_a_named_source_must_exist_even_with_data_in_place(tmp_path: Path, how: str) -> None:
    cli("data", "--storage", tmp_path, check=True)
    nowhere = tmp_path / "nowhere"
    if how == "option":
        result = cli("data", "--storage", tmp_path, "--source", nowhere)
    else:
        result = cli("data", "--storage", tmp_path, env={"MNIST_PIPELINE_SOURCE": str(nowhere)})
    assert result.returncode == 2
    assert f"MNIST source {nowhere} does not exist" in result.stderr


def test_only_the_damaged_file_is_rewritten_and_named(tmp_path: Path) -> None:
    cli("data", "--storage", tmp_path, check=True)
    raw = raw_data_dir(tmp_path)
    _damage(raw / TEST_IMAGES, "corrupt")
    before = {p.name: p.stat().st_mtime_ns for p in raw.iterdir()}
    result = cli("data", "--storage", tmp_path, check=True)
    after = {p.name: p.stat().st_mtime_ns for p in raw.iterdir()}
    changed = sorted(name for name in after if after[name] != before.get(name))
    assert changed == [TEST_IMAGES]
    assert f"replaced damaged {TEST_IMAGES} with a verified copy" in result.stderr
    assert "1 of 4 file(s) written" in result.stderr
    data.load(tmp_path, "test")


def test_raw_uncompressed_source_works(tmp_path: Path, raw_source: Path) -> None:
    cli("data", "--storage", tmp_path / "st", "--source", raw_source, check=True)
    assert data.load(tmp_path / "st", "train")[0].shape == (60000, 28, 28)


def _damage(path: Path, how: str) -> None:
    content = bytearray(path.read_bytes())
    if how == "corrupt":
        content[5000] ^= 0xFF
    elif how == "truncate":
        del content[len(content) // 2 :]
    elif how == "magic":
        content[0:4] = (0x00000802).to_bytes(4, "big")
    elif how == "count":
        content[4:8] = (59999).to_bytes(4, "big")
    elif how == "label":
        content[100] = 11
    path.write_bytes(bytes(content))


@pytest.mark.parametrize(
    ("name", "how", "message"),
    [
        (TEST_IMAGES, "corrupt", "checksum"),
        (TEST_IMAGES, "truncate", "truncated"),
        (TEST_IMAGES, "magic", "wrong magic number 0x00000802"),
        (TRAIN_LABELS, "count", "header says 59999 records, expected 60000"),
        (TRAIN_LABELS, "label", "label 11 at record 92 is out of range"),
    ],
)
def test_bad_file_is_named_and_nothing_is_written(
    tmp_path: Path, raw_source: Path, name: str, how: str, message: str
) -> None:
    _damage(raw_source / name, how)
    storage = tmp_path / "st"
    result = cli("data", "--storage", storage, "--source", raw_source)
    assert result.returncode == 2
    assert name in result.stderr and message in result.stderr
    assert "Traceback" not in result.stderr
    raw = raw_data_dir(storage)
    assert not raw.exists() or list(raw.iterdir()) == []


def test_missing_file_is_named(tmp_path: Path, raw_source: Path) -> None:
    (raw_source / TRAIN_LABELS).unlink()
    result = cli("data", "--storage", tmp_path / "st", "--source", raw_source)
    assert result.returncode == 2
    assert f"{TRAIN_LABELS}: missing" in result.stderr
    assert not (tmp_path / "st" / "data").exists() or not any(
        raw_data_dir(tmp_path / "st").iterdir()
    )


def test_broken_gzip_is_named(tmp_path: Path) -> None:
    src = tmp_path / "src"
    shutil.copytree(MNIST_SOURCE, src)
    gz = src / f"{TEST_IMAGES}.gz"
    gz.write_bytes(gz.read_bytes()[:1000])
    result = cli("data", "--storage", tmp_path / "st", "--source", src)
    assert result.returncode == 2 and f"{TEST_IMAGES}.gz" in result.stderr


def test_a_bad_file_does_not_replace_good_data_in_place(tmp_path: Path, raw_source: Path) -> None:
    storage = tmp_path / "st"
    cli("data", "--storage", storage, check=True)
    victim = raw_data_dir(storage) / TEST_IMAGES
    _damage(victim, "corrupt")  # storage now needs repair, so data reads the source again
    _damage(raw_source / TEST_IMAGES, "corrupt")
    assert cli("data", "--storage", storage, "--source", raw_source).returncode == 2
    good = cli("data", "--storage", storage, "--source", MNIST_SOURCE, check=True)
    assert "placed MNIST" in good.stderr
    data.load(storage, "test")


def test_load_refuses_damaged_storage(storage: Path) -> None:
    _damage(raw_data_dir(storage) / TEST_IMAGES, "truncate")
    with pytest.raises(UsageError, match=f"{TEST_IMAGES}: truncated"):
        data.load(storage, "test")


def test_normalize_matches_training_statistics(mnist_storage: Path) -> None:
    images, _ = data.load(mnist_storage, "train")
    x = data.normalize(images[:10000])
    assert x.shape == (10000, 1, 28, 28) and x.dtype == np.float32
    assert abs(float(x.mean())) < 0.02 and abs(float(x.std()) - 1.0) < 0.02
