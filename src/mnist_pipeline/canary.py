"""A canary release, decided by measurements.

`export --canary` publishes a run's model as the challenger; the champion stays the
version served by default. Some Triton replicas serve the challenger beside the
champion's, behind one name, so clients send them their share of requests. `analyse`
then decides, top to bottom:

  STEP 1  which versions: the champion, and the run's version, which must be the challenger
  STEP 2  watch: until the challenger has answered --canary-requests requests and the
          champion some, as Prometheus counts them, or --canary-window seconds have passed
  STEP 3  serving, from Prometheus (Triton's metrics, by version): requests, failures, and
          the highest p99 over the watch and the minute before it
  STEP 4  accuracy: labelled test images sent through the same name; each version is
          measured on the ones it answered
  STEP 5  decide (`decide`, pure) and record: promoted (the champion now, served by default
          from the next start of a replica) or rolled back (never served by default), with
          the numbers and reasons in the ledger and the run's record; registry aliases move;
          on Kubernetes, the replicas whose pin changed restart
"""

from __future__ import annotations

import json
import logging
import math
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from mnist_pipeline import client, settings
from mnist_pipeline.errors import PipelineFailure, UsageError, one_line
from mnist_pipeline.kube import KubeApi
from mnist_pipeline.registry import sync_after_export
from mnist_pipeline.repository import PROMOTED, ROLLED_BACK, Repository, Scan, Version, now
from mnist_pipeline.storage import canary_dir
from mnist_pipeline.tracking import Tracking

log = logging.getLogger(__name__)

POLL_SECONDS = 2.0
PROMOTE, ROLL_BACK = settings.OVERRIDES
BY_HAND = "decided by hand (--override)"
# How far before the watch p99 is read from: the minute Triton's summary keeps.
SUMMARY_SECONDS = 60


@dataclass(frozen=True)
class Thresholds(settings.Settings):
    max_p99_ratio: float = settings.MAX_P99_RATIO.field()
    max_error_rate: float = settings.MAX_ERROR_RATE.field()
    max_accuracy_drop: float = settings.MAX_ACCURACY_DROP.field()


@dataclass(frozen=True)
class Measured:
    """One version's numbers: from Prometheus (requests, failures, p99) and the probe."""

    version: int
    requests: int = 0  # answered, successfully or not
    failures: int = 0
    p99_ms: float | None = None
    accuracy: float | None = None
    images: int = 0  # probe images it answered

    @property
    def error_rate(self) -> float | None:
        return self.failures / self.requests if self.requests else None

    def text(self) -> str:
        p99 = "?" if self.p99_ms is None else f"{self.p99_ms:.2f} ms"
        errors = "?" if self.error_rate is None else f"{self.error_rate:.2%}"
        accuracy = "?" if self.accuracy is None else f"{self.accuracy:.4f}"
        return (f"version {self.version}: {self.requests} requests, errors {errors}, p99 "
                f"{p99}, accuracy {accuracy} on {self.images} probe images")  # fmt: skip


@dataclass(frozen=True)
class Decision:
    promote: bool
    reasons: tuple[str, ...]  # why not, when rolled back

    @property
    def release(self) -> str:
        """What the ledger records for the challenger."""
        return PROMOTED if self.promote else ROLLED_BACK


def decide(champion: Measured, challenger: Measured, limits: Thresholds) -> Decision:
    """Promote the challenger unless a measurement says not to; every reason is kept."""
    reasons = []
    if challenger.error_rate is None:
        reasons.append("the challenger answered no request: no replica served it traffic")
    elif challenger.error_rate > limits.max_error_rate:
        reasons.append(f"error rate {challenger.error_rate:.2%} > {limits.max_error_rate:.2%}")
    if champion.requests == 0:
        reasons.append("Prometheus counted no request answered by the champion: nothing to "
                       "compare with (does it scrape every replica?)")  # fmt: skip
    elif challenger.p99_ms is None or champion.p99_ms is None:
        reasons.append("no p99 latency to compare (no Triton summary reported one over the watch)")
    elif challenger.p99_ms > champion.p99_ms * limits.max_p99_ratio:
        ratio = challenger.p99_ms / champion.p99_ms
        reasons.append(f"p99 {challenger.p99_ms:.2f} ms is {ratio:.2f}x the champion's "
                       f"{champion.p99_ms:.2f} ms (limit {limits.max_p99_ratio:g}x)")  # fmt: skip
    if challenger.accuracy is None or champion.accuracy is None:
        reasons.append("the probe measured no accuracy for both versions")
    elif challenger.accuracy < champion.accuracy - limits.max_accuracy_drop:
        reasons.append(f"accuracy {challenger.accuracy:.4f} < the champion's "
                       f"{champion.accuracy:.4f} - {limits.max_accuracy_drop:g}")  # fmt: skip
    return Decision(not reasons, tuple(reasons))


