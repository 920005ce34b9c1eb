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
does. Serving settings (replicas, probes, Service, client, Triton's CPU limit, instance
count and GPUs) are not in it, so changing them leaves the run, its Jobs and the model
alone: Triton's pin-version initContainer writes them into the config it serves.
*/}}
{{- define "mnist-pipeline.runInputs" -}}
{{- $t := .Values.training }}
{{- toJson (dict
  "training" (pick $t "epochs" "batchSize" "lr" "checkpointEvery" "extraEnv" "workers" "gpus" "syncBatchNorm")
  "export" (pick .Values.export "precision" "extraEnv")
  "model" .Values.model.name
  "pipelineImage" (include "mnist-pipeline.image" .Values.images.pipeline)) }}
{{- end }}

{{/* Run id: <install token or run.id>-<hash of the run's inputs>; at most 64 characters
(the project's run-id rule), so the token part is cut to 55. checkpoints/<run id>/ holds
what its stages write, and every wait looks only there. */}}
{{- define "mnist-pipeline.runId" -}}
{{- $token := include "mnist-pipeline.installToken" . | trunc 55 | trimSuffix "-" | trimSuffix "." }}
{{- printf "%s-%s" $token (include "mnist-pipeline.runInputs" . | sha256sum | trunc 8) }}
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

{{/* "true" when every pod must share one node: the claim is ReadWriteOnce. */}}
{{- define "mnist-pipeline.singleNode" -}}
{{- if not (has "ReadWriteMany" .Values.persistence.accessModes) }}true{{ end }}
{{- end }}

{{- define "mnist-pipeline.image" -}}
{{- if .digest }}
{{- printf "%s@%s" .repository .digest }}
{{- else }}
{{- printf "%s:%s" .repository .tag }}
{{- end }}
{{- end }}

{{/*
Pod-level settings: pass (dict "ctx" $ "values" <component values>). Component
nodeSelector entries win over the global ones, tolerations add up, a component affinity
replaces the global one. With a ReadWriteOnce claim every pod of the release requires a
node that runs another pod of the release: they all land on one node, where the volume
is attached (the first pod matches its own term, so it schedules anywhere).
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
{{- if include "mnist-pipeline.singleNode" $ctx }}
{{- $term := dict "labelSelector" (dict "matchLabels" (include "mnist-pipeline.selectorLabels" $ctx | fromYaml)) "topologyKey" "kubernetes.io/hostname" }}
{{- $podAffinity := default (dict) $affinity.podAffinity }}
{{- $required := default (list) $podAffinity.requiredDuringSchedulingIgnoredDuringExecution }}
{{- $_ := set $podAffinity "requiredDuringSchedulingIgnoredDuringExecution" (append $required $term) }}
{{- $_ := set $affinity "podAffinity" $podAffinity }}
{{- end }}
{{- with $affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $c.topologySpreadConstraints }}
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

{{/* Volumes every pod has, plus the component's extraVolumes: pass (dict "ctx" $
"values" <component values>). */}}
{{- define "mnist-pipeline.storageVolumes" -}}
- name: storage
  persistentVolumeClaim:
    claimName: {{ include "mnist-pipeline.claimName" .ctx }}
- name: tmp
  emptyDir:
    sizeLimit: 1Gi
{{- with .values.extraVolumes }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* The volume at /storage (persistence.subPath of it) and /tmp: pass (dict "ctx" $
"readOnly" true|false). */}}
{{- define "mnist-pipeline.storageMounts" -}}
- name: storage
  mountPath: /storage
  {{- with .ctx.Values.persistence.subPath }}
  subPath: {{ . | quote }}
  {{- end }}
  {{- if .readOnly }}
  readOnly: true
  {{- end }}
- name: tmp
  mountPath: /tmp
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
    - --namespace={{ $ctx.Release.Namespace }}
    - --wait-timeout={{ int64 $ctx.Values.waits.timeoutSeconds }}
    - --wait-interval={{ $ctx.Values.waits.intervalSeconds }}
    {{- range .args }}
    - {{ . | quote }}
    {{- end }}
  securityContext:
    {{- toYaml $ctx.Values.containerSecurityContext | nindent 4 }}
  resources:
    {{- toYaml $ctx.Values.waits.resources | nindent 4 }}
  volumeMounts:
    {{- include "mnist-pipeline.storageMounts" (dict "ctx" $ctx "readOnly" true) | nindent 4 }}
    {{- if $ctx.Values.waits.kubernetesApi }}
    - name: api-token
      mountPath: /var/run/secrets/kubernetes.io/serviceaccount
      readOnly: true
    {{- end }}
{{- end }}

{{/* The headless Service of multi-worker training. */}}
{{- define "mnist-pipeline.workersService" -}}
{{- printf "%s-workers" (include "mnist-pipeline.fullname" .) }}
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

