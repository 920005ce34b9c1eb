"""The benchmark targets as data: each threshold once, and the words a verdict is given in.

run.py judges the targets with these thresholds and report.py renders the verdicts with
these labels; the sentences around them are in template.md."""

from __future__ import annotations

# Training: the accuracy every seed must reach, the share of the 0.1.0 recipe's seconds it
# must take, the matmul-epochs it may take; the stretch target.
ACCURACY = 0.99
STRETCH_ACCURACY = 0.995
SECONDS_SHARE = 0.6
MATMUL_EPOCHS = 1.6
# Serving, perf_analyzer against in-process onnxruntime on the same threads.
C1_P50_GAP_MS = 0.5
C1_P99_RATIO = 3.0
C8_SHARE = 0.6

# The baseline the training figures compare with, named by its version and recipe.
BASELINE = "the 0.1.0 recipe"

STATUS = {True: "**met**", False: "**not met**"}
C8_MEETS = {True: "**yes**", False: "no"}
NOT_REACHED = "not reached"
NONE = "none"

# The row a run without --stretch gives the stretch target.
STRETCH_NOT_RUN = [
    "stretch: >= 99.5% test accuracy within 5 minutes of training",
    "not run (`--stretch` trains the default recipe for 3 epochs)",
    "not measured",
]

SUMMARY = {True: "met    ", False: "NOT MET"}
