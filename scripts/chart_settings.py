#!/usr/bin/env python3
"""Write the chart's templates/_settings.tpl from the CLI's settings (settings.py).

Every chart value that reaches `mnist-pipeline` in a pod, as a MNIST_PIPELINE_ variable or
a --flag, is listed once below (VALUES) with the Setting it feeds. The template this
writes holds, for each, its declaration (flag, variable, type, range or choices or name
pattern, the CLI's default) and a named check whose messages are the CLI's own words,
taken from the CLI's click types and parsers themselves; templates/_validate.tpl collects
them, so `helm install` refuses at once what the pods would refuse after they started.
It also writes which training values make the CLI's run id (the settings of
train.TrainConfig, which train.default_run_id hashes): the chart's run id hashes those, so
the two cannot disagree.

    python scripts/chart_settings.py          rewrite templates/_settings.tpl
    python scripts/chart_settings.py --check  exit 1 when it is stale

tests/chart/test_chart_settings.py runs the check.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from generated import chart_arguments, write_or_check
from mnist_pipeline import settings as s
from mnist_pipeline.cli import click_type
from mnist_pipeline.errors import UsageError
from mnist_pipeline.settings import NameRule, Setting, settings_of
from mnist_pipeline.train import TrainConfig

TARGET = Path("templates") / "_settings.tpl"
PREFIX = "mnist-pipeline.settings"
SENTINEL = "@@VALUE@@"  # stands for the value in a probed message: never valid anywhere
# What the chart accepts as a number given as a string ("3", "0.05", "1e-3"): Python's
# float() and int() read these the same.
FLOAT_TEXT = r"^[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?$"
INT_TEXT = r"^[+-]?[0-9]+$"


@dataclass(frozen=True)
class ChartValue:
    """A chart value and the setting it feeds in the pods."""

    path: str  # training.epochs
    setting: Setting
    # env: the container gets its MNIST_PIPELINE_ variable, only when the value is set;
    # flag: the chart passes the flag itself (always, or what it derives from the value).
    passed: str
    optional: bool = False  # null: the CLI's default (the chart passes nothing)
    empty_is_unset: bool = False  # "" is unset too (run.id)


VALUES = (
    # The run: run.id prefixes every stage's --run-id; the model's name.
    ChartValue("run.id", s.RUN_ID, "flag", optional=True, empty_is_unset=True),
    ChartValue("model.name", s.MODEL_NAME, "flag"),
    # train
    ChartValue("training.epochs", s.EPOCHS, "env", optional=True),
    ChartValue("training.batchSize", s.BATCH_SIZE, "env", optional=True),
    ChartValue("training.lr", s.LR, "env", optional=True),
    ChartValue("training.checkpointEvery", s.CHECKPOINT_EVERY, "env", optional=True),
    ChartValue("training.syncBatchNorm", s.SYNC_BN, "env", optional=True),
    ChartValue("training.gradientCompression", s.GRADIENT_COMPRESSION, "env", optional=True),
    ChartValue("training.workers", s.NNODES, "flag"),
    ChartValue("training.masterPort", s.MASTER_PORT, "flag", optional=True),
    ChartValue("training.maxRestarts", s.MAX_RESTARTS, "env", optional=True),
    ChartValue("training.rendezvousTimeoutSeconds", s.RENDEZVOUS_TIMEOUT, "env", optional=True),
    ChartValue("training.collectiveTimeoutSeconds", s.COLLECTIVE_TIMEOUT, "env", optional=True),
    # export
    ChartValue("export.precision", s.PRECISION, "env", optional=True),
    # Triton's pin-version initContainer
    ChartValue("images.triton.backend", s.TRITON_BACKEND, "flag"),
    ChartValue("triton.instanceCount", s.INSTANCE_COUNT, "flag"),
    # the client and its prune initContainer
    ChartValue("client.requests", s.REQUESTS, "flag"),
    ChartValue("client.concurrency", s.CONCURRENCY, "flag"),
    ChartValue("retention.runs", s.KEEP_RUNS, "flag"),
    ChartValue("retention.versions", s.KEEP_VERSIONS, "flag"),
    ChartValue("retention.inference", s.KEEP_INFERENCE, "flag"),
    ChartValue("retention.abandonedAfterSeconds", s.ABANDONED_AFTER, "flag"),
    # the canary analysis
    ChartValue("canary.windowSeconds", s.CANARY_WINDOW, "flag"),
    ChartValue("canary.requests", s.CANARY_REQUESTS, "flag"),
    ChartValue("canary.probeRequests", s.PROBE_REQUESTS, "flag"),
    ChartValue("canary.maxErrorRate", s.MAX_ERROR_RATE, "flag"),
    ChartValue("canary.maxP99Ratio", s.MAX_P99_RATIO, "flag"),
    ChartValue("canary.maxAccuracyDrop", s.MAX_ACCURACY_DROP, "flag"),
    ChartValue("canary.override", s.OVERRIDE, "flag", optional=True, empty_is_unset=True),
    # every wait
    ChartValue("waits.timeoutSeconds", s.WAIT_TIMEOUT, "flag"),
    ChartValue("waits.intervalSeconds", s.WAIT_INTERVAL, "flag"),
    ChartValue("waits.visibilitySeconds", s.VISIBILITY_GRACE, "flag"),
    # helm test
    ChartValue("tests.requests", s.REQUESTS, "flag"),
    ChartValue("tests.minAccuracy", s.MIN_ACCURACY, "flag"),
    ChartValue("tests.waitTimeoutSeconds", s.WAIT_TIMEOUT, "flag"),
)


def run_settings() -> list[Setting]:
    """What the CLI's run id is made of: train.default_run_id hashes TrainConfig."""
    return [spec for _, spec in settings_of(TrainConfig)]


