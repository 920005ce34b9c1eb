"""A model repository on object storage through the S3 API (AWS S3, MinIO, Ceph RGW, GCS's
S3 interoperability): files.Files in a bucket, under the prefix the --model-repository URL
names. The layout is the folder's (repository.py), so Triton itself can serve the prefix.

Object stores have no rename and no lock: a file is written whole by one PUT, and create
is a PUT with If-None-Match: *, which the server refuses (HTTP 412) when the key exists.
boto3 is imported only here, and only when a repository is on object storage.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mnist_pipeline.errors import PipelineFailure, UsageError, one_line
from mnist_pipeline.files import Entry
from mnist_pipeline.storage import ModelRepository, naming

log = logging.getLogger(__name__)

CHUNK = 1 << 20
REFUSED_CREDENTIALS = {
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "AccessDenied",
    "InvalidToken",
    "ExpiredToken",
    "403",
}


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


class BucketFiles:
    """files.Files under one model's prefix in a bucket; each failure one line naming the
    repository."""

    def __init__(self, repo: ModelRepository, name: str) -> None:
        self.repo, self.name = repo, name
        self.root = repo.key(name) + "/"
        self._client: Any = None

    def url(self, key: str = "") -> str:
        return "/".join([str(self.repo), self.name, *([key] if key else [])])

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

    def listing(self, under: str = "") -> dict[str, Entry]:
        found: dict[str, Entry] = {}
        prefix = self.root + under
        with self.answering(f"listing {self.url(under)}"):
            pages = self.client.get_paginator("list_objects_v2")
            for page in pages.paginate(Bucket=self.repo.bucket, Prefix=prefix):
                for item in page.get("Contents", []):
                    modified = item["LastModified"].timestamp()
                    found[item["Key"][len(self.root) :]] = Entry(item["Size"], modified)
        return found

    def get(self, key: str) -> bytes | None:
        with self.answering(f"reading {self.url(key)}"):
            try:
                response = self.client.get_object(Bucket=self.repo.bucket, Key=self.root + key)
                return bytes(response["Body"].read())
            except self.client.exceptions.NoSuchKey:
                return None

    def put(self, key: str, body: bytes) -> None:
        with self.answering(f"writing {self.url(key)}"):
            self.client.put_object(Bucket=self.repo.bucket, Key=self.root + key, Body=body)

    def create(self, key: str, body: bytes) -> bool:
        from botocore.exceptions import ClientError

        with self.answering(f"writing {self.url(key)}"):
            try:
                self.client.put_object(
                    Bucket=self.repo.bucket, Key=self.root + key, Body=body, IfNoneMatch="*"
                )
            except ClientError as e:
                if e.response.get("Error", {}).get("Code") in ("PreconditionFailed", "412"):
                    return False
                raise
        return True

    def delete(self, keys: list[str]) -> None:
        for key in keys:  # one by one: GCS's S3 interoperability has no DeleteObjects
            with self.answering(f"deleting {self.url(key)}"):
                self.client.delete_object(Bucket=self.repo.bucket, Key=self.root + key)

    def holds(self, path: Path) -> bool:
        return False  # a bucket is no folder of this machine

    def place(self, key: str, path: Path) -> None:
        with self.answering(f"reading {self.url(key)}"), naming(path), open(path, "wb") as f:
            body = self.client.get_object(Bucket=self.repo.bucket, Key=self.root + key)["Body"]
            while chunk := body.read(CHUNK):
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
