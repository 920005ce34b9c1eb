"""A model repository on object storage through the S3 API (AWS S3, MinIO, Ceph RGW, GCS's
S3 interoperability), beside the folder one. The layout is the folder's, so that Triton
itself can serve the prefix (`--model-repository=s3://...`):

    PREFIX/<name>/config.pbtxt
    PREFIX/<name>/<version>/{model.onnx,metadata.json}
    PREFIX/<name>/.export/lock.json              held by the export gating and publishing
    PREFIX/<name>/.export/runs/<run_id>.json     what a run's export chose (its export.json)

Triton ignores .export (not a version number). Object stores have no rename and no lock:
a version's files are uploaded first and its metadata.json last, the marker without which
no stage counts the version (storage.servable_in); the export then lists the version again
(every file at its recorded size, the lock still its own) or takes its marker back. A
failed upload leaves a version without a marker, never counted, which the next publishing
export removes. Exports sharing a volume are serialised by its lock; exports from different
volumes by a lock object in the bucket, created only if absent (If-None-Match: *), with a
lease. See docs/KUBERNETES.md ("Model repository on object storage") for what is guaranteed.

boto3 is imported only here, and only when a repository is on object storage.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import socket
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from mnist_pipeline.storage import (
    CONFIG_FILE,
    METADATA_FILE,
    MODEL_FILE,
    ModelRepository,
    PipelineFailure,
    UsageError,
    atomic_write_json,
    atomic_write_text,
    file_records,
    is_version_name,
    naming,
    one_line,
    servable_in,
    standing_record,
    validate_name,
)

log = logging.getLogger(__name__)

WORK = ".export"
LOCK = f"{WORK}/lock.json"
RUNS = f"{WORK}/runs"
# How long an export may hold the bucket's lock; after it, another export takes it over.
# An export never writes its marker later than LEASE_MARGIN before its lease ends, so
# exporters' clocks must agree within that margin.
LEASE_SECONDS = 600.0
LEASE_MARGIN = 60.0
WAIT_POLL = 1.0
CHUNK = 1 << 20
REFUSED_CREDENTIALS = {
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "AccessDenied",
    "InvalidToken",
    "ExpiredToken",
    "403",
}


@dataclass(frozen=True)
class Entry:
    size: int
    modified: float  # seconds since the epoch, the server's clock


def connect(repo: ModelRepository) -> Any:
    """A boto3 S3 client for `repo`, credentials from the standard AWS variables only."""
    # The SDK would otherwise look for credentials at a cloud metadata address.
    os.environ["AWS_EC2_METADATA_DISABLED"] = "true"
    key, secret = os.environ.get("AWS_ACCESS_KEY_ID"), os.environ.get("AWS_SECRET_ACCESS_KEY")
    if not key or not secret:
        raise UsageError(
            f"model repository {repo}: no credentials: set AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY (and AWS_SESSION_TOKEN for temporary ones)"
        )
    import boto3
    from botocore.config import Config

    config = Config(
        # host:port endpoints (MinIO, radosgw) have no per-bucket DNS names.
        s3={"addressing_style": "path" if repo.host else "auto"},
        connect_timeout=10,
        read_timeout=60,
        retries={"mode": "standard", "max_attempts": 3},
        # Checksums in trailers (botocore's default since 1.36) are refused by some S3
        # implementations; the files' sha256 are in metadata.json and checked on download.
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
    )
    session = boto3.session.Session(
        aws_access_key_id=key,
        aws_secret_access_key=secret,
        aws_session_token=os.environ.get("AWS_SESSION_TOKEN") or None,
        region_name=os.environ.get("AWS_DEFAULT_REGION") or "us-east-1",
    )
    return session.client("s3", endpoint_url=repo.endpoint, config=config)


class Bucket:
    """The few S3 calls the repository needs, each failure one line naming the repository."""

    def __init__(self, repo: ModelRepository) -> None:
        self.repo = repo
        self._client: Any = None

    @property
    def client(self) -> Any:
        if self._client is None:
            self._client = connect(self.repo)
        return self._client

    @contextlib.contextmanager
    def answering(self, what: str) -> Iterator[None]:
        from botocore import exceptions as bx

        try:
            yield
        except bx.ClientError as e:
            error = e.response.get("Error", {})
            code = str(error.get("Code", "?"))
            if code in REFUSED_CREDENTIALS:
                raise UsageError(
                    f"model repository {self.repo}: {what}: the server refused these "
                    f"credentials ({code}): check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
                ) from None
            if code == "NoSuchBucket" or (code == "404" and what.startswith("list")):
                raise UsageError(
                    f"model repository {self.repo}: bucket {self.repo.bucket} does not exist "
                    "there: create it, or check the URL"
                ) from None
            message = error.get("Message") or ""
            raise PipelineFailure(
                f"model repository {self.repo}: {what}: {code} {message}"
            ) from None
        except (bx.BotoCoreError, OSError) as e:
            raise PipelineFailure(f"model repository {self.repo}: {what}: {one_line(e)}") from None

    def objects(self, under: str) -> dict[str, Entry]:
        """Every object whose key starts with `under`, by its key relative to it."""
        found: dict[str, Entry] = {}
        with self.answering(f"listing {under}"):
            pages = self.client.get_paginator("list_objects_v2")
            for page in pages.paginate(Bucket=self.repo.bucket, Prefix=under):
                for item in page.get("Contents", []):
                    modified = item["LastModified"].timestamp()
                    found[item["Key"][len(under) :]] = Entry(item["Size"], modified)
        return found

    def folders(self, under: str) -> list[str]:
        """The names of the "folders" directly under `under`."""
        names = []
        with self.answering(f"listing {under}"):
            pages = self.client.get_paginator("list_objects_v2")
            for page in pages.paginate(Bucket=self.repo.bucket, Prefix=under, Delimiter="/"):
                names += [
                    p["Prefix"][len(under) :].rstrip("/") for p in page.get("CommonPrefixes", [])
                ]
        return names

    def get(self, key: str) -> bytes | None:
        with self.answering(f"reading {key}"):
            try:
                return bytes(
                    self.client.get_object(Bucket=self.repo.bucket, Key=key)["Body"].read()
                )
            except self.client.exceptions.NoSuchKey:
                return None

    def put(self, key: str, body: bytes, exclusive: bool = False) -> bool:
        """Upload `body` to `key`; with `exclusive` only if no object has that key (False
        if one has: HTTP 412)."""
        from botocore.exceptions import ClientError

        condition = {"IfNoneMatch": "*"} if exclusive else {}
        with self.answering(f"writing {key}"):
            try:
                self.client.put_object(Bucket=self.repo.bucket, Key=key, Body=body, **condition)
            except ClientError as e:
                if exclusive and e.response.get("Error", {}).get("Code") in (
                    "PreconditionFailed",
                    "412",
                ):
                    return False
                raise
        return True

    def delete(self, keys: list[str]) -> None:
        with self.answering(f"deleting {', '.join(keys)}"):
            for key in keys:  # one by one: GCS's S3 interoperability has no DeleteObjects
                self.client.delete_object(Bucket=self.repo.bucket, Key=key)

    def download(self, key: str, path: Path) -> tuple[int, str]:
        """Write object `key` to `path`; return its size and sha256."""
        digest, size = hashlib.sha256(), 0
        with self.answering(f"reading {key}"), naming(path), open(path, "wb") as f:
            body = self.client.get_object(Bucket=self.repo.bucket, Key=key)["Body"]
            while chunk := body.read(CHUNK):
                digest.update(chunk)
                size += len(chunk)
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        return size, digest.hexdigest()


def parse_record(content: bytes | None, where: str, what: str) -> dict[str, Any] | None:
    if content is None:
        return None
    try:
        record = json.loads(content)
    except ValueError as e:
        raise UsageError(f"{what} {where} is damaged: {one_line(e)}") from None
    if not isinstance(record, dict):
        raise UsageError(f"{what} {where} is damaged: not a JSON object")
    return record


class S3Model:
    """One model's folder in the bucket. `work` is the exporting volume's folder for this
    model (export only): the claims this volume made are remembered there."""

    def __init__(self, repo: ModelRepository, name: str, work: Path | None = None) -> None:
        self.repo, self.name, self.work = repo, name, work
        self.bucket = Bucket(repo)
        self.root = repo.key(name) + "/"
        self._held: tuple[bytes, float] | None = None  # the lock's body, when taken

    def url(self, *parts: str) -> str:
        return "/".join([str(self.repo), self.name, *parts])

    def listing(self) -> dict[str, Entry]:
        return self.bucket.objects(self.root)

    def versions(self, listing: dict[str, Entry] | None = None) -> list[int]:
        """The versions that count: config.pbtxt, model.onnx and the metadata.json marker."""
        return servable_in(self.listing() if listing is None else listing)

    def metadata(self, version: int) -> dict[str, Any] | None:
        key = f"{version}/{METADATA_FILE}"
        return parse_record(self.bucket.get(self.root + key), self.url(key), "version metadata")

    def config_text(self) -> str:
        content = self.bucket.get(self.root + CONFIG_FILE)
        if content is None:
            raise PipelineFailure(f"{self.url(CONFIG_FILE)} does not exist")
        return content.decode()

    def read_record(self, run_id: str) -> tuple[dict[str, Any] | None, str]:
        key = f"{RUNS}/{validate_name(run_id)}.json"
        where = self.url(key)
        return parse_record(self.bucket.get(self.root + key), where, "export record"), where

    def write_record(self, run_id: str, attempt: dict[str, Any]) -> None:
        """Add an export attempt to the run's record in the bucket, as export.json on the
        volume (storage.standing_record): the bucket's copy has its own history, since
        a run id may be exported from more than one volume. Call in the volume's lock."""
        try:
            previous = self.read_record(run_id)[0] or {}
        except UsageError as e:
            log.warning("%s: starting it again", e)
            previous = {}
        body = (json.dumps(standing_record(previous, attempt), indent=2) + "\n").encode()
        self.bucket.put(f"{self.root}{RUNS}/{validate_name(run_id)}.json", body)

    # Publication --------------------------------------------------------------------

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        """Hold the model's lock in the bucket (.export/lock.json, created only if absent):
        exports from different volumes gate and publish one at a time. A lock left by a
        dead export is taken over: at once if this volume made it (its export lock is ours
        now, so that export is gone), else when its lease has ended."""
        token = uuid.uuid4().hex
        body = json.dumps(
            {
                "token": token,
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "at": datetime.now(UTC).isoformat(timespec="seconds"),
                "lease_seconds": LEASE_SECONDS,
            }
        ).encode()
        key = self.root + LOCK
        self._remember(token)  # before the bucket has it: a crash after is still known
        waited = False
        while not self.bucket.put(key, body, exclusive=True):
            if self._lock_dead():
                log.warning("taking over %s, left by an export that is gone", self.url(LOCK))
                self.bucket.delete([key])
                continue
            if not waited:
                log.info("waiting for another export's lock %s", self.url(LOCK))
                waited = True
            time.sleep(WAIT_POLL)
        self._held = (body, time.monotonic())
        self._check_conditional(key, body)
        try:
            yield
        finally:
            self._release(key, body)
            self._forget(token)

    def _release(self, key: str, body: bytes) -> None:
        held, self._held = self._held, None
        if held is None or time.monotonic() - held[1] > LEASE_SECONDS:
            return  # another export may hold it by now
        with contextlib.suppress(PipelineFailure, UsageError):
            self.bucket.delete([key])

    def _check_conditional(self, key: str, body: bytes) -> None:
        """Warn where the server ignores If-None-Match: the lock then excludes nothing."""
        if self.bucket.put(key, body, exclusive=True):
            log.warning(
                "%s ignores conditional writes (If-None-Match): exports from different "
                "volumes into it are not serialised; exports from one volume still are",
                self.repo,
            )

    def _lock_dead(self) -> bool:
        entry = self.bucket.objects(self.root + LOCK).get("")
        record = parse_record(self.bucket.get(self.root + LOCK), self.url(LOCK), "lock") or {}
        token = record.get("token")
        if isinstance(token, str) and self._remembered(token):
            self._forget(token)
            return True
        return entry is not None and time.time() - entry.modified > LEASE_SECONDS

    def publish(self, config_text: str, files: dict[str, bytes], metadata: dict[str, Any]) -> int:
        """Upload a new version, its marker last; return its number. Call in exclusive()."""
        assert self._held is not None, "publish() outside exclusive()"
        listing = self._without_leftovers(self.listing())
        numbers = [int(k.split("/", 1)[0]) for k in listing if is_version_name(k.split("/", 1)[0])]
        version = 1 + max(numbers, default=0)
        metadata = {**metadata, "version": version, "files": file_records(files)}
        # The config goes first, as on the volume: the tensors never change between
        # versions, so the version being served keeps working with it.
        self.bucket.put(self.root + CONFIG_FILE, config_text.encode())
        for filename, content in files.items():
            self.bucket.put(f"{self.root}{version}/{filename}", content)
        if time.monotonic() - self._held[1] > LEASE_SECONDS - LEASE_MARGIN:
            raise PipelineFailure(
                f"uploading {self.url(str(version))} took longer than the lock's lease "
                f"({LEASE_SECONDS:.0f} s): not published; the next export removes it"
            )
        marker = f"{self.root}{version}/{METADATA_FILE}"
        body = (json.dumps(metadata, indent=2) + "\n").encode()
        if not self.bucket.put(marker, body, exclusive=True):
            raise PipelineFailure(f"{self.url(str(version))} was marked by another export")
        try:
            self._check_published(version, metadata)
        except BaseException:
            self.bucket.delete([marker])  # the version stops counting at once
            raise
        return version

    def _without_leftovers(self, listing: dict[str, Entry]) -> dict[str, Entry]:
        """Delete versions without their marker (under the lock: their export is gone)."""
        marked = set(self.versions(listing))
        left = sorted(
            {k.split("/", 1)[0] for k in listing if is_version_name(k.split("/", 1)[0])}
            - {str(v) for v in marked}
        )
        for number in left:
            log.warning("removing %s, left by an interrupted export", self.url(number))
            self.bucket.delete([self.root + k for k in listing if k.startswith(f"{number}/")])
        return {k: e for k, e in listing.items() if k.split("/", 1)[0] not in left}

    def _check_published(self, version: int, metadata: dict[str, Any]) -> None:
        """List the version again: every file whole, and the lock still ours."""
        listing = self.bucket.objects(f"{self.root}{version}/")
        for filename, record in metadata["files"].items():
            entry = listing.get(filename)
            if entry is None or entry.size != record["bytes"]:
                raise PipelineFailure(
                    f"{self.url(str(version), filename)} changed during publication"
                )
        assert self._held is not None
        if self.bucket.get(self.root + LOCK) != self._held[0]:
            raise PipelineFailure(f"{self.url(LOCK)} changed hands during publication")

    def clean_stale(self) -> None:
        """Nothing outside the lock: publish removes leftovers while holding it."""

    def _token_path(self, token: str) -> Path | None:
        return None if self.work is None else self.work / "bucket-locks" / token

    def _remember(self, token: str) -> None:
        path = self._token_path(token)
        if path is not None:
            atomic_write_text(path, f"{self.repo}/{self.name}\n")

    def _forget(self, token: str) -> None:
        path = self._token_path(token)
        if path is not None:
            path.unlink(missing_ok=True)

    def _remembered(self, token: str) -> bool:
        path = self._token_path(token)
        return path is not None and path.is_file()

    # Checking, reading and deleting versions -------------------------------------------

    def damage(self, version: int) -> str | None:
        """Why a version is not what its metadata.json records (None: intact), by the
        sizes the listing gives; a download (pin, serve) checks every sha256 too."""
        try:
            meta = self.metadata(version)
        except UsageError as e:
            return str(e)
        files = (meta or {}).get("files")
        if not isinstance(files, dict) or MODEL_FILE not in files:
            return f"{self.url(str(version), METADATA_FILE)} records no file checksums"
        listing = self.bucket.objects(f"{self.root}{version}/")
        for filename, record in files.items():
            entry = listing.get(filename)
            if entry is None or entry.size != record.get("bytes"):
                found = "missing" if entry is None else f"{entry.size} bytes"
                return (
                    f"{self.url(str(version), filename)} is {found}, not the "
                    f"{record.get('bytes')} bytes {METADATA_FILE} records"
                )
        return None

    def config_damage(self) -> str | None:
        from google.protobuf import text_format

        from mnist_pipeline.repository import parse_config

        content = self.bucket.get(self.root + CONFIG_FILE)
        if content is None:
            return None
        try:
            parse_config(content.decode())
        except (UnicodeDecodeError, text_format.ParseError) as e:
            return f"{self.url(CONFIG_FILE)}: {e}"
        return None

    def write_config(self, config_text: str) -> None:
        self.bucket.put(self.root + CONFIG_FILE, config_text.encode())

    def delete_version(self, version: int) -> None:
        """Delete a version, its marker first: half deleted, it no longer counts."""
        files = sorted(self.bucket.objects(f"{self.root}{version}/"))
        files.sort(key=lambda k: k != METADATA_FILE)
        self.bucket.delete([f"{self.root}{version}/{k}" for k in files])

    def download_version(self, version: int, dest: Path) -> dict[str, Any]:
        """Download a version's files into the folder `dest`, each checked against the
        sha256 metadata.json records; return that metadata."""
        meta = self.metadata(version)
        files = (meta or {}).get("files")
        if not isinstance(files, dict) or MODEL_FILE not in files:
            raise PipelineFailure(
                f"{self.url(str(version), METADATA_FILE)} records no file checksums"
            )
        dest.mkdir(parents=True, exist_ok=True)
        for filename, record in files.items():
            validate_name(filename, "file name")
            size, sha256 = self.bucket.download(f"{self.root}{version}/{filename}", dest / filename)
            if (size, sha256) != (record.get("bytes"), record.get("sha256")):
                raise PipelineFailure(
                    f"{self.url(str(version), filename)}: {size} bytes, sha256 {sha256}, but "
                    f"{METADATA_FILE} records {record.get('bytes')} bytes, {record.get('sha256')}"
                )
        assert meta is not None
        atomic_write_json(dest / METADATA_FILE, meta)
        return meta