def cli_message(spec: Setting, value: str) -> str:
    """What the CLI says of `value` given to `spec` (as its variable gives it, a string),
    with SENTINEL where that message shows the value; without click's final period."""
    try:
        if spec.python_type is bool:  # a flag: click reads its variable as a boolean
            click.BOOL.convert(value, None, None)
        else:
            spec.check(click_type(spec).convert(value, None, None))
    except click.BadParameter as e:
        message = e.message
    except UsageError as e:
        message = str(e)
    else:
        raise ValueError(f"{spec.flag} accepts {value!r}: not a probe of a refusal")
    return message.removesuffix(".").split(". Recognized values:")[0]


def probed(spec: Setting, value: str, shown: str) -> str:
    """cli_message with `shown` (how the message shows `value`) made a {value} placeholder."""
    message = cli_message(spec, value)
    if shown not in message:
        raise ValueError(f"{spec.flag}: {message!r} does not show {shown!r}")
    return message.replace(shown, "{value}")


def text(value: Any) -> str:
    """A default as the chart passes a value: a whole number without a fraction."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return "" if value is None else str(value)


def declaration(value: ChartValue) -> dict[str, Any]:
    spec = value.setting
    kind = spec.python_type
    decl: dict[str, Any] = {
        "setting": spec.name,
        "flag": spec.flag,
        "env": spec.envvar,
        "passed": value.passed,
        "required": not value.optional,
        "emptyIsUnset": value.empty_is_unset,
        "default": text(spec.default),
        "runDefining": spec in run_settings(),
    }
    messages: dict[str, str] = {
        "required": "not set, but the chart passes it on every pod's command line: give a value"
    }
    if kind is bool:
        decl["kind"] = "bool"
        messages["type"] = probed(spec, SENTINEL, SENTINEL) + " (true or false)"
    elif spec.choices is not None:
        decl.update(kind="choice", choices=list(spec.choices))
        messages["choice"] = probed(spec, SENTINEL, SENTINEL)
    elif isinstance(spec.parse, NameRule):
        decl.update(kind="name", pattern=spec.parse.pattern)
        messages["name"] = probed(spec, SENTINEL, SENTINEL)
    elif spec.parse is None and kind in (int, float):
        if spec.min is None and spec.max is None:
            raise ValueError(f"{value.path}: {spec.flag} has no range; nothing to check")
        integer = kind is int
        decl.update(kind="number", integer=integer)
        decl["numberPattern"] = INT_TEXT if integer else FLOAT_TEXT
        for bound in ("min", "max"):
            if getattr(spec, bound) is not None:
                decl[bound] = float(getattr(spec, bound))
                decl[f"{bound}Open"] = getattr(spec, f"{bound}_open")
        messages["type"] = probed(spec, SENTINEL, SENTINEL)
        messages["finite"] = messages["type"] if integer else probed(spec, "inf", "inf")
        # Far outside: below the minimum, or above the maximum where there is none.
        far = -987654321 if spec.min is not None else 987654321
        messages["range"] = probed(spec, str(far), str(int(far) if integer else float(far)))
    else:
        raise ValueError(f"{value.path}: the chart cannot check {spec.flag} ({kind.__name__})")
    decl["messages"] = messages
    return decl


def go_raw(text: str) -> str:
    """A Go template raw string literal."""
    if "`" in text:
        raise ValueError(f"a backquote in {text!r}")
    return f"`{text}`"


def go_list(items: list[str]) -> str:
    return "(list " + " ".join(json.dumps(i) for i in items) + ")"


HEADER = """{{/*
GENERATED by scripts/chart_settings.py from src/mnist_pipeline/settings.py: do not edit.
Run `python scripts/chart_settings.py` after changing a setting or the script's VALUES
(tests/chart/test_chart_settings.py fails while this file is stale).

Every chart value that reaches `mnist-pipeline` in a pod, checked as the CLI checks it: its
type, range, choices or name rule, with the CLI's own words, so that `helm install` refuses
what the pods would otherwise refuse (exit 2) after they started. A value passed as its
variable is set only when given (null: the CLI's default, the only default there is).
*/}}
"""

HELPERS = r"""
{{/* Every check's message, a YAML list; templates/_validate.tpl adds them to its own. */}}
{{- define "PREFIX.checks" -}}
{{- $errors := list }}
{{- range $path := @PATHS@ }}
{{- with include (printf "PREFIX.check.%s" $path) $ }}
{{- $errors = append $errors . }}
{{- end }}
{{- end }}
{{- toYaml $errors }}
{{- end }}

