{{/* Values the API server would refuse, or that would leave the release hanging. */}}

{{/*
The values checked at render time: what the pods' CLI would refuse (every value that
becomes a MNIST_PIPELINE_ variable or a flag, checked from the CLI's own declarations in
templates/_settings.tpl, with its words), what the API server would refuse (with a less
helpful message, after some objects exist), and what it would accept but leave the release
hanging or broken. Every message is collected and the render fails once, with all of them,
as bitnami's validateValues does. What only the pods can see (a batch that does not split
over the workers, syncBatchNorm without CUDA, the variables of extraEnv) is still theirs to
refuse, before any rank starts.
*/}}
{{- define "mnist-pipeline.validate" -}}
{{- $errors := include "mnist-pipeline.settings.checks" . | fromYamlArray }}
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
{{- $repo := .Values.modelRepository }}
{{- if and $repo.url (not (hasPrefix "s3://" $repo.url)) }}
{{- $errors = append $errors (printf "modelRepository.url %q: \"\" (the volume's models/) or s3://[http(s)://]HOST[:PORT]/BUCKET/PREFIX, or s3://BUCKET/PREFIX for AWS" $repo.url) }}
{{- else if and $repo.url (not (regexMatch "^s3://(https?://)?[^/]+/[^/]+" $repo.url)) }}
{{- $errors = append $errors (printf "modelRepository.url %q names no bucket: s3://[http(s)://]HOST[:PORT]/BUCKET/PREFIX, or s3://BUCKET/PREFIX for AWS" $repo.url) }}
{{- end }}
{{- if and (hasPrefix "s3://" $repo.url) (not $repo.existingSecret) }}
{{- $errors = append $errors "modelRepository.url is s3:// but modelRepository.existingSecret is empty: name a Secret with AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (optionally AWS_SESSION_TOKEN); the pods never fall back to anonymous access or cloud instance metadata" }}
{{- end }}
{{- if include "mnist-pipeline.singleNode" . }}
{{- if and (or (gt (int .Values.triton.replicas) 1) .Values.triton.autoscaling.enabled) (not (include "mnist-pipeline.objectRepository" .)) }}
{{- $errors = append $errors "persistence.accessModes is ReadWriteOnce: the volume attaches to one node, so more than one Triton replica (or autoscaling) cannot spread; use an object-storage repository (modelRepository.url s3://...), ReadWriteMany with an RWX storage class (persistence.storageClass), or triton.replicas: 1" }}
{{- end }}
{{- if gt (int .Values.training.workers) 1 }}
{{- $errors = append $errors "training.workers > 1 needs persistence.accessModes [ReadWriteMany]: the workers run on different nodes and all write the volume" }}
{{- end }}
{{- end }}
{{- $compression := include "mnist-pipeline.settings.text" (dict "ctx" . "path" "training.gradientCompression") }}
{{- $compressions := (include "mnist-pipeline.settings.declaration.training.gradientCompression" . | fromJson).choices }}
{{- if and (ne $compression "none") (has $compression $compressions) (le (int .Values.training.workers) 1) }}
{{- $errors = append $errors (printf "training.gradientCompression %s compresses what the workers send each other: it needs training.workers > 1" $compression) }}
{{- end }}
{{- $errors = concat $errors (include "mnist-pipeline.validate.placement" . | fromYamlArray) }}
{{- $errors = concat $errors (include "mnist-pipeline.validate.claim" . | fromYamlArray) }}
{{- $errors = concat $errors (include "mnist-pipeline.validate.canary" . | fromYamlArray) }}
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
{{- if and $np.enabled (include "mnist-pipeline.tritonExposed" .) (not $np.tritonIngressFrom) }}
{{- $errors = append $errors "triton.service.type is NodePort/LoadBalancer or triton.ingress is on, but the NetworkPolicy admits only this release's pods: add the sources (ingress controller namespace, node or load-balancer CIDRs) to networkPolicy.tritonIngressFrom, or set networkPolicy.enabled=false" }}
{{- end }}
{{- with $np.egress.dns }}
{{- if and $np.egress.enabled (eq .preset "custom") (not (and .to .ports)) }}
{{- $errors = append $errors "networkPolicy.egress.dns.preset is custom but dns.to or dns.ports is empty: no pod could resolve a name, and every wait would hang until its timeout" }}
{{- end }}
{{- end }}
{{- if and .Values.triton.ingress.enabled (not .Values.triton.ingress.hosts) }}
{{- $errors = append $errors "triton.ingress.enabled needs at least one entry in triton.ingress.hosts (host and paths): an Ingress without rules is refused" }}
{{- end }}
{{- $chartEnv := dict "training" (include "mnist-pipeline.train.chartEnv" . | fromYamlArray) "export" (list (dict "name" "MNIST_PIPELINE_CPU_LIMIT")) "triton" (list (dict "name" "HOME")) }}
{{- $settingVariables := include "mnist-pipeline.settings.variables" . | fromJson }}
{{- range $component := list "training" "export" "triton" "client" }}
{{- $fromValues := get $settingVariables $component | default dict }}
{{- $set := keys $fromValues }}
{{- range (get $chartEnv $component | default list) }}{{ $set = append $set .name }}{{ end }}
{{- $extra := list }}
{{- range (get $.Values $component).extraEnv }}
{{- if has .name $set }}
{{- $errors = append $errors (printf "%s.extraEnv sets %s, which the chart already sets from %s (the container would keep only the last of the two): use that value instead" $component .name (get $fromValues .name | default (printf "%s.*" $component))) }}
{{- else if has .name $extra }}
{{- $errors = append $errors (printf "%s.extraEnv sets %s twice (the container would keep only the last)" $component .name) }}
{{- end }}
{{- $extra = append $extra .name }}
{{- end }}
{{- end }}
{{- $images := .Values.images }}
{{- $dockerHub := list }}
{{- range $image := list "pipeline" "client" "triton" }}
{{- $v := get $images $image }}
{{- if not (or $images.registry $images.localNames (include "mnist-pipeline.namesRegistry" $v.repository)) }}
{{- $dockerHub = append $dockerHub (printf "images.%s.repository %q" $image $v.repository) }}
{{- end }}
{{- end }}
{{- with $dockerHub }}
{{- $errors = append $errors (printf "%s name(s) no registry, so every node would pull them from Docker Hub, where anyone may own that namespace: set images.registry to where `make push-images REGISTRY=...` pushed them (or name a registry host in each repository); only where the images are loaded into the nodes (kind load docker-image, minikube image load), set images.localNames=true" (join ", " .)) }}
{{- end }}
{{- $t := $images.triton }}
{{- if and (hasSuffix "mnist-pipeline/triton" $t.repository) (ne $t.backend "python") }}
{{- $errors = append $errors (printf "images.triton.repository %q is the project's CPU image: it has no onnxruntime backend, only Triton's python backend running the project's model.py on ONNX Runtime; set images.triton.backend=python, or serve with NVIDIA's image (images.triton.repository nvcr.io/nvidia/tritonserver, tag 24.10-py3, backend onnxruntime: the defaults)" $t.repository) }}
{{- else if and (contains "nvidia/tritonserver" $t.repository) (eq $t.backend "python") }}
{{- $errors = append $errors (printf "images.triton.repository %q is NVIDIA's tritonserver, which serves the exported repository as it is with its onnxruntime backend: set images.triton.backend=onnxruntime (python is for the project's image, mnist-pipeline/triton)" $t.repository) }}
{{- end }}
{{- if and (gt (int64 .Values.triton.gpus) 0) (eq $t.backend "python") }}
{{- $errors = append $errors (printf "triton.gpus is %d (KIND_GPU instances), but images.triton.backend python runs the model on CPUs only: set triton.gpus=0, or serve with NVIDIA's image and backend onnxruntime (the defaults; docs/KUBERNETES.md, GPUs)" (int64 .Values.triton.gpus)) }}
{{- else if and (gt (int64 .Values.triton.gpus) 0) (not $t.cuda) }}
{{- $errors = append $errors "triton.gpus > 0, but images.triton.cuda is false (a tritonserver without CUDA): serve with NVIDIA's image, images.triton.repository nvcr.io/nvidia/tritonserver, tag 24.10-py3, cuda=true and backend onnxruntime (the defaults; docs/KUBERNETES.md, GPUs)" }}
{{- end }}
{{- range $image := list "pipeline" "client" "triton" }}
{{- $v := get $images $image }}
{{- if and (eq (toString $v.tag) "latest") (not $v.digest) }}
{{- $errors = append $errors (printf "images.%s.tag is \"latest\", a tag that moves: nodes that pulled it at different times would run different code, and IfNotPresent never updates it; set a version tag or images.%s.digest" $image $image) }}
{{- end }}
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

