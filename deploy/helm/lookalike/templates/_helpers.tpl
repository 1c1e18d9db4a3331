{{/* Names and labels. */}}
{{- define "lookalike.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "lookalike.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* Leaves room for a suffix such as -metrics or -headless. */}}
{{- define "lookalike.base" -}}
{{- include "lookalike.fullname" . | trunc 54 | trimSuffix "-" -}}
{{- end -}}

{{- define "lookalike.selectorLabels" -}}
app.kubernetes.io/name: {{ include "lookalike.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "lookalike.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "lookalike.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{/* The Secret the chart creates (admin key, Milvus token). */}}
{{- define "lookalike.secretName" -}}
{{- include "lookalike.fullname" . -}}
{{- end -}}

{{- define "lookalike.adminKeySecret" -}}
{{- default (include "lookalike.secretName" .) .Values.adminKey.existingSecret -}}
{{- end -}}

{{/* Whether $LOOKALIKE_MILVUS_TOKEN is set: the Milvus backend with a token from a Secret. */}}
{{- define "lookalike.milvusToken" -}}
{{- if and (eq .Values.search.backend "milvus") (or .Values.milvus.token.existingSecret .Values.milvus.token.value) -}}
true
{{- end -}}
{{- end -}}

{{- define "lookalike.milvusTokenSecret" -}}
{{- default (include "lookalike.secretName" .) .Values.milvus.token.existingSecret -}}
{{- end -}}

{{/* `lookalike serve`'s arguments. */}}
{{- define "lookalike.serveArgs" -}}
- serve
- --model-repository=/models
- --host=0.0.0.0
- --http-port={{ .Values.ports.http }}
- --grpc-port={{ .Values.ports.grpc }}
- --metrics-port={{ .Values.ports.metrics }}
- --health-port={{ .Values.ports.health }}
{{- if ne .Values.variant "python" }}
- --model-config-name={{ .Values.variant }}
{{- end }}
{{- if eq .Values.search.backend "milvus" }}
- --search-backend=milvus
- --milvus-uri={{ required "search.backend milvus needs milvus.uri (the Milvus release's address, e.g. http://milvus.milvus.svc.cluster.local:19530)" .Values.milvus.uri }}
{{- end }}
{{- range .Values.extraArgs }}
- {{ . | quote }}
{{- end }}
{{- end -}}