{{/* The value at a dotted path of the values, as JSON {"v": value}, null where it is
not given (Helm drops a key whose value is null): pass (dict "ctx" $ "path" <path>). */}}
{{- define "PREFIX.lookup" -}}
{{- $v := .ctx.Values }}
{{- $found := true }}
{{- range splitList "." .path }}
{{- if and $found (kindIs "map" $v) (hasKey $v .) }}
{{- $v = get $v . }}
{{- else }}
{{- $found = false }}
{{- end }}
{{- end }}
{{- if $found }}{{ toJson (dict "v" $v) }}{{ else }}{"v": null}{{ end }}
{{- end }}

{{/* "true" when a value is not given: null, or "" where that means unset (run.id). Pass
(dict "value" <value> "decl" <declaration>). */}}
{{- define "PREFIX.unset" -}}
{{- if kindIs "invalid" .value }}true
{{- else if and .decl.emptyIsUnset (eq (toString .value) "") }}true
{{- end }}
{{- end }}

{{/* A checked value as the CLI reads it: whole numbers without a fraction or an exponent
(1000000, never 1e+06), anything else as it is. */}}
{{- define "PREFIX.format" -}}
{{- $integers := list "int" "int8" "int16" "int32" "int64" "uint" "uint8" "uint16" "uint32" }}
{{- if or (kindIs "string" .) (kindIs "bool" .) }}{{ . }}
{{- else if has (kindOf .) (append $integers "uint64") }}{{ printf "%d" . }}
{{- else if eq (float64 .) (floor .) }}{{ printf "%.0f" (float64 .) }}
{{- else }}{{ . }}
{{- end }}
{{- end }}

