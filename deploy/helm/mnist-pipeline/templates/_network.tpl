{{/* Network settings that depend on the cluster. */}}

{{/*
Egress rules to the cluster's DNS, by networkPolicy.egress.dns.preset. A NetworkPolicy
sees the packet after the Service's DNAT: it must name the DNS pods' own port (OpenShift's
listen on 5353 behind port 53) or, for caches on the node, its address.
  kube-dns    CoreDNS/kube-dns pods labelled k8s-app=kube-dns, port 53 (kubeadm, kind,
              EKS, AKS, GKE's kube-dns)
  openshift   the dns-default pods of namespace openshift-dns, ports 5353 and 53
  nodelocal   NodeLocal DNSCache at 169.254.20.10 (and kube-dns, which it falls back to)
  gke-cloud-dns  GKE with Cloud DNS: the node's metadata server 169.254.169.254, port 53
  custom      networkPolicy.egress.dns.to and .ports as given
*/}}
{{- define "mnist-pipeline.dnsEgress" -}}
{{- $dns := .Values.networkPolicy.egress.dns }}
{{- $kubeDns := dict "to" (list (dict "namespaceSelector" (dict) "podSelector" (dict "matchLabels" (dict "k8s-app" "kube-dns")))) "ports" (list 53) }}
{{- $rules := list }}
{{- if eq $dns.preset "kube-dns" }}
{{- $rules = list $kubeDns }}
{{- else if eq $dns.preset "openshift" }}
{{- $rules = list (dict "to" (list (dict "namespaceSelector" (dict "matchLabels" (dict "kubernetes.io/metadata.name" "openshift-dns")) "podSelector" (dict "matchLabels" (dict "dns.operator.openshift.io/daemonset-dns" "default")))) "ports" (list 5353 53)) }}
{{- else if eq $dns.preset "nodelocal" }}
{{- $rules = list (dict "to" (list (dict "ipBlock" (dict "cidr" "169.254.20.10/32"))) "ports" (list 53)) $kubeDns }}
{{- else if eq $dns.preset "gke-cloud-dns" }}
{{- $rules = list (dict "to" (list (dict "ipBlock" (dict "cidr" "169.254.169.254/32"))) "ports" (list 53)) }}
{{- else }}
{{- $rules = list (dict "to" $dns.to "ports" $dns.ports) }}
{{- end }}
{{- range $rules }}
- to:
    {{- toYaml .to | nindent 4 }}
  ports:
    {{- range $port := .ports }}
    {{- range $protocol := list "UDP" "TCP" }}
    - port: {{ $port }}
      protocol: {{ $protocol }}
    {{- end }}
    {{- end }}
{{- end }}
{{- end }}

{{/* "true" when Triton's admin APIs need the admin header: triton.restrictedApis.enabled,
and with auto, whenever something outside the release can reach Triton. */}}
{{- define "mnist-pipeline.tritonRestricted" -}}
{{- $r := .Values.triton.restrictedApis }}
{{- if or (eq (toString $r.enabled) "true") (and (eq (toString $r.enabled) "auto") (include "mnist-pipeline.tritonExposed" .)) }}true{{ end }}
{{- end }}

{{/* "true" when something outside the release can reach Triton: a NodePort or
LoadBalancer Service, or the Ingress. */}}
{{- define "mnist-pipeline.tritonExposed" -}}
{{- if or (ne .Values.triton.service.type "ClusterIP") .Values.triton.ingress.enabled }}true{{ end }}
{{- end }}

{{- define "mnist-pipeline.tritonAdminSecret" -}}
{{- default (printf "%s-triton-admin" (include "mnist-pipeline.fullname" .)) .Values.triton.restrictedApis.existingSecret }}
{{- end }}
