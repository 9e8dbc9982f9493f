{{/* Names, labels and the values every template shares. */}}

{{- define "lora-pipeline.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "lora-pipeline.fullname" -}}
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

{{- define "lora-pipeline.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/name: {{ include "lora-pipeline.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/* Selector labels of one component: include with (dict "root" $ "component" "mlflow"). */}}
{{- define "lora-pipeline.selectorLabels" -}}
app.kubernetes.io/name: {{ include "lora-pipeline.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/* An image reference from {repository, tag}: registry prefix and the chart's appVersion as default tag. */}}
{{- define "lora-pipeline.image" -}}
{{- $registry := .root.Values.images.registry | default "" | trimSuffix "/" }}
{{- $tag := .image.tag | default .root.Chart.AppVersion }}
{{- if $registry }}
{{- printf "%s/%s:%s" $registry .image.repository $tag }}
{{- else }}
{{- printf "%s:%s" .image.repository $tag }}
{{- end }}
{{- end }}

{{- define "lora-pipeline.namespace" -}}
{{- .Values.pipeline.namespace | default .Release.Namespace }}
{{- end }}

{{- define "lora-pipeline.mlflowName" -}}
{{- printf "%s-mlflow" (include "lora-pipeline.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "lora-pipeline.objectStoreName" -}}
{{- printf "%s-s3" (include "lora-pipeline.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "lora-pipeline.stepServiceAccount" -}}
{{- .Values.pipeline.stepServiceAccount.name | default (printf "%s-step" (include "lora-pipeline.fullname" .)) }}
{{- end }}

{{- define "lora-pipeline.modelCachePvc" -}}
{{- if .Values.modelCache.existingClaim }}
{{- .Values.modelCache.existingClaim }}
{{- else if .Values.modelCache.enabled }}
{{- printf "%s-model-cache" (include "lora-pipeline.fullname" .) }}
{{- end }}
{{- end }}

{{- define "lora-pipeline.s3Endpoint" -}}
{{- if eq .Values.objectStore.mode "seaweedfs" }}
{{- printf "http://%s.%s.svc.%s:%d" (include "lora-pipeline.objectStoreName" .) .Release.Namespace .Values.clusterDomain (int .Values.objectStore.seaweedfs.port) }}
{{- else }}
{{- required "objectStore.external.endpoint is required when objectStore.mode=external" .Values.objectStore.external.endpoint }}
{{- end }}
{{- end }}

{{- define "lora-pipeline.mlflowUri" -}}
{{- if .Values.mlflow.enabled }}
{{- printf "http://%s.%s.svc.%s:%d" (include "lora-pipeline.mlflowName" .) .Release.Namespace .Values.clusterDomain (int .Values.mlflow.port) }}
{{- else }}
{{- required "mlflow.externalUri is required when mlflow.enabled=false" .Values.mlflow.externalUri }}
{{- end }}
{{- end }}

{{/* The Secret that holds AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY. */}}
{{- define "lora-pipeline.s3Secret" -}}
{{- .Values.objectStore.credentialsSecret | default (printf "%s-s3-credentials" (include "lora-pipeline.fullname" .)) }}
{{- end }}

{{/* The Secret that holds the MLflow backend store URI (key `uri`). */}}
{{- define "lora-pipeline.mlflowDbSecret" -}}
{{- .Values.mlflow.backendStore.secretName | default (printf "%s-mlflow-db" (include "lora-pipeline.fullname" .)) }}
{{- end }}

{{/* Fixed name pattern: the Airflow chart's extraEnvFrom (a literal in values.yaml) refers to it. */}}
{{- define "lora-pipeline.executorConfigMap" -}}
{{- printf "%s-lora-pipeline-executor" .Release.Name | trunc 63 | trimSuffix "-" }}
{{- end }}
