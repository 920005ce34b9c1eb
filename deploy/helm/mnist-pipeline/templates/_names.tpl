{{/* Names of the release's objects and the addresses made from them. */}}

{{/* Chart name, at most 63 characters (a DNS label). */}}
{{- define "mnist-pipeline.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Resource name prefix: <release>-<chart>, or <release> alone when it already contains the
chart name. 48 characters at most, so "<prefix>-adapter-rules" and the other suffixes stay
within a name's 63; Job names cut it further (mnist-pipeline.jobName).
*/}}
{{- define "mnist-pipeline.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 48 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 48 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 48 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "mnist-pipeline.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "mnist-pipeline.claimName" -}}
{{- if .Values.persistence.existingClaim }}
{{- .Values.persistence.existingClaim }}
{{- else }}
{{- printf "%s-storage" (include "mnist-pipeline.fullname" .) }}
{{- end }}
{{- end }}

{{- define "mnist-pipeline.tritonName" -}}
{{- printf "%s-triton" (include "mnist-pipeline.fullname" .) }}
{{- end }}

{{/* A Triton Deployment: pass (dict "ctx" $ "track" "stable") or "canary". */}}
{{- define "mnist-pipeline.tritonDeploymentName" -}}
{{- include "mnist-pipeline.tritonName" .ctx }}{{ if eq .track "canary" }}-canary{{ end }}
{{- end }}

{{/* The headless Service of Triton's gRPC port: its name resolves to every ready pod. */}}
{{- define "mnist-pipeline.tritonGrpcName" -}}
{{- printf "%s-grpc" (include "mnist-pipeline.tritonName" .) }}
{{- end }}

{{/* The gRPC target of the client and helm test: every Triton pod of the headless
Service, fully qualified (no search-path lookups), on the pods' own port. The client
balances round-robin over them. */}}
{{- define "mnist-pipeline.tritonGrpcTarget" -}}
{{- printf "dns:///%s.%s.svc.%s:%d" (include "mnist-pipeline.tritonGrpcName" .) .Release.Namespace .Values.clusterDomain (int64 .Values.triton.ports.grpc) }}
{{- end }}

{{/* The Service's address as seen from a pod of the release: <svc>.<namespace>.svc. */}}
{{- define "mnist-pipeline.tritonHost" -}}
{{- printf "%s.%s.svc" (include "mnist-pipeline.tritonName" .) .Release.Namespace }}
{{- end }}

{{/*
Job name: <fullname>-<stage>-<hash of the Job's rendered spec>. A Job's pod template is
immutable, so a Job whose spec changes needs a new name, and one whose spec does not
change must keep its name (an upgrade then leaves it alone, and a Job re-created after its
TTL finds its run done). 44 + 8 + 7 characters stay within a label's 63, with room for
the "-<index>" of a multi-worker training pod's hostname.
Pass (dict "ctx" $ "stage" "train"); the stage's spec is the template
"mnist-pipeline.<stage>.spec".
*/}}
{{- define "mnist-pipeline.jobName" -}}
{{- $spec := include (printf "mnist-pipeline.%s.spec" .stage) .ctx }}
{{- printf "%s-%s-%s" (include "mnist-pipeline.fullname" .ctx | trunc 44 | trimSuffix "-") .stage ($spec | sha256sum | trunc 7) }}
{{- end }}

{{/* The headless Service of multi-worker training. */}}
{{- define "mnist-pipeline.workersService" -}}
{{- printf "%s-workers" (include "mnist-pipeline.fullname" .) }}
{{- end }}

{{/* The ServiceAccount of a component: pass (dict "ctx" $ "component" "export"). */}}
{{- define "mnist-pipeline.componentServiceAccountName" -}}
{{- $sa := (get .ctx.Values .component).serviceAccount }}
{{- if $sa.name }}
{{- $sa.name }}
{{- else if $sa.create }}
{{- printf "%s-%s" (include "mnist-pipeline.fullname" .ctx) .component }}
{{- else }}
{{- "default" }}
{{- end }}
{{- end }}