{{/* A value as the CLI gets it, or the CLI's default when it is not given ("" where the
CLI has none): pass (dict "ctx" $ "path" "training.epochs"). */}}
{{- define "PREFIX.text" -}}
{{- $decl := include (printf "PREFIX.declaration.%s" .path) .ctx | fromJson }}
{{- $v := get (include "PREFIX.lookup" . | fromJson) "v" }}
{{- if include "PREFIX.unset" (dict "value" $v "decl" $decl) }}{{ $decl.default }}
{{- else }}{{ include "PREFIX.format" $v }}
{{- end }}
{{- end }}

{{/* The container's MNIST_PIPELINE_ variable of a value, only when the value is given:
otherwise nothing, and the CLI's default applies. Pass (dict "ctx" $ "path" <path>). */}}
{{- define "PREFIX.env" -}}
{{- $decl := include (printf "PREFIX.declaration.%s" .path) .ctx | fromJson }}
{{- $v := get (include "PREFIX.lookup" . | fromJson) "v" }}
{{- if not (include "PREFIX.unset" (dict "value" $v "decl" $decl)) }}
{{- printf "- name: %s\n  value: %s" $decl.env (include "PREFIX.format" $v | quote) }}
{{- end }}
{{- end }}

{{/* The variables the chart sets from its values, per component, as JSON {component:
{variable: value path}}: an extraEnv entry may not set one of them. */}}
{{- define "PREFIX.variables" -}}
{{- `@VARIABLES@` }}
{{- end }}

{{/*
What makes a new run, as the CLI defines it: train.default_run_id hashes the settings of
train.TrainConfig (@RUN_SETTINGS@), not how a run is carried out (checkpoint interval,
device, processes, timeouts: those resume the same run). As JSON: each chart value among
them (the CLI's default when not given), and the training.extraEnv entries that set one
of TrainConfig's other variables. templates/_run.tpl hashes this into the run id.
*/}}
{{- define "PREFIX.trainingRun" -}}
{{- $run := dict }}
{{- range $path := @RUN_PATHS@ }}
{{- $_ := set $run $path (include "PREFIX.text" (dict "ctx" $ "path" $path)) }}
{{- end }}
{{- $extra := list }}
{{- range $.Values.training.extraEnv }}
{{- if has .name @RUN_VARIABLES@ }}
{{- $extra = append $extra . }}
{{- end }}
{{- end }}
{{- $_ := set $run "training.extraEnv" $extra }}
{{- toJson $run }}
{{- end }}