# STEP 1 -------------------------------------------------------------------------------


def versions(scan: Scan, repo: Repository, run_id: str) -> tuple[Version, Version] | str:
    """(champion, challenger): the run's version must be the challenger awaiting a decision.
    Why there is nothing to decide, when it is the champion (a first release, or an export
    that kept the champion) or was decided on already."""
    challenger, champion = scan.challenger, scan.champion
    record = repo.read_record(run_id) or {}
    number = record.get("version")
    theirs = scan.versions.get(number) if isinstance(number, int) else None
    if champion is not None and number == champion.number:
        return f"run {run_id}'s version is the champion of {repo.name}"
    if theirs is not None and theirs.release in (PROMOTED, ROLLED_BACK):
        return f"run {run_id}'s version {number} was {theirs.release} already"
    if challenger is None or number != challenger.number:
        state = f"its release is {theirs.release!r}" if theirs else "it published none"
        raise UsageError(
            f"run {run_id}'s version is not the challenger of a canary release ({state}; the "
            f"challenger: {challenger.number if challenger else 'none'}): publish it with "
            "`mnist-pipeline export --canary`"
        )
    if champion is None:
        raise UsageError(f"{repo} has no champion to compare version {number} with")
    return champion, challenger


# STEP 2 and 3 --------------------------------------------------------------------------


def prometheus_query(url: str, promql: str) -> dict[int, float]:
    """An instant query's value by the `version` label."""
    query = urllib.parse.urlencode({"query": promql})
    try:
        with urllib.request.urlopen(f"{url}/api/v1/query?{query}", timeout=10) as response:
            answer = json.loads(response.read())
    except (OSError, ValueError) as e:
        raise PipelineFailure(f"Prometheus at {url}: {one_line(e)}") from None
    values = {}
    for series in answer.get("data", {}).get("result", []):
        version, value = series["metric"].get("version", ""), float(series["value"][1])
        if version.isdigit() and math.isfinite(value):
            values[int(version)] = value
    return values


def serving(url: str, model: str, number: int, seconds: int) -> Measured:
    """A version's requests, failures and p99 over every replica serving it: Triton's
    counters since each started, and the highest p99 its summary reported over the last
    `seconds` (a summary covers about the last minute of requests, none once traffic pauses)."""
    where = f'model="{model}",version="{number}"'
    p99 = f'nv_inference_request_summary_us{{{where},quantile="0.99"}}[{seconds}s]'
    success, failure, p99_us = (
        prometheus_query(url, promql).get(number)
        for promql in (
            f"sum by (version) (nv_inference_request_success{{{where}}})",
            f"sum by (version) (nv_inference_request_failure{{{where}}})",
            f"max by (version) (max_over_time({p99}))",
        )
    )
    requests, failures = int((success or 0) + (failure or 0)), int(failure or 0)
    return Measured(number, requests, failures, None if p99_us is None else p99_us / 1000)


def watch(url: str, model: str, numbers: tuple[int, int], window: float, enough: int) -> float:
    """Seconds watched: until Prometheus has counted requests answered by the champion and
    `enough` by the challenger (numbers: theirs), or `window` passed."""
    champion, challenger = numbers
    answers = (f'{{__name__=~"nv_inference_request_(success|failure)",model="{model}",'
               f'version=~"{champion}|{challenger}"}}')  # fmt: skip
    started = time.monotonic()
    while True:
        answered = prometheus_query(url, f"sum by (version) ({answers})")
        waited = time.monotonic() - started
        counts = [int(answered.get(n, 0)) for n in numbers]
        if (counts[0] > 0 and counts[1] >= enough) or waited >= window:
            log.info("versions %d and %d answered %d and %d request(s) in %.0f s of watching",
                     *numbers, *counts, waited)  # fmt: skip
            return waited
        time.sleep(POLL_SECONDS)


# STEP 4 ----------------------------------------------------------------------------------


def probe(storage: Path, cfg: client.InferConfig) -> tuple[dict[str, Any], str | None]:
    """Labelled requests through the name every replica answers: accuracy by version, and
    why the probe failed (a version that fails requests)."""
    try:
        report = client.infer(storage, cfg)
        return report.get("by_version", {}), None
    except PipelineFailure as e:
        return {}, str(e)


