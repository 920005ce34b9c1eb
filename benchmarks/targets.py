"""The benchmark targets as data: each declared once (TARGETS: what is measured, the
threshold, which side of it meets it), judged in one place (judge), on the figures a run's
results give it (judged). run.py records the verdicts in results.json; report.py renders them."""

from __future__ import annotations

import dataclasses
from typing import Any

from figures import B16, P50, Results, best_inprocess, c1_gap, c8_share, level


@dataclasses.dataclass(frozen=True)
class Target:
    what: str
    limit: float
    at_least: bool  # met at or above the limit, else at or below it
    fmt: str

    def text(self, figure: float | None) -> str:
        return "not reached" if figure is None else self.fmt.format(figure)

    def threshold(self) -> str:
        return ("≥ " if self.at_least else "≤ ") + self.text(self.limit)


TARGETS = {
    "accuracy": Target("lowest final test accuracy of its seeds", 0.99, True, "{:.2%}"),
    "seconds": Target("slowest seed's training s ÷ the 0.1.0 recipe's", 0.6, False, "{:.2f}×"),
    "matmul_epochs": Target("most matmul-epochs of its seeds", 1.6, False, "{:.2f}"),
    "stretch": Target("training s to the first eval ≥ 99.5%", 300, False, "{:.0f} s"),
    "c1_p50": Target("concurrency-1 p50 − in-process batch-1 p50", 0.5, False, "{:+.2f} ms"),
    "c1_p99": Target("concurrency-1 p99 ÷ its p50", 3.0, False, "{:.1f}×"),
    "c8": Target("concurrency-8 images/s ÷ in-process batch 16", 0.6, True, "{:.0%}"),
}


def judge(key: str, figure: float | None) -> bool:
    """Whether `figure` meets TARGETS[key]: the one place a target is judged."""
    t = TARGETS[key]
    return figure is not None and (figure >= t.limit if t.at_least else figure <= t.limit)


@dataclasses.dataclass(frozen=True)
class Judged:
    who: str
    key: str
    figure: float | None  # None: not reached
    source: str  # the measurements the figure comes from
    comparable: bool = True  # training on a subset meets no target
    ran: bool = True

    @property
    def target(self) -> Target:
        return TARGETS[self.key]

    @property
    def name(self) -> str:
        return f"{self.who}: {self.target.what}"

    @property
    def met(self) -> bool:
        return self.comparable and judge(self.key, self.figure)

    def row(self) -> dict[str, str]:
        """As the targets table gives it."""
        status = ("**met**" if self.met else "**not met**") if self.ran else "not measured"
        return {
            "name": self.name,
            "threshold": self.target.threshold(),
            "measured": self.target.text(self.figure) if self.ran else "—",
            "ratio": "—" if self.figure is None else f"{self.figure / self.target.limit:.2f}",
            "status": status + ("" if self.comparable else " (subset)"),
            "source": self.source,
        }


def judged(results: Results) -> list[Judged]:
    """Every target with the figure it is judged on, in the document's order."""
    training = results["training"]
    return (training_targets(training) if training else []) + serving_targets(results["serving"])


def training_targets(training: Results) -> list[Judged]:
    """The default recipe and the shorter schedule tried beside it, on every seed, against
    the 0.1.0 recipe of the same run; then the stretch target."""
    runs = {r["name"]: r for r in training["runs"]}
    previous, full, out = runs["previous-default"], training["full_dataset"], []
    for recipe in ("default", "short"):
        seeds = [r for name, r in runs.items() if name.startswith(f"{recipe}-seed")]
        who = "default recipe" if recipe == "default" else f"{seeds[0]['config']['epochs']:g} epoch"
        accuracies = " / ".join(f"{r['test_accuracy']:.2%}" for r in seeds)
        seconds = " / ".join(f"{r['train_seconds']:.0f}" for r in seeds)
        slowest = max(r["train_seconds"] for r in seeds) / previous["train_seconds"]
        matmul = max(r["matmul_epochs"] for r in seeds)
        out += [
            Judged(who, "accuracy", min(r["test_accuracy"] for r in seeds), accuracies, full),
            Judged(
                who, "seconds", slowest, f"{seconds} s vs {previous['train_seconds']:.0f} s", full
            ),
            Judged(who, "matmul_epochs", matmul, f"0.1.0: {previous['matmul_epochs']:.2f}", full),
        ]
    who = "stretch: default recipe, 3 epochs"
    if stretch := runs.get("default-3-epochs"):
        reached, final = stretch["time_to_accuracy_s"]["0.995"], stretch["test_accuracy"]
        return [*out, Judged(who, "stretch", reached, f"final {final:.2%}", full)]
    return [*out, Judged(who, "stretch", None, "not run (`--stretch`)", ran=False)]


def serving_targets(serving: Results) -> list[Judged]:
    """perf_analyzer's, then the pipeline's client's: each served figure against in-process
    onnxruntime on the same threads, measured beside it and at its best in the run. Judged
    on the worse of the two: a reference the load dragged down beside a figure meets none."""
    on = serving["servers"]["batching_on"]
    best_p50, best_b16 = best_inprocess(serving)
    perf = {p["concurrency"]: p for p in on["perf_analyzer"]}
    out = []
    for who, c1, c8 in (
        ("perf_analyzer", perf[1], perf[8]),
        ("the pipeline's client", on["sequential"], level(on["concurrency"], 8)),
    ):
        gap, share = c1["p50_ms"] - c1[P50], c8["images_per_s"] / c8[B16]
        out.append(
            Judged(
                who,
                "c1_p50",
                c1_gap(c1, best_p50),
                f"{c1['p50_ms']:.2f} ms vs {c1[P50]:.2f} beside it ({gap:+.2f}), "
                f"{best_p50:.2f} at best ({c1['p50_ms'] - best_p50:+.2f})",
            )
        )
        if who == "perf_analyzer":
            source = f"p99 {c1['p99_ms']:.2f} ms, p50 {c1['p50_ms']:.2f} ms"
            out.append(Judged(who, "c1_p99", c1["p99_ms"] / c1["p50_ms"], source))
        out.append(
            Judged(
                who,
                "c8",
                c8_share(c8, best_b16),
                f"{c8['images_per_s']:.0f} vs {c8[B16]:.0f} images/s beside it ({share:.0%}), "
                f"{best_b16:.0f} at best ({c8['images_per_s'] / best_b16:.0%})",
            )
        )
    return out


def records(results: Results) -> list[dict[str, Any]]:
    """The targets as results.json keeps them, for readers other than the document."""
    return [
        {
            "target": t.name,
            "figure": t.figure,
            "threshold": t.target.limit,
            "measured": t.source,
            "met": t.met,
        }
        for t in judged(results)
        if t.ran
    ]


def summary(results: Results) -> str:
    return "\n".join(
        f"{'met    ' if t.met else 'NOT MET'}  {t.name}: {t.target.text(t.figure)} ({t.source})"
        for t in judged(results)
        if t.ran
    )
