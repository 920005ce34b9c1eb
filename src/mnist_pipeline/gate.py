"""The promotion gate: what export does with a candidate, decided from facts alone.

decide() reads no file and runs no model: it takes the candidate (its weights, and once
built its ONNX bytes and measured accuracy), the repository as scanned under the lock, and
the run's own record, and returns a Decision whose reason is the sentence export logs
and records. export.py measures before and applies after.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mnist_pipeline.repository import PUBLISHED, Scan, Version, republish_hint
from mnist_pipeline.storage import ExportStatus

BUILD, PUBLISH, SKIP, RECORD, REFUSE = "build", "publish", "skip", "record", "refuse"


@dataclass(frozen=True)
class Candidate:
    """What the gate knows of the model export offers; sha256 and accuracy once built."""

    run_id: str | None
    weights_sha256: str
    precision: str
    sha256: str | None = None
    accuracy: float | None = None
    images: int = 0


@dataclass(frozen=True)
class Rules:
    min_improvement: float = 0.0
    min_accuracy: float = 0.0


@dataclass(frozen=True)
class Decision:
    action: str  # BUILD first, then PUBLISH, SKIP, RECORD (published earlier) or REFUSE
    reason: str
    version: int | None = None  # SKIP: the version kept; RECORD: the one published
    champion: Version | None = None
    accuracy: float | None = None  # the candidate's, or its twin's


def twin(
    scan: Scan, candidate: Candidate, states: tuple[str, ...] = (PUBLISHED,)
) -> Version | None:
    """A version holding the same model: the same weights at the same precision (the int8
    and fp32 exports of one checkpoint are two models), or the same ONNX bytes."""
    for version in scan.having(*states):
        meta = version.identity
        same_weights = meta.get("weights_sha256") == candidate.weights_sha256
        if (same_weights and meta.get("precision") == candidate.precision) or (
            candidate.sha256 is not None and meta.get("sha256") == candidate.sha256
        ):
            return version
    return None


def decide(
    candidate: Candidate, scan: Scan, record: dict[str, Any] | None, rules: Rules
) -> Decision:
    """STEP 1 an identical model is never published twice; STEP 2 build before judging;
    STEP 3 the publishing floor; STEP 4 the newest version, damaged, is republished from
    its twin; STEP 5 the champion (the newest published version, at the accuracy recorded
    when it was published) must be beaten by more than min_improvement."""
    newest = scan.champion
    damaged_newest = newest if newest is not None and newest.state != PUBLISHED else None
    refusal = (
        None if damaged_newest is None
        else Decision(REFUSE, f"not published, and the newest version {damaged_newest.number} "
                      f"is damaged: {damaged_newest.why}; " + republish_hint(damaged_newest))
    )  # fmt: skip
    # STEP 1
    same = twin(scan, candidate)
    if same is not None:
        recorded = record or {}
        ours = candidate.run_id is not None and same.run_id == candidate.run_id
        said = (recorded.get("status"), recorded.get("version"))
        if ours and said != (ExportStatus.PUBLISHED, same.number):
            why = f"published as version {same.number} by an earlier export whose record was lost"
            return Decision(RECORD, why, same.number, accuracy=same.accuracy)
        why = f"identical to the published version {same.number} (same model), not published again"
        kept = same if newest is None else newest
        return refusal or Decision(SKIP, why, kept.number, kept, same.accuracy)
    # STEP 2
    if candidate.accuracy is None:
        return Decision(BUILD, "a new model: exported and measured before the gate")
    accuracy = candidate.accuracy
    on_all = f"on all {candidate.images} test images"
    # STEP 3
    if accuracy < rules.min_accuracy:
        return Decision(REFUSE, f"not published: accuracy {accuracy:.4f} {on_all} is below the "
                        f"publishing floor {rules.min_accuracy:g} (--publish-min-accuracy): the "
                        "model did not learn enough")  # fmt: skip
    # STEP 4
    if (
        damaged_newest is not None
        and twin(scan, candidate, (damaged_newest.state,)) is damaged_newest
    ):
        why = f"republished: {damaged_newest.why}"
        return Decision(PUBLISH, why, champion=damaged_newest, accuracy=accuracy)
    # STEP 5
    champion = newest
    if champion is None:
        why = "first export" if not scan.versions else "no version to beat"
        return Decision(PUBLISH, why, accuracy=accuracy)
    best = champion.accuracy if champion.accuracy is not None else 1.0
    margin = f" by more than {rules.min_improvement:g}" if rules.min_improvement else ""
    if not accuracy > best + rules.min_improvement:
        why = (f"not better: accuracy {accuracy:.4f} ({candidate.precision}) does not beat the "
               f"published version {champion.number}'s {best:.4f} "
               f"({champion.metadata.get('precision')}){margin} (both {on_all})")  # fmt: skip
        return refusal or Decision(SKIP, why, champion.number, champion, accuracy)
    why = (f"accuracy {accuracy:.4f} ({candidate.precision}) beats version {champion.number}'s "
           f"{best:.4f} (both {on_all})")  # fmt: skip
    return Decision(PUBLISH, why, champion=champion, accuracy=accuracy)