# STEP 5 ----------------------------------------------------------------------------------


def record(repo: Repository, run_id: str, challenger: Version, decision: Decision, why: str,
           numbers: dict[str, Any]) -> None:  # fmt: skip
    """The decision in the ledger (the challenger's release) and the run's record, under the
    lock, if the challenger still awaits one (another analysis may have decided)."""
    with repo.lock.held("canary"):
        scan = repo.scan()
        if scan.challenger is None or scan.challenger.number != challenger.number:
            raise PipelineFailure(
                f"version {challenger.number} was decided on meanwhile (its release is "
                f"{scan.versions[challenger.number].release!r}): nothing recorded"
            )
        repo.set_release(scan.challenger, decision.release, why)
        repo.note(run_id, "canary", {"decision": decision.release,
                                     "reasons": list(decision.reasons), "why": why, **numbers,
                                     "at": now()})  # fmt: skip


@dataclass(frozen=True)
class Analysis:
    """What `mnist-pipeline canary` was given."""

    storage: Path
    repo: Repository
    run_id: str
    url: str
    prometheus_url: str
    window: float
    enough_requests: int
    probe_requests: int
    limits: Thresholds
    tracking: Tracking
    kube: KubeApi | None = None  # where the Deployments below are
    stable_deployment: str | None = None
    canary_deployment: str | None = None
    override: str | None = None  # PROMOTE or ROLL_BACK: decided by hand, nothing measured


def restart_replicas(a: Analysis, decision: Decision) -> None:
    """Roll the replicas whose pin the decision changed: the stable ones (--model-version
    "") if the challenger is now the champion; the canary ones (challenger) either way."""
    stable = a.stable_deployment if decision.promote else None
    names = [name for name in (stable, a.canary_deployment) if name]
    if not names:
        return
    if a.kube is None:
        raise PipelineFailure(
            f"the decision is recorded, but no Deployment was restarted (no service account "
            f"token): restart {', '.join(names)} (kubectl rollout restart deployment/NAME)"
        )
    for name in names:
        a.kube.restart(name, {"mnist-pipeline/canary": f"run {a.run_id}: {decision.release}"})


def measure(a: Analysis, champion: Version, challenger: Version) -> tuple[Decision, dict[str, Any]]:
    """STEP 2 to 5: the decision and the numbers it was made on."""
    name, numbers = a.repo.name, (champion.number, challenger.number)
    # STEP 2
    watched = watch(a.prometheus_url, name, numbers, a.window, a.enough_requests)
    seconds = math.ceil(watched) + SUMMARY_SECONDS  # STEP 3: the watch and the minute before
    measured = [serving(a.prometheus_url, name, n, seconds) for n in numbers]
    cfg = client.InferConfig(url=a.url, model_name=name, model_version="", warmup=0,
                             requests=a.probe_requests, images_per_request=8,
                             concurrency=2, output=canary_dir(a.storage) / a.run_id)  # fmt: skip
    by_version, failed = probe(a.storage, cfg)  # STEP 4
    champ, chall = (
        replace(m, accuracy=by_version.get(str(m.version), {}).get("accuracy"),
                images=by_version.get(str(m.version), {}).get("images", 0))
        for m in measured
    )  # fmt: skip
    decision = decide(champ, chall, a.limits)  # STEP 5
    if failed:
        decision = Decision(False, (*decision.reasons, f"the probe failed: {failed}"))
    for m in (champ, chall):
        log.info("canary %s", m.text())
    return decision, {"champion": asdict(champ), "challenger": asdict(chall),
                      "limits": asdict(a.limits)}  # fmt: skip


def analyse(a: Analysis) -> Decision | str:
    """The decision, recorded and applied; or why there was nothing to decide."""
    chosen = versions(a.repo.scan(), a.repo, a.run_id)  # STEP 1
    if isinstance(chosen, str):
        return chosen
    champion, challenger = chosen
    log.info("canary release of %s: champion version %d, challenger version %d (run %s)",
             a.repo.name, champion.number, challenger.number, a.run_id)  # fmt: skip
    if a.override is None:
        decision, numbers = measure(a, champion, challenger)
        why = "; ".join(decision.reasons) or "every measurement within its limit"
    else:  # an operator's call: nothing is measured
        promote = a.override == PROMOTE
        decision = Decision(promote, () if promote else (BY_HAND,))
        numbers, why = {"champion": {"version": champion.number}}, BY_HAND
    record(a.repo, a.run_id, challenger, decision, why, numbers)
    sync_after_export(a.repo, a.tracking)
    restart_replicas(a, decision)
    return decision