{{/* One value against its declaration, the CLI's message when it fails ("" when it
passes): pass (dict "path" <path> "value" <value> "decl" <declaration>). */}}
{{- define "PREFIX.refusal" -}}
{{- $d := .decl }}
{{- $v := .value }}
{{- $numbers := list "int" "int8" "int16" "int32" "int64" "float32" "float64" }}
{{- $numbers = concat $numbers (list "uint" "uint8" "uint16" "uint32" "uint64") }}
{{- $isNumber := has (kindOf $v) $numbers }}
{{- $message := "" }}
{{- if include "PREFIX.unset" (dict "value" $v "decl" $d) }}
{{- if $d.required }}{{ $message = $d.messages.required }}{{ end }}
{{- else if eq $d.kind "bool" }}
{{- if not (kindIs "bool" $v) }}{{ $message = $d.messages.type }}{{ end }}
{{- else if eq $d.kind "choice" }}
{{- if not (and (kindIs "string" $v) (has $v $d.choices)) }}
{{- $message = $d.messages.choice }}
{{- end }}
{{- else if eq $d.kind "name" }}
{{- if not (and (kindIs "string" $v) (regexMatch $d.pattern $v)) }}
{{- $message = $d.messages.name }}
{{- end }}
{{- else if not (or $isNumber (and (kindIs "string" $v) (regexMatch $d.numberPattern $v))) }}
{{- $message = $d.messages.type }}
{{- else }}
{{- $n := float64 $v }}
{{- $low := and (hasKey $d "min") (ternary (le $n $d.min) (lt $n $d.min) $d.minOpen) }}
{{- $high := and (hasKey $d "max") (ternary (ge $n $d.max) (gt $n $d.max) $d.maxOpen) }}
{{- if or (ne $n $n) (hasSuffix "Inf" (toString $n)) }}
{{- $message = $d.messages.finite }}
{{- else if and $d.integer (ne $n (floor $n)) }}
{{- $message = $d.messages.type }}
{{- else if or $low $high }}
{{- $message = $d.messages.range }}
{{- end }}
{{- end }}
{{- $shown := toString $v }}
{{- if $isNumber }}{{ $shown = include "PREFIX.format" $v }}{{ end }}
{{- with $message }}
{{- printf "%s (%s, %s): %s" $.path $d.flag $d.env (replace "{value}" $shown .) }}
{{- end }}
{{- end }}
"""

PER_VALUE = """
{{/* VALUE_PATH: DESCRIPTION */}}
{{- define "PREFIX.declaration.VALUE_PATH" -}}
{{- DECLARATION }}
{{- end }}
{{- define "PREFIX.check.VALUE_PATH" -}}
{{- $value := get (include "PREFIX.lookup" (dict "ctx" . "path" "VALUE_PATH") | fromJson) "v" }}
{{- $decl := include "PREFIX.declaration.VALUE_PATH" . | fromJson }}
{{- include "PREFIX.refusal" (dict "path" "VALUE_PATH" "value" $value "decl" $decl) }}
{{- end }}
"""


def describe(value: ChartValue, decl: dict[str, Any]) -> str:
    how = "its variable, when set" if value.passed == "env" else "the chart's command line"
    spec = value.setting
    if decl["kind"] == "number":
        what = f"{'an integer' if decl['integer'] else 'a number'}"
        what += ", " + decl["messages"]["range"].split(" is not in the range ")[-1]
    elif decl["kind"] == "choice":
        what = "one of " + ", ".join(decl["choices"])
    elif decl["kind"] == "name":
        what = f"a {spec.parse.what}" if isinstance(spec.parse, NameRule) else "a name"
    else:
        what = "true or false"
    default = f"; default: the CLI's, {decl['default']}" if decl["default"] else ""
    default = default if value.optional else ""
    return f"{spec.flag} ({how}): {what}{default}"


def template() -> str:
    variables: dict[str, dict[str, str]] = {}
    out = [HEADER]
    helpers = HELPERS.replace("PREFIX", PREFIX)  # before any text from settings.py goes in
    run_paths = [v.path for v in VALUES if v.setting in run_settings()]
    replacements = {
        "@PATHS@": go_list([v.path for v in VALUES]),
        "@RUN_PATHS@": go_list(run_paths),
        "@RUN_VARIABLES@": go_list([spec.envvar for spec in run_settings()]),
        "@RUN_SETTINGS@": ", ".join(spec.name for spec in run_settings()),
    }
    for value in VALUES:
        decl = declaration(value)
        if value.passed == "env":
            component = value.path.split(".")[0]
            variables.setdefault(component, {})[decl["env"]] = value.path
        block = PER_VALUE.replace("PREFIX", PREFIX)
        for key, replacement in (
            ("VALUE_PATH", value.path),
            ("DESCRIPTION", describe(value, decl)),
            ("DECLARATION", go_raw(json.dumps(decl, sort_keys=True))),
        ):
            block = block.replace(key, replacement)
        out.append(block)
    replacements["@VARIABLES@"] = json.dumps(variables, sort_keys=True)
    for key, replacement in replacements.items():
        helpers = helpers.replace(key, replacement)
    out.insert(1, helpers)
    return "".join(out)


def main(argv: list[str] | None = None) -> int:
    args = chart_arguments(__doc__, argv)
    return write_or_check(args.chart / TARGET, template(), args.check, "chart_settings.py")


if __name__ == "__main__":
    sys.exit(main())
