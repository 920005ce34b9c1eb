"""MNIST in IDX format: verify, place into storage, read into arrays.

numpy only, no torch: the client image reuses this module to send real test images.
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mnist_pipeline.errors import UsageError
from mnist_pipeline.storage import fsync_dir, naming, raw_data_dir

log = logging.getLogger(__name__)

# Normalisation used in training; the client applies exactly the same to what it sends.
MEAN = 0.1307
STD = 0.3081

IMAGE_MAGIC = 0x00000803  # unsigned byte, 3 dimensions
LABEL_MAGIC = 0x00000801  # unsigned byte, 1 dimension
ROWS = COLS = 28
NUM_CLASSES = 10


@dataclass(frozen=True)
class IdxFile:
    name: str
    magic: int
    count: int
    sha256: str  # of the decompressed content: gzip bytes differ between compressors

    @property
    def header_size(self) -> int:
        return 16 if self.magic == IMAGE_MAGIC else 8

    @property
    def size(self) -> int:
        record = ROWS * COLS if self.magic == IMAGE_MAGIC else 1
        return self.header_size + self.count * record


FILES = {
    ("train", "images"): IdxFile(
        "train-images-idx3-ubyte",
        IMAGE_MAGIC,
        60000,
        "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    ),
    ("train", "labels"): IdxFile(
        "train-labels-idx1-ubyte",
        LABEL_MAGIC,
        60000,
        "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    ),
    ("test", "images"): IdxFile(
        "t10k-images-idx3-ubyte",
        IMAGE_MAGIC,
        10000,
        "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    ),
    ("test", "labels"): IdxFile(
        "t10k-labels-idx1-ubyte",
        LABEL_MAGIC,
        10000,
        "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
    ),
}


def default_source() -> Path | None:
    """The MNIST copy shipped with the project (the checkout's data/mnist), if present."""
    shipped = Path(__file__).resolve().parents[2] / "data" / "mnist"
    return shipped if shipped.is_dir() else None


def validate(content: bytes, spec: IdxFile, where: Path) -> None:
    """Check header, size, labels and checksum; raise UsageError naming the file."""
    if len(content) < spec.header_size:
        raise UsageError(f"{where}: truncated: {len(content)} bytes, not even an IDX header")
    magic = int.from_bytes(content[0:4], "big")
    if magic != spec.magic:
        raise UsageError(
            f"{where}: wrong magic number 0x{magic:08x}, expected 0x{spec.magic:08x} "
            f"(is this {spec.name}?)"
        )
    count = int.from_bytes(content[4:8], "big")
    if count != spec.count:
        raise UsageError(f"{where}: header says {count} records, expected {spec.count}")
    if spec.magic == IMAGE_MAGIC:
        rows, cols = int.from_bytes(content[8:12], "big"), int.from_bytes(content[12:16], "big")
        if (rows, cols) != (ROWS, COLS):
            raise UsageError(f"{where}: images are {rows}x{cols}, expected {ROWS}x{COLS}")
    if len(content) != spec.size:
        kind = "truncated" if len(content) < spec.size else "too long"
        raise UsageError(f"{where}: {kind}: {len(content)} bytes, expected {spec.size}")
    if spec.magic == LABEL_MAGIC:
        labels = np.frombuffer(content, np.uint8, offset=spec.header_size)
        if labels.max() >= NUM_CLASSES:
            bad = int(np.argmax(labels >= NUM_CLASSES))
            raise UsageError(
                f"{where}: label {labels[bad]} at record {bad} is out of range 0..{NUM_CLASSES - 1}"
            )
    digest = hashlib.sha256(content).hexdigest()
    if digest != spec.sha256:
        raise UsageError(
            f"{where}: content checksum {digest[:16]}… does not match MNIST's {spec.sha256[:16]}…"
        )


def _read_source(source: Path, spec: IdxFile) -> tuple[bytes, Path]:
    raw, gz = source / spec.name, source / f"{spec.name}.gz"
    if raw.is_file():
        return raw.read_bytes(), raw
    if gz.is_file():
        try:
            return gzip.decompress(gz.read_bytes()), gz
        except (OSError, EOFError) as e:
            raise UsageError(f"{gz}: not a valid gzip file ({e})") from e
    raise UsageError(f"{spec.name}: missing from {source} (looked for {raw.name} and {gz.name})")


def _placed_ok(path: Path, spec: IdxFile) -> bool:
    if not path.is_file() or path.stat().st_size != spec.size:
        return False
    return hashlib.sha256(path.read_bytes()).hexdigest() == spec.sha256


def place(storage: Path, source: Path | None = None) -> Path:
    """Put the four verified IDX files under storage/data/MNIST/raw; return that folder.

    A source the user names (--source) must exist, even when nothing needs
    copying. Only missing or damaged files are written, each named in the log; the ones
    needed are all verified before any is renamed into place, so a bad source leaves
    storage as it was.
    """
    dest = raw_data_dir(storage)
    if source is not None and not source.is_dir():
        what = "does not exist" if not source.exists() else "is not a directory"
        raise UsageError(f"MNIST source {source} {what}")
    needed = [spec for spec in FILES.values() if not _placed_ok(dest / spec.name, spec)]
    if not needed:
        log.info("MNIST already in place and verified at %s", dest)
        return dest
    source = source or default_source()
    if source is None:
        raise UsageError("no MNIST source: pass --source DIR (MNIST_PIPELINE_SOURCE)")

    contents = []
    for spec in needed:
        content, origin = _read_source(source, spec)
        validate(content, spec, origin)
        contents.append((spec, content))

    dest.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=dest, prefix=".staging-"))
    try:
        for spec, content in contents:
            with naming(dest / spec.name), open(staging / spec.name, "wb") as f:
                f.write(content)
                f.flush()
                os.fsync(f.fileno())
        for spec, _ in contents:
            damaged = (dest / spec.name).exists()
            os.replace(staging / spec.name, dest / spec.name)
            if damaged:
                log.warning("replaced damaged %s with a verified copy from %s", spec.name, source)
        fsync_dir(dest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("placed MNIST: %d of 4 file(s) written, all verified in %s", len(needed), dest)
    return dest


def check_present(storage: Path, splits: tuple[str, ...] = ("train", "test")) -> None:
    """Raise the error load() would, before anything is written: a training run refused for
    missing data leaves no run folder behind."""
    for (split, _), spec in FILES.items():
        if split not in splits:
            continue
        path = raw_data_dir(storage) / spec.name
        if not path.is_file():
            raise UsageError(
                f"{path}: missing; run `mnist-pipeline data --storage {storage}` first"
            )


def load(storage: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Read one split from storage: uint8 images (N, 28, 28) and uint8 labels (N,).

    Never downloads: a missing file is an error that says to run `mnist-pipeline data`.
    """
    check_present(storage, (split,))
    arrays = []
    for kind in ("images", "labels"):
        spec = FILES[(split, kind)]
        path = raw_data_dir(storage) / spec.name
        content = path.read_bytes()
        validate(content, spec, path)
        arrays.append(np.frombuffer(content, np.uint8, offset=spec.header_size))
    images, labels = arrays
    return images.reshape(-1, ROWS, COLS), labels


def normalize(images: np.ndarray) -> np.ndarray:
    """uint8 (N, 28, 28) → float32 (N, 1, 28, 28), scaled and standardised as in training."""
    x = images.astype(np.float32)[:, None, :, :] / 255.0
    return (x - np.float32(MEAN)) / np.float32(STD)
