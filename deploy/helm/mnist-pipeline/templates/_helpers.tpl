{{/* Chart name, at most 63 characters (a DNS label). */}}
{{- define "mnist-pipeline.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Resource name prefix: <release>-<chart>, or <release> alone when it already contains the
chart name. 48 characters at most, so "<prefix>-client-r<revision>" stays a valid Job name
(63 characters) up to revision 99999.
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

{{/* Labels every object carries. */}}
{{- define "mnist-pipeline.labels" -}}
helm.sh/chart: {{ include "mnist-pipeline.chart" . }}
{{ include "mnist-pipeline.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: mnist-pipeline
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "mnist-pipeline.selectorLabels" -}}
app.kubernetes.io/name: {{ include "mnist-pipeline.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* Labels of one component: pass (dict "ctx" $ "component" "triton"). */}}
{{- define "mnist-pipeline.componentLabels" -}}
{{ include "mnist-pipeline.labels" .ctx }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "mnist-pipeline.componentSelectorLabels" -}}
{{ include "mnist-pipeline.selectorLabels" .ctx }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "mnist-pipeline.claimName" -}}
{{- if .Values.persistence.existingClaim }}
{{- .Values.persistence.existingClaim }}
{{- else }}
{{- printf "%s-storage" (include "mnist-pipeline.fullname" .) }}
{{- end }}
{{- end }}

{{- define "mnist-pipeline.serviceAccountName" -}}
{{- printf "%s-waits" (include "mnist-pipeline.fullname" .) }}
{{- end }}

{{- define "mnist-pipeline.tritonName" -}}
{{- printf "%s-triton" (include "mnist-pipeline.fullname" .) }}
{{- end }}

{{/* The Service's address as seen from a pod of the release: <svc>.<namespace>.svc. */}}
{{- define "mnist-pipeline.tritonHost" -}}
{{- printf "%s.%s.svc" (include "mnist-pipeline.tritonName" .) .Release.Namespace }}
{{- end }}

{{/* Job names carry the revision: a Job's pod template is immutable, so each upgrade
creates new Jobs (and Helm deletes the previous revision's). */}}
{{- define "mnist-pipeline.jobName" -}}
{{- printf "%s-%s-r%d" (include "mnist-pipeline.fullname" .ctx) .stage (int .ctx.Release.Revision) }}
{{- end }}

{{/*
Install token: made once per install, kept across upgrades.

It is read back (lookup) from the run ConfigMap of the running release; a fresh install
finds none and makes a new one from the time and a random suffix. Why not derive it from
the values or the release name: a reinstall under the same name, onto the same kept
volume, restarts revisions at 1, and its run ids must not meet the artifacts the earlier
install left there; only something made at install time tells the two apart. Where lookup
cannot reach a cluster (helm template, --dry-run=client) every render gets a new token,
which changes nothing but the names of the folders that run would write.

It is computed once per render and kept in .Values, because every include of a random
value would otherwise give a different one.
*/}}
{{- define "mnist-pipeline.installToken" -}}
{{- if not (hasKey .Values "__installToken") }}
{{- $existing := lookup "v1" "ConfigMap" .Release.Namespace (printf "%s-run" (include "mnist-pipeline.fullname" .)) }}
{{- $token := "" }}
{{- if and $existing $existing.data }}
{{- $token = get $existing.data "installToken" }}
{{- end }}
{{- if not $token }}
{{- $token = printf "%s-%s" (now | date "20060102-150405") (randAlphaNum 4 | lower) }}
{{- end }}
{{- $_ := set .Values "__installToken" $token }}
{{- end }}
{{- get .Values "__installToken" }}
{{- end }}

{{/* Run id of this release revision: checkpoints/<run id>/ holds what its stages write,
and every wait of this revision looks only there. */}}
{{- define "mnist-pipeline.runId" -}}
{{- printf "%s-r%d" (include "mnist-pipeline.installToken" .) (int .Release.Revision) }}
{{- end }}

{{- define "mnist-pipeline.image" -}}
{{- if .digest }}
{{- printf "%s@%s" .repository .digest }}
{{- else }}
{{- printf "%s:%s" .repository .tag }}
{{- end }}
{{- end }}

{{/* Pod-level settings every pod shares. */}}
{{- define "mnist-pipeline.podSpecCommon" -}}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
securityContext:
  {{- toYaml .Values.podSecurityContext | nindent 2 }}
{{- with .Values.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/* Pods whose waits read the Kubernetes API run under the chart's ServiceAccount, but
no token is automounted: the projected volume below goes to the wait container only. */}}
{{- define "mnist-pipeline.serviceAccount" -}}
{{- if .Values.waits.kubernetesApi }}
serviceAccountName: {{ include "mnist-pipeline.serviceAccountName" . }}
{{- end }}
automountServiceAccountToken: false
{{- end }}

{{- define "mnist-pipeline.apiTokenVolume" -}}
- name: api-token
  projected:
    sources:
      - serviceAccountToken:
          path: token
          expirationSeconds: 3600
      - configMap:
          name: kube-root-ca.crt
          items:
            - key: ca.crt
              path: ca.crt
      - downwardAPI:
          items:
            - path: namespace
              fieldRef:
                fieldPath: metadata.namespace
{{- end }}

{{- define "mnist-pipeline.storageVolumes" -}}
- name: storage
  persistentVolumeClaim:
    claimName: {{ include "mnist-pipeline.claimName" . }}
- name: tmp
  emptyDir:
    sizeLimit: 1Gi
{{- end }}

{{/* A wait initContainer: pass (dict "ctx" $ "image" $.Values.images.pipeline "target"
"training" "job" <job name> "args" <extra args>). */}}
{{- define "mnist-pipeline.waitContainer" -}}
{{- $ctx := .ctx }}
- name: wait-for-{{ .target }}
  image: {{ include "mnist-pipeline.image" .image | quote }}
  imagePullPolicy: {{ .image.pullPolicy }}
  command: ["mnist-pipeline"]
  args:
    - wait
    - {{ .target }}
    - --storage=/storage
    - --run-id={{ include "mnist-pipeline.runId" $ctx }}
    - --job={{ .job }}
    - --timeout={{ $ctx.Values.waits.timeoutSeconds }}
    - --interval={{ $ctx.Values.waits.intervalSeconds }}
    {{- range .args }}
    - {{ . | quote }}
    {{- end }}
  securityContext:
    {{- toYaml $ctx.Values.containerSecurityContext | nindent 4 }}
  resources:
    {{- toYaml $ctx.Values.waits.resources | nindent 4 }}
  volumeMounts:
    - name: storage
      mountPath: /storage
      readOnly: true
    - name: tmp
      mountPath: /tmp
    {{- if $ctx.Values.waits.kubernetesApi }}
    - name: api-token
      mountPath: /var/run/secrets/kubernetes.io/serviceaccount
      readOnly: true
    {{- end }}
{{- end }}
