"""A Job's podFailurePolicy as the Job controller applies it to a failed pod.

The semantics of Kubernetes 1.30 (pkg/controller/job/pod_failure_policy.go): the rules are
tried in order and the first that matches decides; none matching, the pod counts against
backoffLimit ("Count"). onExitCodes matches a terminated container (the main ones first, then
the init containers) with a non-zero exit code, named containerName when one is given, whose
code is In (or NotIn) the values; onPodConditions matches a pod condition of that type and
status ("True" when unset, the API's default). No cluster runs here: the tests give this the
exit codes real containers returned.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

PodStatus = dict[str, Any]


def failed_pod(
    container: str, exit_code: int, init: bool = True, conditions: Iterable[str] = ()
) -> PodStatus:
    """A failed pod's .status: `container` terminated with `exit_code`, the pod's
    `conditions` (types, status "True")."""
    status = {"name": container, "state": {"terminated": {"exitCode": exit_code}}}
    return {
        "phase": "Failed",
        "initContainerStatuses" if init else "containerStatuses": [status],
        "conditions": [{"type": c, "status": "True"} for c in conditions],
    }


def action(job: dict[str, Any], pod: PodStatus) -> str:
    """What the Job controller does with this failed pod: the first matching rule's action
    (FailJob, FailIndex, Ignore, Count), else Count."""
    assert pod["phase"] == "Failed", "the policy applies to failed pods only"
    for rule in job["spec"].get("podFailurePolicy", {}).get("rules", []):
        assert ("onExitCodes" in rule) != ("onPodConditions" in rule), rule
        if "onExitCodes" in rule and _exit_codes_match(rule["onExitCodes"], pod):
            return str(rule["action"])
        if "onPodConditions" in rule and _conditions_match(rule["onPodConditions"], pod):
            return str(rule["action"])
    return "Count"


def _exit_codes_match(requirement: dict[str, Any], pod: PodStatus) -> bool:
    operator, values = requirement["operator"], set(requirement["values"])
    assert operator in ("In", "NotIn"), operator
    assert not (operator == "In" and 0 in values), "the API refuses 0 with In"
    statuses = [*pod.get("containerStatuses", []), *pod.get("initContainerStatuses", [])]
    for status in statuses:
        terminated = status.get("state", {}).get("terminated")
        if terminated is None or terminated["exitCode"] == 0:
            continue
        if requirement.get("containerName") not in (None, status["name"]):
            continue
        if (terminated["exitCode"] in values) == (operator == "In"):
            return True
    return False


def _conditions_match(patterns: list[dict[str, Any]], pod: PodStatus) -> bool:
    return any(
        condition["type"] == pattern["type"]
        and condition["status"] == pattern.get("status", "True")
        for condition in pod.get("conditions", [])
        for pattern in patterns
    )
