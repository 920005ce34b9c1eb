"""canary.decide: every rule on its own and together, without servers."""

from __future__ import annotations

import pytest

from mnist_pipeline.canary import Measured, Thresholds, decide

LIMITS = Thresholds(max_p99_ratio=1.5, max_error_rate=0.01, max_accuracy_drop=0.005)
CHAMPION = Measured(1, requests=1000, failures=0, p99_ms=4.0, accuracy=0.95, images=2000)


def challenger(**changed: object) -> Measured:
    values = {"requests": 500, "failures": 0, "p99_ms": 5.0, "accuracy": 0.96, "images": 2000}
    return Measured(2, **{**values, **changed})  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "name,measured,reasons",
    [
        ("better and as fast", challenger(), []),
        ("at the latency limit", challenger(p99_ms=6.0), []),
        ("within the accuracy drop", challenger(accuracy=0.946), []),
        ("1% errors is the limit", challenger(failures=5), []),
        ("slower", challenger(p99_ms=6.1), ["p99 6.10 ms is 1.52x the champion's 4.00 ms"]),
        ("failing", challenger(failures=6), ["error rate 1.20% > 1.00%"]),
        ("less accurate", challenger(accuracy=0.944), ["accuracy 0.9440 < the champion's"]),
        ("no traffic", challenger(requests=0, p99_ms=None),
         ["answered no request", "no p99 latency to compare"]),
        ("not probed", challenger(accuracy=None, images=0), ["the probe measured no accuracy"]),
        ("slower and failing", challenger(p99_ms=9.0, failures=50),
         ["error rate 10.00%", "p99 9.00 ms is 2.25x"]),
    ],
)  # fmt: skip
def test_the_challenger_is_promoted_unless_a_measurement_says_not_to(
    name: str, measured: Measured, reasons: list[str]
) -> None:
    decision = decide(CHAMPION, measured, LIMITS)
    assert decision.promote == (not reasons), (name, decision)
    assert len(decision.reasons) == len(reasons), decision.reasons
    for expected, said in zip(reasons, decision.reasons, strict=True):
        assert expected in said
