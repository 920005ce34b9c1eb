"""status: the model repository as one report, as text or JSON (reads only)."""

from __future__ import annotations

import json
from typing import Any

from mnist_pipeline.registry import Registry
from mnist_pipeline.repository import (
    DAMAGED,
    GONE,
    Repository,
    Scan,
    open_repository,
    republish_hint,
)
from mnist_pipeline.storage import ModelRepository
from mnist_pipeline.tracking import UNTRACKED, Tracking, TrackingError


def report(location: ModelRepository, name: str, tracking: Tracking = UNTRACKED) -> dict[str, Any]:
    repo = open_repository(location, name)
    scan = repo.scan()
    holder = repo.lock.holder_now()
    versions = [
        {
            "version": v.number,
            "state": v.state,
            "run_id": v.run_id,
            "accuracy": v.accuracy,
            "precision": v.metadata.get("precision"),
            "exported": v.metadata.get("export_date"),
            "why": v.why or None,
            "release": v.release,
            "remedy": republish_hint(v) if v.state == DAMAGED else None,
        }
        for v in scan.versions.values()
    ]
    champion = scan.champion
    return {
        "repository": str(repo),
        "model_name": name,
        "versions": versions,
        "servable": scan.servable,
        "champion": None if champion is None else champion.number,  # served by default
        "challenger": None if scan.challenger is None else scan.challenger.number,
        "next_version": scan.high_water + 1,
        "damaged": {str(n): why for n, why in scan.damaged.items()},
        "config": scan.config_damage or "ok",
        "runs": {run_id: summary(record) for run_id, record in repo.records().items()},
        "served": list(repo.served().values()),
        "lock": None if holder is None else {**holder.__dict__, "held": str(holder)},
        "registry": registry_report(repo, scan, tracking),
    }


def registry_report(repo: Repository, scan: Scan, tracking: Tracking) -> dict[str, Any] | None:
    """The MLflow registry's aliases, and what `sync-registry` would change (or why the
    server could not say)."""
    if not tracking.uri:
        return None
    registry = Registry(repo, tracking)
    try:
        return {
            "uri": tracking.uri,
            "aliases": registry.aliases(),
            "out_of_date": [change.says for change in registry.changes(scan)],
        }
    except TrackingError as e:
        return {"uri": tracking.uri, "error": str(e)}


def summary(record: dict[str, Any]) -> dict[str, Any]:
    return {k: record.get(k) for k in ("status", "version", "accuracy", "reason", "at", "damaged")}


def as_json(report: dict[str, Any]) -> str:
    return json.dumps(report, indent=2)


def as_text(report: dict[str, Any]) -> str:
    lines = [f"model {report['model_name']} in {report['repository']}", "versions:"]
    for v in report["versions"]:
        accuracy = "?" if v["accuracy"] is None else f"{v['accuracy']:.4f}"
        line = (
            f"  {v['version']:>4}  {v['state']:<9}  run {v['run_id'] or '?'}  accuracy {accuracy}"
        )
        if v["release"]:
            line += f"  ({v['release']})"
        if v["state"] in (DAMAGED, GONE) and v["why"]:
            line += f"  ({v['why']})"
        if v["remedy"]:
            line += f"; {v['remedy']}"
        lines.append(line)
    if not report["versions"]:
        lines.append("  none: run `mnist-pipeline export`")
    servable = ", ".join(map(str, report["servable"])) or "none"
    challenger = f"; challenger: {report['challenger']}" if report["challenger"] else ""
    lines += [
        f"champion: {report['champion'] or 'none'}{challenger}; servable: {servable}; "
        f"next number: {report['next_version']}",
        f"config.pbtxt: {report['config']}",
        "runs:",
    ]
    for run_id, r in report["runs"].items():
        version = f" version {r['version']}" if r["version"] else ""
        what = r["damaged"] or f"{r['status']}{version}: {r['reason']}"
        lines.append(f"  {run_id}  {what}")
    for s in report["served"]:
        lines.append(f"served: version {s.get('version')} in {s.get('folder')} on {s.get('host')}")
    lines.append(f"lock: {report['lock']['held'] if report['lock'] else 'free'}")
    return "\n".join(lines + registry_lines(report["registry"]))


def registry_lines(registry: dict[str, Any] | None) -> list[str]:
    if registry is None:
        return []
    if "error" in registry:
        return [f"registry: {registry['error']}"]
    aliases = ", ".join(f"{a} -> version {n}" for a, n in sorted(registry["aliases"].items()))
    lines = [f"registry {registry['uri']}: {aliases or 'no aliases'}"]
    if registry["out_of_date"]:
        lines.append("  out of date (`mnist-pipeline sync-registry` applies these):")
        lines += [f"    {change}" for change in registry["out_of_date"]]
    return lines
