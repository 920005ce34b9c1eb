"""A model repository in a directory (STORAGE/models by default, or --model-repository)."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

from mnist_pipeline.files import Entry
from mnist_pipeline.storage import atomic_write_bytes, fsync_dir, is_version_name, naming


class FolderFiles:
    """files.Files in the directory `root` (one model's folder). Writes are renames of
    whole temporary files, and create is a hard link, which fails if the name exists (on
    NFS too), so a file is always seen whole."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def url(self, key: str = "") -> str:
        return str(self.root / key) if key else str(self.root)

    def listing(self, under: str = "") -> dict[str, Entry]:
        found: dict[str, Entry] = {}
        start = self.root / under.rsplit("/", 1)[0] if "/" in under else self.root
        for folder, dirs, names in os.walk(start):
            # Temporary files of writes in progress are dot-names; so is .export, kept.
            dirs[:] = [d for d in dirs if not d.startswith(".") or d == ".export"]
            for name in names:
                if name.startswith("."):
                    continue
                path = Path(folder) / name
                key = path.relative_to(self.root).as_posix()
                if key.startswith(under):
                    with contextlib.suppress(FileNotFoundError):  # deleted meanwhile
                        stat = path.stat()
                        found[key] = Entry(stat.st_size, stat.st_mtime)
        return found

    def get(self, key: str) -> bytes | None:
        try:
            return (self.root / key).read_bytes()
        except (FileNotFoundError, NotADirectoryError):
            return None

    def put(self, key: str, body: bytes) -> None:
        atomic_write_bytes(self.root / key, body)

    def create(self, key: str, body: bytes) -> bool:
        path = self.root / key
        with naming(path):
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
            try:
                os.fchmod(fd, 0o644)
                with os.fdopen(fd, "wb") as f:
                    f.write(body)
                    f.flush()
                    os.fsync(f.fileno())
                os.link(tmp, path)
            except FileExistsError:
                return False
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
        fsync_dir(path.parent)
        return True

    def delete(self, keys: list[str]) -> None:
        """A key ending in "/" is a version folder: it goes once emptied, with what a
        killed write left in it (the lock's holder is the one writer of a version)."""
        folders = set()
        for key in keys:
            path = self.root / key
            if key.endswith("/"):
                folders.add(path)
                continue
            with naming(path):
                path.unlink(missing_ok=True)
            folders.add(path.parent)
        for folder in sorted(folders, key=lambda p: len(p.parts), reverse=True):
            if folder == self.root or not folder.is_dir():
                continue
            if is_version_name(folder.relative_to(self.root).as_posix()):
                for leftover in folder.glob(".*.tmp"):
                    leftover.unlink(missing_ok=True)
            with contextlib.suppress(OSError):  # foreign files keep it
                folder.rmdir()

    def holds(self, path: Path) -> bool:
        return path.resolve().is_relative_to(self.root.parent.resolve())

    def place(self, key: str, path: Path) -> None:
        # Absolute: it resolves wherever the served repository is read from.
        path.symlink_to((self.root / key).resolve())
