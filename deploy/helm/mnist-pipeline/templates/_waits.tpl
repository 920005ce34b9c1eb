{{/* The wait initContainers that run the stages in order. */}}

{{/* A wait initContainer: pass (dict "ctx" $ "image" "pipeline" "target"
"training" "job" <job name> "args" <extra args>); "objectStorage" true: it reads the
object-storage repository, without the volume. With an object-storage repository every wait
after the export gets its env, so it reads the export's record from the bucket. "timeout"
replaces waits.timeoutSeconds; "noToken" true: a pod without the API token (helm test's). */}}
{{- define "mnist-pipeline.waitContainer" -}}
{{- $ctx := .ctx }}
- name: wait-for-{{ .target }}
  image: {{ include "mnist-pipeline.image" (dict "ctx" .ctx "name" .image) | quote }}
  imagePullPolicy: {{ (get $ctx.Values.images .image).pullPolicy }}
  command: ["mnist-pipeline"]
  args:
    - wait
    - {{ .target }}
    {{- if not .objectStorage }}
    - --storage=/storage
    {{- end }}
    - --run-id={{ include "mnist-pipeline.runId" $ctx }}
    - --job={{ .job }}
    - --namespace={{ $ctx.Release.Namespace }}
    - --wait-timeout={{ include "mnist-pipeline.settings.format" (.timeout | default $ctx.Values.waits.timeoutSeconds) }}
    - --wait-interval={{ include "mnist-pipeline.settings.format" $ctx.Values.waits.intervalSeconds }}
    - --visibility-grace={{ include "mnist-pipeline.settings.format" $ctx.Values.waits.visibilitySeconds }}
    {{- range .args }}
    - {{ . | quote }}
    {{- end }}
  {{- if and (ne .target "training") (include "mnist-pipeline.objectRepository" $ctx) }}
  env:
    {{- include "mnist-pipeline.objectStorageEnv" $ctx | nindent 4 }}
  {{- end }}
  securityContext:
    {{- toYaml $ctx.Values.containerSecurityContext | nindent 4 }}
  resources:
    {{- toYaml $ctx.Values.waits.resources | nindent 4 }}
  volumeMounts:
    {{- include "mnist-pipeline.storageMounts" (dict "ctx" $ctx "readOnly" true "noClaim" .objectStorage) | nindent 4 }}
    {{- if and $ctx.Values.waits.kubernetesApi (not .noToken) }}
    - name: api-token
      mountPath: /var/run/secrets/kubernetes.io/serviceaccount
      readOnly: true
    {{- end }}
{{- end }}
