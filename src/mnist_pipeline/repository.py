"""The model repository: published versions, the records that say where they came from,
and the guarantees, the same on a folder and on a bucket.

    <name>/config.pbtxt
    <name>/<version>/{model.onnx,metadata.json}
    <name>/.export/versions/<version>.json   the ledger: each number ever given, and its state
    <name>/.export/runs/<run_id>.json        what each run's export decided, every attempt
    <name>/.export/served/<holder>.json      versions a pin or serve placed for a server
    <name>/.export/lock.json                 the lock (locks.py)

Triton ignores .export (not a version number). What is guaranteed:
- A version appears whole or not at all: its files are written first and its metadata.json
  last, the marker without which no stage counts it.
- Numbers only go up: a number is claimed in the ledger (created only if absent) before
  anything is written, and the ledger keeps it after damage, deletion or prune.
- Damage is kept and reported: only a version the ledger says its export never finished
  (or a prune never finished deleting) is cleaned; a version the ledger says was published
  that lost files is damaged, with the command that publishes its model again.
- The ledger keeps the sha256 of each version's metadata.json, so an edited record
  (its accuracy lowered, say) is damage, never a champion to beat.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from mnist_pipeline.errors import PipelineFailure, UsageError
from mnist_pipeline.files import Entry, Files
from mnist_pipeline.folder import FolderFiles
from mnist_pipeline.locks import Lock
from mnist_pipeline.objectstore import BucketFiles
from mnist_pipeline.storage import (
    CONFIG_FILE,
    METADATA_FILE,
    MODEL_FILE,
    ExportStatus,
    ModelRepository,
    check_model_version,
    is_version_name,
    parse_record,
    standing_record,
    validate_name,
)
from mnist_pipeline.tritonconfig import config_damage

log = logging.getLogger(__name__)

LEDGER = ".export/versions"
RUNS = ".export/runs"
SERVED = ".export/served"

PUBLISHED, DAMAGED, LEFTOVER, GONE = "published", "damaged", "leftover", "gone"
# What the ledger keeps of each version's metadata.json.
IDENTITY = ("run_id", "accuracy", "precision", "sha256", "weights_sha256")
# A version published for a canary release (export --canary): the ledger's "release".
CHALLENGER, PROMOTED, ROLLED_BACK = "challenger", "promoted", "rolled back"


def open_repository(location: ModelRepository, name: str) -> Repository:
    """The repository at `location` (a folder, or a bucket and prefix) for model `name`."""
    validate_name(name, "model name")
    if location.is_s3:
        return Repository(BucketFiles(location, name), name)
    assert location.folder is not None
    return Repository(FolderFiles(location.folder / name), name)


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def sha256(content: bytes) -> str:
    return hashlib.sha256(content).hexdigest()


def json_bytes(record: dict[str, Any]) -> bytes:
    return (json.dumps(record, indent=2) + "\n").encode()


@dataclass(frozen=True)
class Version:
    number: int
    state: str  # PUBLISHED, DAMAGED, LEFTOVER (cleaned under the lock), GONE (history)
    metadata: dict[str, Any] = field(default_factory=dict)
    why: str = ""  # what is damaged, or whose leftover it is
    ledger: dict[str, Any] = field(default_factory=dict)

    @property
    def identity(self) -> dict[str, Any]:
        """Its run, accuracy and hashes: metadata.json's, or the ledger's once it is lost."""
        return {key: self.metadata.get(key, self.ledger.get(key)) for key in IDENTITY}

    @property
    def release(self) -> str | None:
        """CHALLENGER, PROMOTED or ROLLED_BACK for a version published for a canary
        release; None for one published as the champion at once."""
        return self.ledger.get("release")

    @property
    def run_id(self) -> str | None:
        run = self.metadata.get("run_id", self.ledger.get("run_id"))
        return run if isinstance(run, str) else None

    @property
    def accuracy(self) -> float | None:
        """The accuracy recorded when it was published: the ledger's, which an edit of
        metadata.json cannot change (metadata.json's for a version the ledger lacks)."""
        accuracy = self.ledger.get("accuracy", self.metadata.get("accuracy"))
        if isinstance(accuracy, int | float) and not isinstance(accuracy, bool):
            return float(accuracy)
        return None


@dataclass(frozen=True)
class Scan:
    """The repository at one moment: every version number ever given, and its state."""

    versions: dict[int, Version]
    config_damage: str | None

    def having(self, *states: str) -> list[Version]:
        return [v for _, v in sorted(self.versions.items()) if v.state in states]

    @property
    def servable(self) -> list[int]:
        return [] if self.config_damage else [v.number for v in self.having(PUBLISHED)]

    @property
    def damaged(self) -> dict[int, str]:
        return {v.number: v.why for v in self.having(DAMAGED)}

    @property
    def champion(self) -> Version | None:
        """The champion: the newest version that was published, intact or damaged, and is
        not a canary release's challenger or rolled back by one (a folder no export
        recorded is reported, never counted). Served by default; what exports must beat."""
        recorded = [
            v for v in self.having(PUBLISHED, DAMAGED)
            if (v.ledger or v.metadata) and v.release not in (CHALLENGER, ROLLED_BACK)
        ]  # fmt: skip
        return recorded[-1] if recorded else None

    @property
    def challenger(self) -> Version | None:
        """The version a canary release is deciding on: the newest challenger published
        after the champion (an older one was superseded)."""
        champion = self.champion.number if self.champion else 0
        waiting = [v for v in self.having(PUBLISHED) if v.release == CHALLENGER]
        return waiting[-1] if waiting and waiting[-1].number > champion else None

    @property
    def high_water(self) -> int:
        return max(self.versions, default=0)

    def damaging(self, number: int, why: str) -> Scan:
        """This scan with version `number` found damaged (by a closer look)."""
        damaged = dataclasses.replace(self.versions[number], state=DAMAGED, why=why)
        return Scan({**self.versions, number: damaged}, self.config_damage)


def republish_hint(version: Version) -> str:
    """What the operator runs to publish a damaged version's model again."""
    if version.run_id:
        return f"re-export the run it came from: mnist-pipeline export --run-id {version.run_id}"
    return "export its checkpoint again (mnist-pipeline export --checkpoint PATH)"


def file_damage(files: Files, number: int, meta: dict[str, Any], found: dict[str, Entry]) -> str:
    """Why a marked version's files are not what its metadata.json records ("": intact)."""
    recorded = meta.get("files")
    if not isinstance(recorded, dict) or MODEL_FILE not in recorded:
        return f"{files.url(f'{number}/{METADATA_FILE}')} records no file checksums"
    for name, record in recorded.items():
        entry = found.get(name)
        if entry is None or entry.size != record.get("bytes"):
            is_now = "missing" if entry is None else f"{entry.size} bytes"
            return (
                f"{files.url(f'{number}/{name}')} is {is_now}, not the "
                f"{record.get('bytes')} bytes {METADATA_FILE} records"
            )
    return ""


def classify(files: Files, number: int, found: dict[str, Entry], ledger: dict[str, Any]) -> Version:
    """One version's state from its files and its ledger entry."""
    state = ledger.get("state")
    marker = files.url(f"{number}/{METADATA_FILE}")
    if state == "deleting":  # a prune that did not finish: it finishes now
        return Version(number, LEFTOVER, why=f"deleting ({ledger.get('at')})", ledger=ledger)
    if state == "deleted":
        return Version(number, LEFTOVER if found else GONE, why=f"deleted ({ledger.get('at')})",
                       ledger=ledger)  # fmt: skip
    if METADATA_FILE not in found:
        if state == "published":
            return Version(number, DAMAGED, why=f"{marker} is missing", ledger=ledger)
        if state == "claimed":
            why = f"left by an export that did not finish ({ledger.get('at')})"
            return Version(number, LEFTOVER, why=why, ledger=ledger)
        why = f"{files.url(str(number))} holds no {METADATA_FILE} and no export recorded it"
        return Version(number, DAMAGED, why=why)
    body = files.get(f"{number}/{METADATA_FILE}") or b""
    try:
        meta = parse_record(body, marker, "version metadata") or {}
    except UsageError as e:
        return Version(number, DAMAGED, why=str(e), ledger=ledger)
    expected = ledger.get("metadata_sha256")
    if expected and sha256(body) != expected:
        why = f"{marker} changed since publication (its sha256 is not the ledger's)"
        return Version(number, DAMAGED, meta, why, ledger)
    why = file_damage(files, number, meta, found)
    return Version(number, DAMAGED if why else PUBLISHED, meta, why, ledger)


class Repository:
    """One model's repository; `files` hold it (a folder's or a bucket's)."""

    def __init__(self, files: Files, name: str) -> None:
        self.files, self.name = files, name
        self.lock = Lock(files)

    def url(self, key: str = "") -> str:
        return self.files.url(key)

    def __str__(self) -> str:
        return self.url()

    # Reading ------------------------------------------------------------------------

    def scan(self) -> Scan:
        listing = self.files.listing()
        by_version: dict[int, dict[str, Entry]] = {}
        for key, entry in listing.items():
            top, _, rest = key.partition("/")
            if is_version_name(top) and rest:
                by_version.setdefault(int(top), {})[rest] = entry
        ledger = {}
        for key in listing:
            if key.startswith(f"{LEDGER}/") and is_version_name(key[len(LEDGER) + 1 : -5]):
                ledger[int(key[len(LEDGER) + 1 : -5])] = self._read(key, "ledger entry") or {}
        versions = {
            n: classify(self.files, n, by_version.get(n, {}), ledger.get(n, {}))
            for n in sorted({*by_version, *ledger})
        }
        config = self.files.get(CONFIG_FILE)
        damage = config_damage(config, self.url(CONFIG_FILE))
        if config is None and by_version:  # Triton loads no version without it
            damage = f"{self.url(CONFIG_FILE)} is missing"
        return Scan(versions, damage)

    def _read(self, key: str, what: str) -> dict[str, Any] | None:
        return parse_record(self.files.get(key), self.url(key), what)

    def config_text(self) -> str:
        content = self.files.get(CONFIG_FILE)
        if content is None:
            raise PipelineFailure(f"{self.url(CONFIG_FILE)} does not exist")
        return content.decode()

    def read_record(self, run_id: str) -> dict[str, Any] | None:
        return self._read(self.record_key(run_id), "export record")

    def record_key(self, run_id: str) -> str:
        return f"{RUNS}/{validate_name(run_id)}.json"

    def records(self) -> dict[str, dict[str, Any]]:
        """Every run's export record, by run id; a damaged one as {"damaged": why}."""
        found = {}
        for key in sorted(self.files.listing(f"{RUNS}/")):
            run_id = key[len(RUNS) + 1 : -5]
            try:
                found[run_id] = self._read(key, "export record") or {}
            except UsageError as e:
                found[run_id] = {"damaged": str(e)}
        return found

    def verify(self, version: Version) -> str | None:
        """Why the model.onnx of a published version is not the one its metadata.json
        records (None: its sha256 matches), reading every byte."""
        content = self.files.get(f"{version.number}/{MODEL_FILE}")
        if content is None or sha256(content) != version.metadata.get("sha256"):
            return f"{self.url(f'{version.number}/{MODEL_FILE}')} does not match its sha256"
        return None

    # Changing (hold self.lock) ------------------------------------------------------------

    def repair(self) -> Scan:
        """Clean what unfinished exports and prunes left, record versions published before
        the ledger existed, and return the repository as it is then."""
        scan = self.scan()
        for version in scan.having(LEFTOVER):
            log.warning("removing %s: %s", self.url(str(version.number)), version.why)
            self.delete_version(version.number)
        for version in scan.having(PUBLISHED, DAMAGED):
            if version.metadata and version.ledger.get("state") != "published":
                body = self.files.get(f"{version.number}/{METADATA_FILE}") or b""
                self._ledger(version.number, "published", version.metadata, sha256(body))
        return self.scan()

    def _ledger(self, number: int, state: str, of: dict[str, Any], meta_sha: str | None,
                create: bool = False) -> bool:  # fmt: skip
        """Write version `number`'s ledger entry from `of`, its metadata (and release): what
        it was, kept after its files are gone (its model is still known by its hashes)."""
        entry = {"version": number, "state": state, "at": now(), "metadata_sha256": meta_sha,
                 **{key: of.get(key) for key in IDENTITY}}  # fmt: skip
        if of.get("release"):
            entry.update(release=of["release"], release_why=of.get("release_why"))
        key = f"{LEDGER}/{number}.json"
        if create:
            return self.files.create(key, json_bytes(entry))
        self.files.put(key, json_bytes(entry))
        return True

    def publish(self, config_text: str, files: dict[str, bytes], metadata: dict[str, Any],
                release: str | None = None) -> int:  # fmt: skip
        """Publish `files` as a new version, metadata.json last; return its number."""
        self.lock.check()
        number = self.scan().high_water + 1
        ledger = {**metadata, "release": release}
        while True:
            marker = json_bytes({**metadata, "version": number, "files": {
                name: {"bytes": len(content), "sha256": sha256(content)}
                for name, content in files.items()
            }})  # fmt: skip
            if self._ledger(number, "claimed", ledger, sha256(marker), create=True):
                break
            number += 1  # claimed meanwhile by a writer that ignored the lock
        # A failure leaves the claim and what was written: the next repair removes them.
        self._fill(number, config_text, files, marker)
        self._ledger(number, "published", ledger, sha256(marker))
        return number

    def set_release(self, version: Version, release: str, why: str) -> None:
        """A canary release's decision: PROMOTED (the champion now) or ROLLED_BACK."""
        self.lock.check()
        entry = {**version.ledger, "release": release, "release_why": why, "release_at": now()}
        self.files.put(f"{LEDGER}/{version.number}.json", json_bytes(entry))

    def _fill(self, number: int, config_text: str, files: dict[str, bytes], marker: bytes) -> None:
        # The config goes first: options may change (batch sizes), the tensors never do,
        # so the version being served keeps working with it.
        self.files.put(CONFIG_FILE, config_text.encode())
        for name, content in files.items():
            self.files.put(f"{number}/{name}", content)
        self.lock.check()
        if not self.files.create(f"{number}/{METADATA_FILE}", marker):
            raise PipelineFailure(f"{self.url(str(number))} was marked by another writer")
        version = self.scan().versions[number]
        if version.state != PUBLISHED:
            raise PipelineFailure(
                f"{self.url(str(number))} changed during publication: {version.why}"
            )

    def delete_version(self, number: int) -> None:
        """Delete a version, marker first: half deleted, it counts no more; its number stays
        in the ledger."""
        known = self.scan().versions.get(number)
        of = {} if known is None else {**known.ledger, **known.metadata}
        self._ledger(number, "deleting", of, None)
        keys = sorted(
            self.files.listing(f"{number}/"), key=lambda k: k != f"{number}/{METADATA_FILE}"
        )
        self.files.delete([*keys, f"{number}/"])
        self._ledger(number, "deleted", of, None)

    def record(self, run_id: str, attempt: dict[str, Any]) -> None:
        """Add an export attempt to the run's record (storage.standing_record)."""
        try:
            previous = self.read_record(run_id) or {}
        except UsageError as e:
            log.warning("%s: starting it again", e)
            previous = {}
        self.files.put(self.record_key(run_id), json_bytes(standing_record(previous, attempt)))

    def note(self, run_id: str, key: str, value: dict[str, Any]) -> None:
        """Set `key` of the run's record: what happened to its version after the export."""
        record = {**(self.read_record(run_id) or {}), key: value}
        self.files.put(self.record_key(run_id), json_bytes(record))

    def write_config(self, config_text: str) -> None:
        self.files.put(CONFIG_FILE, config_text.encode())

    # What servers use -------------------------------------------------------------------

    def served(self) -> dict[str, dict[str, Any]]:
        """The served records (what pins and serves placed), by key."""
        found = {}
        for key in self.files.listing(f"{SERVED}/"):
            try:
                found[key] = self._read(key, "served record") or {}
            except UsageError as e:
                log.warning("%s: ignored", e)
        return found

    def mark_served(self, holder: str, record: dict[str, Any]) -> str:
        key = f"{SERVED}/{holder}.json"
        self.files.put(key, json_bytes(record))
        return key

    def unmark_served(self, key: str) -> None:
        self.files.delete([key])

    def place(self, version: Version, folder: Path) -> Iterator[str]:
        """Place the version's files in `folder` for a server, yielding each file's name to
        be checked, then its metadata.json (checked against the ledger when scanned)."""
        for name in version.metadata.get("files", {}):
            validate_name(name, "file name")
            self.files.place(f"{version.number}/{name}", folder / name)
            yield name
        self.files.place(f"{version.number}/{METADATA_FILE}", folder / METADATA_FILE)


def exported_version(repo: Repository, run_id: str) -> int:
    """The version run `run_id`'s export chose: the one it published, or the better one
    it kept (skipped)."""
    record = repo.read_record(run_id)
    if record is None:
        raise UsageError(
            f"training run {run_id} has not been exported ({repo.url(repo.record_key(run_id))} "
            f"does not exist): run `mnist-pipeline export --run-id {run_id}` first"
        )
    status, version = record.get("status"), record.get("version")
    chose = status in (ExportStatus.PUBLISHED, ExportStatus.SKIPPED)
    if not chose or not isinstance(version, int) or not is_version_name(str(version)):
        reason = f": {record['reason']}" if record.get("reason") else ""
        raise PipelineFailure(
            f"the export of training run {run_id} chose no version (status {status!r}{reason})"
        )
    return version


def resolve_version(repo: Repository, wanted: str, run_id: str | None) -> str:
    """The version to serve or query, as a version number, or "" for the champion.

    `wanted` is "run" (the version run `run_id`'s export chose; the champion without a
    run, as in serve-only mode), "challenger" (the challenger of a canary release awaiting
    its decision, else the champion: what a canary replica serves), a version number, or ""
    (the champion)."""
    check_model_version(wanted)
    if wanted == "challenger":
        challenger = repo.scan().challenger
        return "" if challenger is None else str(challenger.number)
    if wanted != "run":
        return wanted
    if run_id is None:
        return ""
    return str(exported_version(repo, run_id))