{{/*
Placement that cannot schedule, a YAML list of messages. With a ReadWriteOnce claim every
pod (Triton's too, unless it reads an object store) requires the node of the others, so
they must all be allowed on one node: a component's own nodeSelector or tolerations (a GPU
node for Triton alone) would leave the others Pending there, or it Pending elsewhere. And
that node must hold the GPUs of all of them at once: Triton's pods reserve theirs while
they wait through training, and a RollingUpdate starts one more before an old one stops.
*/}}
{{- define "mnist-pipeline.validate.placement" -}}
{{- $errors := list }}
{{- $v := .Values }}
{{- $tritonGpus := mul (int64 $v.triton.gpus) (int64 $v.triton.replicas) }}
{{- $surge := ternary (int64 $v.triton.gpus) 0 (eq $v.triton.updateStrategy "RollingUpdate") }}
{{- range $component := list "training" "triton" }}
{{- if gt (int64 (get $v $component).gpus) (int64 $v.gpusPerNode) }}
{{- $errors = append $errors (printf "%s.gpus (%d) is more than gpusPerNode (%d), the GPUs one node offers: its pods would stay Pending; lower it, or set gpusPerNode if the nodes have more" $component (int64 (get $v $component).gpus) (int64 $v.gpusPerNode)) }}
{{- end }}
{{- end }}
{{- if include "mnist-pipeline.singleNode" . }}
{{- $shared := list "training" "export" "client" }}
{{- if not (include "mnist-pipeline.objectRepository" .) }}
{{- $shared = append $shared "triton" }}
{{- $peak := add (ternary 0 (int64 $v.training.gpus) $v.serveOnly) $tritonGpus $surge }}
{{- if gt $peak (int64 $v.gpusPerNode) }}
{{- $errors = append $errors (printf "persistence.accessModes is ReadWriteOnce, so every pod runs on the one node the volume attaches to, and at the peak it needs %d GPUs there (training.gpus %d, while Triton's %d pod(s) hold triton.gpus %d each through their wait for training%s) but gpusPerNode is %d: set triton.updateStrategy=Recreate (no extra pod during a rollout), train on CPU (training.gpus=0), use an object-storage repository (modelRepository.url: Triton then runs on any node), or set gpusPerNode if the nodes have more" $peak (int64 $v.training.gpus) (int64 $v.triton.replicas) (int64 $v.triton.gpus) (ternary ", plus one more during a RollingUpdate" "" (gt $surge 0)) (int64 $v.gpusPerNode)) }}
{{- end }}
{{- end }}
{{- $first := "" }}
{{- $firstPlacement := "" }}
{{- range $component := $shared }}
{{- $c := get $v $component }}
{{- $placement := dict "nodeSelector" (merge (deepCopy (default (dict) $c.nodeSelector)) $v.nodeSelector) "tolerations" (concat $v.tolerations (default (list) $c.tolerations)) | toJson }}
{{- if not $first }}
{{- $first = $component }}
{{- $firstPlacement = $placement }}
{{- else if ne $placement $firstPlacement }}
{{- $errors = append $errors (printf "persistence.accessModes is ReadWriteOnce, so every pod runs on the one node the volume attaches to, but %s.nodeSelector/tolerations differ from %s's (%s against %s): one of them would stay Pending. Set nodeSelector and tolerations at the top level, for every pod (a GPU node for Triton means a GPU node for all), or give Triton an object-storage repository (modelRepository.url) or the volume ReadWriteMany" $component $first $placement $firstPlacement) }}
{{- end }}
{{- end }}
{{- end }}
{{- toYaml $errors }}
{{- end }}

{{/* A canary release needs a run to release, both versions served by default, and a
Prometheus to read; a YAML list of messages. */}}
{{- define "mnist-pipeline.validate.canary" -}}
{{- $errors := list }}
{{- $c := .Values.canary }}
{{- if $c.enabled }}
{{- if .Values.serveOnly }}
{{- $errors = append $errors "canary.enabled releases a new run's version, but serveOnly has no run: turn one of them off" }}
{{- end }}
{{- if not (regexMatch "^https?://[^/]+" (toString $c.prometheusUrl)) }}
{{- $errors = append $errors (printf "canary.prometheusUrl %q: the analysis needs the Prometheus that scrapes Triton's metrics, http(s)://HOST:PORT" (toString $c.prometheusUrl)) }}
{{- end }}
{{- $served := include "mnist-pipeline.servedVersion" . }}
{{- if ne $served "run" }}
{{- $errors = append $errors (printf "triton.servedVersion %q pins what every pod serves, but a canary release serves the champion and the challenger: leave it run, or turn canary.enabled off" $served) }}
{{- end }}
{{- end }}
{{- toYaml $errors }}
{{- end }}
