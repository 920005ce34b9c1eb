{{/* The volume: where it is mounted, and whether it binds every pod to one node. */}}

{{/* "true" when every pod must share one node: the claim is ReadWriteOnce. */}}
{{- define "mnist-pipeline.singleNode" -}}
{{- if not (has "ReadWriteMany" .Values.persistence.accessModes) }}true{{ end }}
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
