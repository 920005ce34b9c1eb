{{/* The run: the install token, the run id made from it and the run's inputs, and the
settings as the CLI reads them. */}}

{{/*
Install token: made once per install, kept across upgrades, unless run.id pins it.

It is read back (lookup) from the run ConfigMap of the running release; a fresh install
finds none and makes a new one from the time and a random suffix. Why not derive it from
the values or the release name: a reinstall under the same name, onto the same kept
volume, must not meet the artifacts the earlier install left there; only something made
at install time tells the two apart. Where lookup cannot reach a cluster (helm template,
GitOps tools) every render would get a new token: run.id pins it instead, so renders are
reproducible byte for byte.

It is computed once per render and kept in .Values, because every include of a random
value would otherwise give a different one.
*/}}
{{- define "mnist-pipeline.installToken" -}}
{{- if not (hasKey .Values "__installToken") }}
{{- $token := .Values.run.id }}
{{- if not $token }}
{{- $existing := lookup "v1" "ConfigMap" .Release.Namespace (printf "%s-run" (include "mnist-pipeline.fullname" .)) }}
{{- if and $existing $existing.data }}
{{- $token = get $existing.data "installToken" }}
{{- end }}
{{- end }}
{{- if not $token }}
{{- $token = printf "%s-%s" (now | date "20060102-150405") (randAlphaNum 4 | lower) }}
{{- end }}
{{- $_ := set .Values "__installToken" $token }}
{{- end }}
{{- get .Values "__installToken" }}
{{- end }}

{{/*
What training and export consume: the run id changes when, and only when, one of these
does. Training: what the CLI's own run id is made of (train.default_run_id hashes
TrainConfig), as templates/_settings.tpl lists it from the same declaration, so the two
cannot disagree: a value the CLI's run id leaves out (checkpointEvery, workers, gpus,
timeouts) resumes or reuses the run, as the CLI does. Export: its settings and the model's
name; and the pipeline image (other code, another model). Serving settings (replicas,
probes, Service, client, Triton's CPU limit, instance count and GPUs) are not in it, so
changing them leaves the run, its Jobs and the model alone: Triton's pin-version
initContainer writes them into the config it serves.
*/}}
{{- define "mnist-pipeline.runInputs" -}}
{{- toJson (dict
  "training" (include "mnist-pipeline.settings.trainingRun" . | fromJson)
  "export" (dict "precision" (include "mnist-pipeline.settings.text" (dict "ctx" . "path" "export.precision")) "extraEnv" .Values.export.extraEnv)
  "model" .Values.model.name
  "pipelineImage" (include "mnist-pipeline.image" (dict "ctx" . "name" "pipeline"))) }}
{{- end }}

{{/* Run id: <install token or run.id>-<hash of the run's inputs>; at most 64 characters
(the project's run-id rule), so the token part is cut to 55. checkpoints/<run id>/ holds
what its stages write, and every wait looks only there. */}}
{{- define "mnist-pipeline.runId" -}}
{{- $token := include "mnist-pipeline.installToken" . | trunc 55 | trimSuffix "-" | trimSuffix "." }}
{{- printf "%s-%s" $token (include "mnist-pipeline.runInputs" . | sha256sum | trunc 8) }}
{{- end }}

{{/* training.epochs as the CLI reads it (the CLI's default when unset): a whole number
without a fraction or exponent (1000000, never 1e+06), a fraction as it is (0.8: the share
of one pass). */}}
{{- define "mnist-pipeline.epochs" -}}
{{- include "mnist-pipeline.settings.text" (dict "ctx" . "path" "training.epochs") }}
{{- end }}

{{/* torchrun's rendezvous port on worker 0 (the CLI's default when unset): the flag, the
container port and the workers' Service agree. */}}
{{- define "mnist-pipeline.masterPort" -}}
{{- include "mnist-pipeline.settings.text" (dict "ctx" . "path" "training.masterPort") }}
{{- end }}

{{/* triton.servedVersion as the pin and the client read it: "run" (this run's version;
in serve-only mode, having no run, the newest), "" (the newest), or a number (never in
scientific notation). */}}
{{- define "mnist-pipeline.servedVersion" -}}
{{- $v := .Values.triton.servedVersion }}
{{- if kindIs "string" $v }}{{ $v }}{{ else }}{{ int64 $v }}{{ end }}
{{- end }}

{{/* The version a client asks Triton for: triton.servedVersion, except that serve-only
mode has no run to resolve "run" against, and its pin serves the champion: "" asks for
that; in a canary release, "" too: each replica answers with the version it serves. */}}
{{- define "mnist-pipeline.requestedVersion" -}}
{{- $v := include "mnist-pipeline.servedVersion" . }}
{{- if or (include "mnist-pipeline.canary" . | eq "true") (and .Values.serveOnly (eq $v "run")) }}{{ else }}{{ $v }}{{ end }}
{{- end }}

{{/* "true" when new runs are released through a canary (never in serve-only mode: no run). */}}
{{- define "mnist-pipeline.canary" -}}
{{- and .Values.canary.enabled (not .Values.serveOnly) }}
{{- end }}

{{/* The --model-version a Triton Deployment pins: pass (dict "ctx" $ "track" "stable") or
"canary". In a canary release the stable pods serve the champion ("") and the canary pods
the challenger; else triton.servedVersion. */}}
{{- define "mnist-pipeline.pinnedVersion" -}}
{{- if ne (include "mnist-pipeline.canary" .ctx) "true" }}{{ include "mnist-pipeline.servedVersion" .ctx }}
{{- else if eq .track "canary" }}challenger
{{- end }}
{{- end }}
