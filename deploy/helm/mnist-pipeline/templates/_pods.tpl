{{/* Pod and container settings every workload shares. */}}

{{/* An image reference: pass (dict "ctx" $ "name" "pipeline"|"client"|"triton").
images.registry goes before a repository that names no registry host of its own. */}}
{{- define "mnist-pipeline.image" -}}
{{- $images := .ctx.Values.images }}
{{- $image := get $images .name }}
{{- $repository := $image.repository }}
{{- if and $images.registry (not (include "mnist-pipeline.namesRegistry" $repository)) }}
{{- $repository = printf "%s/%s" (trimSuffix "/" $images.registry) $repository }}
{{- end }}
{{- if $image.digest }}
{{- printf "%s@%s" $repository $image.digest }}
{{- else }}
{{- printf "%s:%s" $repository $image.tag }}
{{- end }}
{{- end }}

{{/* "true" when a repository's first component is a registry host, as container runtimes
tell it: it has a dot or a port, or is localhost. Anything else is pulled from Docker Hub. */}}
{{- define "mnist-pipeline.namesRegistry" -}}
{{- $first := regexFind "^[^/]+" . }}
{{- if and (contains "/" .) (or (contains "." $first) (contains ":" $first) (eq $first "localhost")) }}true{{ end }}
{{- end }}

{{/*
Pod-level settings: pass (dict "ctx" $ "values" <component values>), and "component"
"triton" for Triton's pods. Component nodeSelector entries win over the global ones,
tolerations add up, a component affinity replaces the global one. With a ReadWriteOnce
claim every pod of the release requires a node that runs another pod of the release: they
all land on one node, where the volume is attached (the first pod matches its own term, so
it schedules anywhere). With an object-storage repository Triton's pods mount no claim:
they take no such term and count for no other pod's, and spread (triton.spread).
*/}}
{{- define "mnist-pipeline.podSpecCommon" -}}
{{- $ctx := .ctx }}
{{- $c := .values }}
{{- /* No <SERVICE>_* variables: every Service of the namespace would otherwise land in
the environment, where the CLI reads its MNIST_PIPELINE_* settings (release mnist-pipeline's
Service mnist-pipeline-triton would set MNIST_PIPELINE_TRITON_PORT and the like). The API
server's KUBERNETES_SERVICE_HOST, which the waits use, is injected regardless. */}}
enableServiceLinks: false
{{- with $ctx.Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $c.priorityClassName }}
priorityClassName: {{ . | quote }}
{{- end }}
securityContext:
  {{- toYaml $ctx.Values.podSecurityContext | nindent 2 }}
{{- with merge (deepCopy (default (dict) $c.nodeSelector)) $ctx.Values.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with concat $ctx.Values.tolerations (default (list) $c.tolerations) }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- $affinity := deepCopy (default $ctx.Values.affinity $c.affinity) }}
{{- $objectRepository := include "mnist-pipeline.objectRepository" $ctx }}
{{- $tritonOffVolume := and $objectRepository (eq (toString .component) "triton") }}
{{- if and (include "mnist-pipeline.singleNode" $ctx) (not $tritonOffVolume) }}
{{- $selector := dict "matchLabels" (include "mnist-pipeline.selectorLabels" $ctx | fromYaml) }}
{{- if $objectRepository }}
{{- $_ := set $selector "matchExpressions" (list (dict "key" "app.kubernetes.io/component" "operator" "NotIn" "values" (list "triton"))) }}
{{- end }}
{{- $term := dict "labelSelector" $selector "topologyKey" "kubernetes.io/hostname" }}
{{- $podAffinity := default (dict) $affinity.podAffinity }}
{{- $required := default (list) $podAffinity.requiredDuringSchedulingIgnoredDuringExecution }}
{{- $_ := set $podAffinity "requiredDuringSchedulingIgnoredDuringExecution" (append $required $term) }}
{{- $_ := set $affinity "podAffinity" $podAffinity }}
{{- end }}
{{- with $affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- $spread := $c.topologySpreadConstraints }}
{{- $s := $ctx.Values.triton.spread }}
{{- if and $tritonOffVolume (not $spread) $s.enabled }}
{{- $selector := dict "matchLabels" (include "mnist-pipeline.componentSelectorLabels" (dict "ctx" $ctx "component" "triton") | fromYaml) }}
{{- /* pod-template-hash: a rollout's new pods spread among themselves, not against the
old ReplicaSet's, which is going away. */}}
{{- $spread = list (dict "maxSkew" (int $s.maxSkew) "topologyKey" $s.topologyKey "whenUnsatisfiable" $s.whenUnsatisfiable "labelSelector" $selector "matchLabelKeys" (list "pod-template-hash")) }}
{{- end }}
{{- with $spread }}
topologySpreadConstraints:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/* Pod labels and annotations: pass (dict "ctx" $ "values" <component values>
"component" <label>). */}}
{{- define "mnist-pipeline.podMetadata" -}}
labels:
  {{- include "mnist-pipeline.stableLabels" .ctx | nindent 2 }}
  app.kubernetes.io/component: {{ .component }}
  {{- with .values.podLabels }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
annotations:
  mnist-pipeline/run-id: {{ include "mnist-pipeline.runId" .ctx | quote }}
  {{- with .values.podAnnotations }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
{{- end }}

{{/* The component's ServiceAccount; no token is automounted: the projected volume
below goes to the wait container only. Pass (dict "ctx" $ "component" "export"). */}}
{{- define "mnist-pipeline.serviceAccount" -}}
serviceAccountName: {{ include "mnist-pipeline.componentServiceAccountName" . }}
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

{{/* A container's resources, with `gpus` NVIDIA GPUs added to its limits: pass (dict
"resources" <values> "gpus" <count>). */}}
{{- define "mnist-pipeline.resources" -}}
{{- $r := deepCopy .resources }}
{{- if gt (int .gpus) 0 }}
{{- $_ := set $r "limits" (merge (dict "nvidia.com/gpu" (int .gpus)) (default (dict) $r.limits)) }}
{{- end }}
{{- toYaml $r }}
{{- end }}

{{/* A resource quantity ("500m", "2", 1.5, "1Gi", "512Mi") as a plain number. */}}
{{- define "mnist-pipeline.quantity" -}}
{{- $q := toString . }}
{{- $units := dict "m" 0.001 "k" 1e3 "M" 1e6 "G" 1e9 "T" 1e12 "Ki" 1024.0 "Mi" 1048576.0 "Gi" 1073741824.0 "Ti" 1099511627776.0 }}
{{- $unit := regexFind "[A-Za-z]+$" $q }}
{{- $number := trimSuffix $unit $q | float64 }}
{{- if $unit }}{{ mulf $number (get $units $unit) }}{{ else }}{{ $number }}{{ end }}
{{- end }}

{{/* CPUs Triton gets: its CPU limit (else request) rounded down, at least 1. The pin
gives ONNX Runtime its thread counts from it (--server-cpus). */}}
{{- define "mnist-pipeline.serverCpus" -}}
{{- $r := .Values.triton.resources }}
{{- $cpu := toString (or (dig "limits" "cpu" "" $r) (dig "requests" "cpu" "1" $r)) }}
{{- $n := 1 }}
{{- if hasSuffix "m" $cpu }}
{{- $n = div (trimSuffix "m" $cpu | int) 1000 }}
{{- else }}
{{- $n = $cpu | float64 | floor | int }}
{{- end }}
{{- max 1 $n }}
{{- end }}

{{- define "mnist-pipeline.instanceKind" -}}
{{- if gt (int .Values.triton.gpus) 0 }}gpu{{ else }}cpu{{ end }}
{{- end }}
