{{/* Chart name, truncated to the 63 characters Kubernetes allows in a name. */}}
{{- define "tandem.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full object name: <release>-<chart> unless overridden. */}}
{{- define "tandem.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "tandem.labels" -}}
app.kubernetes.io/name: {{ include "tandem.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end }}

{{/* The Ray container of every pod; `component` is head, prefill or decode. */}}
{{- define "tandem.container" -}}
- name: ray-{{ .component }}
  image: "{{ .root.Values.image.repository }}:{{ .root.Values.image.tag }}"
  imagePullPolicy: {{ .root.Values.image.pullPolicy }}
  {{- with .root.Values.env }}
  env:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  resources:
    {{- toYaml .resources | nindent 4 }}
  lifecycle:
    preStop:
      exec:
        command: ["/bin/sh", "-c", "ray stop"]
{{- end }}

{{/* One worker group: `pool` is prefill or decode, `group` its values block. Each pod
     carries gpusPerPod GPUs and as many units of the pool's custom Ray resource. */}}
{{- define "tandem.workerGroup" -}}
- groupName: {{ .pool }}
  replicas: {{ .group.replicas }}
  minReplicas: {{ .group.minReplicas }}
  maxReplicas: {{ .group.maxReplicas }}
  rayStartParams:
    num-gpus: {{ .group.gpusPerPod | quote }}
    resources: {{ printf "\"{\\\"%s\\\": %d}\"" .pool (int .group.gpusPerPod) | squote }}
  template:
    metadata:
      labels:
        {{- include "tandem.labels" .root | nindent 8 }}
        tandem.dev/pool: {{ .pool }}
    spec:
      {{- with .root.Values.imagePullSecrets }}
      imagePullSecrets:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      containers:
        {{- $resources := deepCopy .group.resources }}
        {{- $_ := set $resources.limits "nvidia.com/gpu" (int .group.gpusPerPod) }}
        {{- $_ := set $resources.requests "nvidia.com/gpu" (int .group.gpusPerPod) }}
        {{- include "tandem.container" (dict "root" .root "component" .pool "resources" $resources) | nindent 8 }}
      {{- with .group.nodeSelector }}
      nodeSelector:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with .group.tolerations }}
      tolerations:
        {{- toYaml . | nindent 8 }}
      {{- end }}
{{- end }}
