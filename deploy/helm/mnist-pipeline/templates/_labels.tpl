{{/* Labels: every object's, and the stable ones pod templates carry. */}}

{{/* Labels every object carries. */}}
{{- define "mnist-pipeline.labels" -}}
helm.sh/chart: {{ include "mnist-pipeline.chart" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{ include "mnist-pipeline.stableLabels" . }}
{{- end }}

{{/* The labels that do not change with the chart's version: the only ones in pod
templates, whose hash names the Jobs (a chart bump must not rename, and so re-run or
kill, a Job) and whose change rolls Triton. */}}
{{- define "mnist-pipeline.stableLabels" -}}
{{ include "mnist-pipeline.selectorLabels" . }}
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
