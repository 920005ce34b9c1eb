"""What a model repository is made of, whatever holds it: named files under one model's
root, listed, read, written whole, created only if absent, deleted, and placed for a server.

folder.FolderFiles keeps them in a directory, objectstore.BucketFiles in an S3 bucket.
repository.Repository builds every guarantee (versions, records, locks, damage) on these
few calls alone, so both kinds keep the same ones.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol


@dataclass(frozen=True)
class Entry:
    size: int
    modified: float  # seconds since the epoch, by the clock of what holds the file


class Files(Protocol):
    """Keys are '/'-separated paths relative to one model's root ("3/model.onnx")."""

    def url(self, key: str = "") -> str:
        """Where `key` is, for messages: a path, or an s3:// URL."""
        ...

    def listing(self, under: str = "") -> dict[str, Entry]:
        """Every file whose key starts with `under`, by its full key (temporary files of
        writes in progress excluded)."""
        ...

    def get(self, key: str) -> bytes | None: ...

    def put(self, key: str, body: bytes) -> None:
        """Write `key` whole or not at all."""
        ...

    def create(self, key: str, body: bytes) -> bool:
        """Write `key` only if no file has that key; False if one has."""
        ...

    def delete(self, keys: list[str]) -> None:
        """Delete `keys` in the order given (missing ones are no error)."""
        ...

    def holds(self, path: Path) -> bool:
        """Whether `path`, on this machine, lies in the storage the repository is in."""
        ...

    def place(self, key: str, path: Path) -> None:
        """Make `path` read as `key` for a server on this machine: a link to the file,
        or a downloaded copy."""
        ...
