"""The promotion gate's table of cases: gate.decide on facts alone, no ONNX, no files."""

from __future__ import annotations

from typing import Any

import pytest

from mnist_pipeline import gate
from mnist_pipeline.repository import DAMAGED, GONE, PUBLISHED, Scan, Version

RULES = gate.Rules(min_improvement=0.0, min_accuracy=0.5)


def version(number: int, state: str = PUBLISHED, accuracy: float = 0.99, **meta: Any) -> Version:
    metadata = {"run_id": f"run{number}", "accuracy": accuracy, "weights_sha256": f"w{number}",
                "sha256": f"onnx{number}", "precision": "fp32", **meta}  # fmt: skip
    why = "model.onnx is missing" if state == DAMAGED else ""
    ledger = {"state": "deleted" if state == GONE else "published", "accuracy": accuracy}
    return Version(number, state, metadata, why, ledger)


def scan(*versions: Version) -> Scan:
    return Scan({v.number: v for v in versions}, None)


def offer(
    weights: str = "new", accuracy: float | None = 0.995, run_id: str = "new"
) -> gate.Candidate:
    built = {} if accuracy is None else {"sha256": f"onnx-{weights}", "accuracy": accuracy}
    return gate.Candidate(run_id, weights, "fp32", images=10000, **built)  # type: ignore[arg-type]


PUBLISHED_RECORD = {"status": "published", "version": 1}
C, S, V = offer, scan, version  # the table's shorthand: candidate, scan, version
BUILD, PUBLISH, SKIP, RECORD, REFUSE = gate.BUILD, gate.PUBLISH, gate.SKIP, gate.RECORD, gate.REFUSE


@pytest.mark.parametrize(
    ("case", "candidate", "repository", "record", "action", "version", "says"),
    [
        ("first export, before building", C(accuracy=None), S(), None, BUILD, None, "measured"),
        ("first export", C(), S(), None, PUBLISH, None, "first export"),
        ("better than the champion", C(accuracy=0.995), S(V(1)), None, PUBLISH, None,
         "beats version 1's 0.9900"),
        ("not better", C(accuracy=0.98), S(V(1)), None, SKIP, 1, "not better"),
        ("equal is not better", C(accuracy=0.99), S(V(1)), None, SKIP, 1, "does not beat"),
        ("same weights, another run", C(weights="w1", accuracy=None), S(V(1)), None,
         SKIP, 1, "identical to the published version 1"),
        ("same ONNX bytes", C(weights="other"), S(V(1, sha256="onnx-other")), None,
         SKIP, 1, "identical"),
        ("its own version, record lost", C(weights="w1", accuracy=None, run_id="run1"),
         S(V(1)), None, RECORD, 1, "whose record was lost"),
        ("its own version, recorded", C(weights="w1", accuracy=None, run_id="run1"),
         S(V(1)), PUBLISHED_RECORD, SKIP, 1, "identical"),
        ("below the floor", C(accuracy=0.3), S(), None, REFUSE, None, "publishing floor"),
        ("newest damaged, not better", C(accuracy=0.98), S(V(1), V(2, DAMAGED)),
         None, REFUSE, None, "the newest version 2 is damaged: model.onnx is missing; "
         "re-export the run it came from: mnist-pipeline export --run-id run2"),
        ("newest damaged, identical to an older one", C(weights="w1", accuracy=None),
         S(V(1), V(2, DAMAGED)), None, REFUSE, None, "is damaged"),
        ("newest damaged, its twin republished", C(weights="w2"),
         S(V(1), V(2, DAMAGED)), None, PUBLISH, None, "republished: model.onnx"),
        ("newest damaged, a better model", C(accuracy=0.999),
         S(V(1), V(2, DAMAGED)), None, PUBLISH, None, "beats version 2's"),
        ("the ledger's accuracy decides, not an edited metadata.json", C(accuracy=0.98),
         S(Version(1, DAMAGED, {"accuracy": 0.01, "run_id": "run1"}, "edited",
                      {"state": "published", "accuracy": 0.99})),
         None, REFUSE, None, "is damaged: edited"),
        ("a deleted newest number is no champion", C(accuracy=0.98),
         S(V(1), V(2, GONE, accuracy=0.999)), None, SKIP, 1, "version 1's"),
        ("only deleted versions: nothing to beat", C(accuracy=0.9),
         S(V(1, GONE)), None, PUBLISH, None, "no version to beat"),
    ],
    ids=lambda value: value if isinstance(value, str) and " " in value else "",
)  # fmt: skip
def test_the_gate_decides_each_case(
    case: str,
    candidate: gate.Candidate,
    repository: Scan,
    record: dict[str, Any] | None,
    action: str,
    version: int | None,
    says: str,
) -> None:
    decision = gate.decide(candidate, repository, record, RULES)
    assert (decision.action, decision.version) == (action, version), decision
    assert says in decision.reason, decision.reason


def test_min_improvement_is_a_margin_over_the_champion() -> None:
    rules = gate.Rules(min_improvement=0.01, min_accuracy=0.0)
    champion = scan(version(1, accuracy=0.98))
    assert gate.decide(offer(accuracy=0.985), champion, None, rules).action == gate.SKIP
    assert gate.decide(offer(accuracy=0.995), champion, None, rules).action == gate.PUBLISH


def test_int8_and_fp32_of_one_checkpoint_are_two_models() -> None:
    int8 = gate.Candidate("run1", "w1", "int8", "onnx-int8", 0.995, 10000)
    assert gate.decide(int8, scan(version(1)), None, RULES).action == gate.PUBLISH
