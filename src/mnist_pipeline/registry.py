"""The MLflow model registry as a mirror of the model repository.

The repository (repository.py) decides and keeps what is published; the registry shows
it where MLOps teams look. `sync` makes the registered model of the same name say what
the repository says, and is idempotent: export calls it after every decision, and
`mnist-pipeline sync-registry` repairs whatever an unreachable server made it miss.

- Every published version is a model version, tagged with its repository version, the
  repository's address of it, its run, accuracy, precision and sha256, and its run's
  MLflow run as the model version's run. Its files (model.onnx, metadata.json and the
  config.pbtxt it was served with) are copied to that run's artifacts and are the model
  version's source: MLflow refuses a source outside its artifacts unless it is a bucket,
  and a volume is not one. A version damaged or deleted in the repository keeps its model
  version, tagged `state` damaged or deleted.
- Alias `champion` is the version Triton serves by default (Scan.champion), when it is
  servable. Alias `challenger` is the version a canary release is deciding on
  (export --canary; canary.py); without one the alias is removed.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from mnist_pipeline.errors import PipelineFailure, UsageError, one_line
from mnist_pipeline.repository import DAMAGED, GONE, PUBLISHED, Repository, Scan, Version
from mnist_pipeline.storage import CONFIG_FILE, METADATA_FILE
from mnist_pipeline.tracking import Mlflow, NotFound, Tracking, TrackingError

log = logging.getLogger(__name__)

CHAMPION, CHALLENGER = "champion", "challenger"
VERSION_TAG = "repository_version"
STATES = {PUBLISHED: "published", DAMAGED: "damaged", GONE: "deleted"}


@dataclass(frozen=True)
class Change:
    says: str  # what it does, as sync and status print it
    do: Callable[[], Any]


class Registry:
    """The registered model `repo.name` in the MLflow server `tracking.uri`."""

    def __init__(self, repo: Repository, tracking: Tracking) -> None:
        if not tracking.uri:
            raise ValueError("a registry needs a tracking URI")
        self.repo, self.tracking = repo, tracking
        self.client = Mlflow(tracking.uri)
        self.name = repo.name

    def model_versions(self) -> dict[int, dict[str, Any]]:
        """The newest model version mirroring each version of this repository, by its
        address (another repository may register versions of the same model name)."""
        found = self.client.call("model-versions/search", filter=f"name = '{self.name}'",
                                 max_results="10000").get("model_versions", [])  # fmt: skip
        mirrored: dict[int, dict[str, Any]] = {}
        for mv in sorted(found, key=lambda mv: int(mv["version"])):
            tags = {t["key"]: t["value"] for t in mv.get("tags", [])}
            number = tags.get(VERSION_TAG, "")
            if number.isdigit() and tags.get("repository") == self.repo.url(number):
                mirrored[int(number)] = {**mv, "tags": tags}
        return mirrored

    def aliases(self) -> dict[str, int]:
        """alias -> the repository version its model version mirrors."""
        try:
            model = self.client.call("registered-models/get", name=self.name)
        except NotFound:
            return {}
        return aliases_of(model, self.model_versions())

    def changes(self, scan: Scan) -> list[Change]:
        """What would make the registry say what `scan` says: nothing when it does."""
        try:
            model = self.client.call("registered-models/get", name=self.name)
        except NotFound:
            return [Change(f"register model {self.name}", self.create_model),
                    *self.version_changes(scan, {}), *self.alias_changes(scan, {})]  # fmt: skip
        mirrored = self.model_versions()
        return [
            *self.version_changes(scan, mirrored),
            *self.alias_changes(scan, aliases_of(model, mirrored)),
        ]

    def version_changes(self, scan: Scan, mirrored: dict[int, dict[str, Any]]) -> list[Change]:
        out = []
        for version in scan.having(*STATES):
            mv, state = mirrored.get(version.number), STATES[version.state]
            if mv is not None and mv["tags"].get("sha256") != str(version.identity["sha256"]):
                # The repository was made again at the same address: another model.
                says = (f"tag model version {mv['version']} replaced (repository version "
                        f"{version.number} is another model now)")  # fmt: skip
                out.append(Change(says, functools.partial(self.tag, mv, "state", "replaced")))
                mv = None
            if mv is None and version.state == PUBLISHED:
                out.append(Change(f"register repository version {version.number} "
                                  f"(run {version.run_id})",
                                  functools.partial(self.register, version)))  # fmt: skip
            elif mv is not None and mv["tags"].get("state") != state:
                out.append(Change(f"tag model version {mv['version']} (repository version "
                                  f"{version.number}) {state}",
                                  functools.partial(self.tag, mv, "state", state)))  # fmt: skip
        return out

    def alias_changes(self, scan: Scan, aliases: dict[str, int]) -> list[Change]:
        servable = set(scan.servable)
        wanted = {
            CHAMPION: scan.champion.number if scan.champion else None,
            CHALLENGER: scan.challenger.number if scan.challenger else None,
        }
        out = []
        for alias, number in wanted.items():
            if number is not None and number in servable and aliases.get(alias) != number:
                out.append(Change(f"move alias {alias} to repository version {number}",
                                  functools.partial(self.set_alias, alias, number)))  # fmt: skip
            elif (number is None or number not in servable) and alias in aliases:
                out.append(Change(f"remove alias {alias} (no such servable version)",
                                  functools.partial(self.delete_alias, alias)))  # fmt: skip
        return out

    # Writing ------------------------------------------------------------------------

    def create_model(self) -> None:
        self.client.call("registered-models/create", {
            "name": self.name,
            "description": f"Mirrors the Triton model repository {self.repo.url()}",
        })  # fmt: skip

    def register(self, version: Version) -> None:
        """Copy the version's files to its run's artifacts and register them."""
        run = self.client.run_of(self.tracking.experiment, version.run_id or f"v{version.number}")
        folder = f"repository-version-{version.number}"
        names = [*version.metadata.get("files", {}), METADATA_FILE]
        for name in names:
            content = self.repo.files.get(f"{version.number}/{name}")
            if content is None:
                raise TrackingError(f"{self.repo.url(f'{version.number}/{name}')} vanished")
            self.client.upload(run["info"]["artifact_uri"], f"{folder}/{name}", content)
        config = self.repo.files.get(CONFIG_FILE)
        if config is not None:
            self.client.upload(run["info"]["artifact_uri"], f"{folder}/{CONFIG_FILE}", config)
        identity = version.identity
        tags = {VERSION_TAG: str(version.number), "repository": self.repo.url(str(version.number)),
                "state": STATES[PUBLISHED], **{k: str(v) for k, v in identity.items()}}  # fmt: skip
        self.client.call("model-versions/create", {
            "name": self.name,
            "source": f"{run['info']['artifact_uri']}/{folder}",
            "run_id": run["info"]["run_id"],
            "tags": [{"key": k, "value": v} for k, v in tags.items()],
            "description": f"repository version {version.number}, accuracy {identity['accuracy']}",
        })  # fmt: skip

    def tag(self, mv: dict[str, Any], key: str, value: str) -> None:
        self.client.call("model-versions/set-tag", {"name": self.name, "version": mv["version"],
                                                    "key": key, "value": value})  # fmt: skip

    def set_alias(self, alias: str, number: int) -> None:
        mv = self.model_versions()[number]
        self.client.call("registered-models/alias", {"name": self.name, "alias": alias,
                                                     "version": mv["version"]})  # fmt: skip

    def delete_alias(self, alias: str) -> None:
        self.client.call("registered-models/alias", {"name": self.name, "alias": alias},
                         method="DELETE")  # fmt: skip


def aliases_of(model: dict[str, Any], mirrored: dict[int, dict[str, Any]]) -> dict[str, int]:
    """A registered model's aliases -> the repository versions their model versions mirror."""
    by_mlflow = {str(mv["version"]): n for n, mv in mirrored.items()}
    return {
        a["alias"]: by_mlflow[str(a["version"])]
        for a in model["registered_model"].get("aliases", [])
        if str(a["version"]) in by_mlflow
    }


def sync(repo: Repository, tracking: Tracking) -> list[str]:
    """Apply every change the registry lacks, under the repository's lock (two syncs would
    register a version twice); what was done, a line each."""
    registry = Registry(repo, tracking)
    with repo.lock.held("registry sync"):
        done = []
        for change in registry.changes(repo.scan()):
            change.do()
            log.info("registry %s at %s: %s", registry.name, registry.client.uri, change.says)
            done.append(change.says)
        return done


def sync_after_export(repo: Repository, tracking: Tracking) -> None:
    """export's mirror: the export's outcome stands whatever happens to the mirror (a
    server down, the repository unreadable a moment later); it says how to catch up."""
    if not tracking.uri:
        return
    try:
        sync(repo, tracking)
    except (TrackingError, PipelineFailure, UsageError, OSError) as e:
        log.warning("%s: the registry missed this export; `mnist-pipeline sync-registry` "
                    "brings it up to date", one_line(e))  # fmt: skip