{{/*
The values checked at render time: only what the API server would refuse (with a less
helpful message, after some objects exist) and what it would accept but leave the release
hanging or broken. Every message is collected and the render fails once, with all of them,
as bitnami's validateValues does. Training, export and serving settings (batch sizes,
learning rate, precision, ...) are not repeated here: the pods' own CLI refuses them with
its message, check-train before any rank starts.
*/}}
{{- define "mnist-pipeline.validate" -}}
{{- $errors := list }}
{{- $name := include "mnist-pipeline.tritonName" . }}
{{- if not (regexMatch "^[a-z]([-a-z0-9]*[a-z0-9])?$" $name) }}
{{- $errors = append $errors (printf "release name %q gives the Service name %q, which Kubernetes refuses (a DNS-1035 label: lower-case letters, digits and '-', starting with a letter): choose another release name or set fullnameOverride" .Release.Name $name) }}
{{- end }}
{{- $p := .Values.persistence }}
{{- if not (regexMatch "^[0-9]+(\\.[0-9]+)?(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E)?$" (toString $p.size)) }}
{{- $errors = append $errors (printf "persistence.size %q is not a Kubernetes quantity (e.g. 5Gi), which the API server refuses" (toString $p.size)) }}
{{- else if not (gt (include "mnist-pipeline.quantity" $p.size | float64) 0.0) }}
{{- $errors = append $errors "persistence.size must be above 0: the API server refuses an empty claim" }}
{{- end }}
{{- if include "mnist-pipeline.singleNode" . }}
{{- if or (gt (int .Values.triton.replicas) 1) .Values.triton.autoscaling.enabled }}
{{- $errors = append $errors "persistence.accessModes is ReadWriteOnce: the volume attaches to one node, so more than one Triton replica (or autoscaling) cannot spread; use ReadWriteMany with an RWX storage class (persistence.storageClass), or triton.replicas: 1" }}
{{- end }}
{{- if gt (int .Values.training.workers) 1 }}
{{- $errors = append $errors "training.workers > 1 needs persistence.accessModes [ReadWriteMany]: the workers run on different nodes and all write the volume" }}
{{- end }}
{{- end }}
{{- $errors = concat $errors (include "mnist-pipeline.validate.claim" . | fromYamlArray) }}
{{- range $stage := list "export" "client" }}
{{- $deadline := (get $.Values $stage).activeDeadlineSeconds }}
{{- if and $deadline (lt (int $deadline) (int $.Values.waits.timeoutSeconds)) }}
{{- $errors = append $errors (printf "%s.activeDeadlineSeconds (%d) counts the wait for the stages before it, up to waits.timeoutSeconds (%d): set it above that, or null" $stage (int $deadline) (int $.Values.waits.timeoutSeconds)) }}
{{- end }}
{{- end }}
{{- with .Values.triton.autoscaling }}
{{- if and .enabled (not (or .cpu.enabled .queueTime.enabled .extraMetrics)) }}
{{- $errors = append $errors "triton.autoscaling is on without a metric (the API server would default to 80 % CPU of the 100m request, always scaled out): enable autoscaling.cpu or autoscaling.queueTime, or give extraMetrics" }}
{{- end }}
{{- if and .enabled (gt (int64 .minReplicas) (int64 .maxReplicas)) }}
{{- $errors = append $errors (printf "triton.autoscaling.minReplicas (%d) is above maxReplicas (%d), which the API server refuses" (int64 .minReplicas) (int64 .maxReplicas)) }}
{{- end }}
{{- end }}
{{- if and (gt (int64 .Values.training.gpus) 0) (not .Values.images.pipeline.cuda) }}
{{- $errors = append $errors "training.gpus > 0, but images.pipeline is the CPU build (its torch has no CUDA): build one with CUDA (docs/KUBERNETES.md, GPUs), set it in images.pipeline and images.pipeline.cuda: true" }}
{{- end }}
{{- range $component := list "training" "export" "triton" "client" "waits" }}
{{- $r := (get $.Values $component).resources }}
{{- range $resource, $request := (default (dict) $r.requests) }}
{{- $limit := dig "limits" $resource "" $r }}
{{- if and $limit (gt (include "mnist-pipeline.quantity" $request | float64) (include "mnist-pipeline.quantity" $limit | float64)) }}
{{- $errors = append $errors (printf "%s.resources: the %s request (%v) is above its limit (%v), which the API server refuses" $component $resource $request $limit) }}
{{- end }}
{{- end }}
{{- end }}
{{- $np := .Values.networkPolicy }}
{{- $exposed := or (ne .Values.triton.service.type "ClusterIP") .Values.triton.ingress.enabled }}
{{- if and $np.enabled $exposed (not $np.tritonIngressFrom) }}
{{- $errors = append $errors "triton.service.type is NodePort/LoadBalancer or triton.ingress is on, but the NetworkPolicy admits only this release's pods: add the sources (ingress controller namespace, node or load-balancer CIDRs) to networkPolicy.tritonIngressFrom, or set networkPolicy.enabled=false" }}
{{- end }}
{{- if and .Values.triton.ingress.enabled (not .Values.triton.ingress.hosts) }}
{{- $errors = append $errors "triton.ingress.enabled needs at least one entry in triton.ingress.hosts (host and paths): an Ingress without rules is refused" }}
{{- end }}
{{- if $errors }}
{{- fail (printf "\n\nVALUES VALIDATION:\n- %s" (join "\n- " $errors)) }}
{{- end }}
{{- end }}

