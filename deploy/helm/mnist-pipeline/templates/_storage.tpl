{{/* The volume: where it is mounted, and whether it binds every pod to one node. */}}

{{/* "true" when every pod must share one node: the claim is ReadWriteOnce. */}}
{{- define "mnist-pipeline.singleNode" -}}
{{- if not (has "ReadWriteMany" .Values.persistence.accessModes) }}true{{ end }}
{{- end }}

{{/* Volumes every pod has, plus the component's extraVolumes: pass (dict "ctx" $
"values" <component values>); "noClaim" true leaves the claim out (Triton's pods with an
object-storage repository). */}}
{{- define "mnist-pipeline.storageVolumes" -}}
{{- if not .noClaim }}
- name: storage
  persistentVolumeClaim:
    claimName: {{ include "mnist-pipeline.claimName" .ctx }}
{{- end }}
- name: tmp
  emptyDir:
    sizeLimit: 1Gi
{{- with .values.extraVolumes }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* The volume at /storage (persistence.subPath of it) and /tmp: pass (dict "ctx" $
"readOnly" true|false); "noClaim" true: /tmp only. */}}
{{- define "mnist-pipeline.storageMounts" -}}
{{- if not .noClaim }}
- name: storage
  mountPath: /storage
  {{- with .ctx.Values.persistence.subPath }}
  subPath: {{ . | quote }}
  {{- end }}
  {{- if .readOnly }}
  readOnly: true
  {{- end }}
{{- end }}
- name: tmp
  mountPath: /tmp
{{- end }}

{{/* "true" when the model repository is an object store (modelRepository.url s3://...):
Triton's pods then read it through their wait and pin initContainers, without the volume. */}}
{{- define "mnist-pipeline.objectRepository" -}}
{{- if hasPrefix "s3://" .Values.modelRepository.url }}true{{ end }}
{{- end }}

{{/* The env of a container that reads or writes the object store (the contract of
mnist-pipeline's --model-repository): the URL, the Secret's keys, the region, and no cloud
metadata lookups (credentials come from the Secret only). */}}
{{- define "mnist-pipeline.objectStorageEnv" -}}
{{- $r := .Values.modelRepository }}
- name: MNIST_PIPELINE_MODEL_REPOSITORY
  value: {{ $r.url | quote }}
{{- range $key := list "AWS_ACCESS_KEY_ID" "AWS_SECRET_ACCESS_KEY" "AWS_SESSION_TOKEN" }}
- name: {{ $key }}
  valueFrom:
    secretKeyRef:
      name: {{ $r.existingSecret | quote }}
      key: {{ $key }}
      {{- if eq $key "AWS_SESSION_TOKEN" }}
      optional: true
      {{- end }}
{{- end }}
- name: AWS_DEFAULT_REGION
  value: {{ $r.region | quote }}
- name: AWS_EC2_METADATA_DISABLED
  value: "true"
{{- end }}

{{/* TCP ports of the object store: networkPolicy.egress.objectStorage.ports, else the
port of modelRepository.url (s3://[http(s)://]host[:port]/...; AWS and https: 443, http: 80). */}}
{{- define "mnist-pipeline.objectStoragePorts" -}}
{{- $ports := .Values.networkPolicy.egress.objectStorage.ports }}
{{- if not $ports }}
{{- $rest := trimPrefix "s3://" .Values.modelRepository.url }}
{{- $default := 443 }}
{{- if hasPrefix "http://" $rest }}{{ $default = 80 }}{{ end }}
{{- $host := regexReplaceAll "^https?://" $rest "" | regexFind "^[^/]*" }}
{{- $port := regexFind ":[0-9]+$" $host | trimPrefix ":" }}
{{- $ports = list (ternary (int $port) $default (ne $port "")) }}
{{- end }}
{{- toYaml $ports }}
{{- end }}