{{/*
The claim as the cluster has it, a YAML list of what cannot work. Only where `lookup` sees
a cluster (the namespace's default ServiceAccount is there): helm template and GitOps
renders see nothing and check nothing. An existingClaim that is not there leaves every pod
Pending; a claim's access modes cannot change.
*/}}
{{- define "mnist-pipeline.validate.claim" -}}
{{- $p := .Values.persistence }}
{{- $claim := include "mnist-pipeline.claimName" . }}
{{- $errors := list }}
{{- if lookup "v1" "ServiceAccount" .Release.Namespace "default" }}
{{- $existing := lookup "v1" "PersistentVolumeClaim" .Release.Namespace $claim }}
{{- if and $p.existingClaim (not $existing) }}
{{- $errors = append $errors (printf "persistence.existingClaim %q is not in namespace %s: every pod would stay Pending; create it first, or unset existingClaim for a claim of the chart's" $claim .Release.Namespace) }}
{{- else if and (not $p.existingClaim) $existing $existing.spec (ne (toJson $existing.spec.accessModes) (toJson $p.accessModes)) }}
{{- $errors = append $errors (printf "persistence.accessModes %v: the release's claim %s exists with %v, and a claim's access modes cannot change. Keep %v, or move the data to a new claim (persistence.existingClaim)" $p.accessModes $claim $existing.spec.accessModes $existing.spec.accessModes) }}
{{- end }}
{{- end }}
{{- toYaml $errors }}
{{- end }}

{{/* triton.servedVersion as the pin and the client read it: "run" (this run's version;
in serve-only mode, having no run, the newest), "" (the newest), or a number (never in
scientific notation). */}}
{{- define "mnist-pipeline.servedVersion" -}}
{{- $v := .Values.triton.servedVersion }}
{{- if kindIs "string" $v }}{{ $v }}{{ else }}{{ int64 $v }}{{ end }}
{{- end }}

{{/* training.epochs as the CLI reads it: a whole number without a fraction or exponent
(1000000, never 1e+06), a fraction or a string as it is (0.8: the share of one pass;
anything else is the CLI's to refuse). */}}
{{- define "mnist-pipeline.epochs" -}}
{{- $e := .Values.training.epochs }}
{{- if and (not (kindIs "string" $e)) (eq (float64 $e) (floor $e)) }}{{ int64 $e }}{{ else }}{{ $e }}{{ end }}
{{- end }}

{{/* The version a client asks Triton for: triton.servedVersion, except that serve-only
mode has no run to resolve "run" against, and its pin serves the newest: "" asks for that. */}}
{{- define "mnist-pipeline.requestedVersion" -}}
{{- $v := include "mnist-pipeline.servedVersion" . }}
{{- if and .Values.serveOnly (eq $v "run") }}{{ else }}{{ $v }}{{ end }}
{{- end }}

{{/* A resource quantity ("500m", "2", 1.5, "1Gi", "512Mi") as a plain number. */}}
{{- define "mnist-pipeline.quantity" -}}
{{- $q := toString . }}
{{- $units := dict "m" 0.001 "k" 1e3 "M" 1e6 "G" 1e9 "T" 1e12 "Ki" 1024.0 "Mi" 1048576.0 "Gi" 1073741824.0 "Ti" 1099511627776.0 }}
{{- $unit := regexFind "[A-Za-z]+$" $q }}
{{- $number := trimSuffix $unit $q | float64 }}
{{- if $unit }}{{ mulf $number (get $units $unit) }}{{ else }}{{ $number }}{{ end }}
{{- end }}

{{/* Refuse a Prometheus Operator object the cluster has no CRD for: the install would
fail on it anyway, with a less helpful message. Pass (dict "ctx" $ "kind" "ServiceMonitor"
"value" "triton.serviceMonitor.enabled"). */}}
{{- define "mnist-pipeline.requireMonitoringCRD" -}}
{{- $gv := "monitoring.coreos.com/v1" }}
{{- $ctx := .ctx }}
{{- if not (or ($ctx.Capabilities.APIVersions.Has (printf "%s/%s" $gv .kind)) (has $gv $ctx.Values.apiVersions) (has (printf "%s/%s" $gv .kind) $ctx.Values.apiVersions)) }}
{{- fail (printf "%s renders a %s (%s), but the cluster does not serve that API: install the Prometheus Operator (its CRDs, e.g. kube-prometheus-stack) first, or set %s=false. Rendering without a cluster (helm template, GitOps): pass --api-versions %s/%s, or list %s in apiVersions" .value .kind $gv .value $gv .kind $gv) }}
{{- end }}
{{- end }}
