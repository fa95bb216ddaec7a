{{/* The chart's name, at most 63 characters (a label value). */}}
{{- define "finetune-operator.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The full name of the release's objects: the release name when it already holds the chart name, else
"<release>-<chart>"; at most 63 characters.
*/}}
{{- define "finetune-operator.fullname" -}}
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

{{- define "finetune-operator.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "finetune-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "finetune-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "finetune-operator.labels" -}}
helm.sh/chart: {{ include "finetune-operator.chart" . }}
{{ include "finetune-operator.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: finetune-operator
{{- end }}

{{- define "finetune-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "finetune-operator.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "finetune-operator.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/*
What the operator does with the API, and nothing more (operator/finetune_operator/kube.py and handlers.py).
Secrets: only `get` of the webhook signing key's one name; trainer pods name Secrets by reference, which needs
no right on them.
*/}}
{{- define "finetune-operator.rules" -}}
# kopf watches FineTuneJobs (the periodic resync lists them); the reconciler deletes one whose TTL has passed.
- apiGroups: ["finetune.dev"]
  resources: ["finetunejobs"]
  verbs: ["get", "list", "watch", "delete"]
- apiGroups: ["finetune.dev"]
  resources: ["finetunejobs/status"]
  verbs: ["patch"]
# Children carry ownerReferences with blockOwnerDeletion: true, which the OwnerReferencesPermissionEnforcement
# admission plugin allows only to who may update the owner's finalizers.
- apiGroups: ["finetune.dev"]
  resources: ["finetunejobs/finalizers"]
  verbs: ["update"]
# The validation and training Jobs: created (read back when the name is taken, to check its owner),
# suspended/resumed (patch), deleted on cancel; watched by kopf, listed by the periodic resync.
- apiGroups: ["batch"]
  resources: ["jobs"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
# Trainer pods: watched by kopf, listed by the periodic resync, read when a followed log ends; rank 0's log.
# One that has been terminating far past its grace because its node stopped reporting is set Failed (its
# `status`, as the pod garbage collector does for an out-of-service node) and deleted.
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["get", "list", "watch", "delete"]
- apiGroups: [""]
  resources: ["pods/status"]
  verbs: ["patch"]
- apiGroups: [""]
  resources: ["pods/log"]
  verbs: ["get"]
# The input ConfigMap and the headless Service of the trainer pods (read to check their owner).
- apiGroups: [""]
  resources: ["configmaps", "services"]
  verbs: ["get", "create", "delete"]
# Events on FineTuneJobs (the operator's and kopf's own); Warning Events are watched, to tell a user why a
# child is stuck (the Job controller's FailedCreate, a kubelet's FailedMount).
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create", "list", "watch"]
# The webhook signing key: Secrets of this one name only (resourceNames), to sign deliveries with.
- apiGroups: [""]
  resources: ["secrets"]
  resourceNames: [{{ .Values.settings.webhookSigningSecret | quote }}]
  verbs: ["get"]
{{- if .Values.api.enabled }}
# Replicate's trainings API creates FineTuneJobs and cancels them (spec.cancel) for callers that a
# SubjectAccessReview says may do the same.
- apiGroups: ["finetune.dev"]
  resources: ["finetunejobs"]
  verbs: ["create", "patch"]
{{- end }}
{{- end }}

{{/* The metrics Service's name: a Service name is a DNS label, at most 63 characters with its suffix. */}}
{{- define "finetune-operator.metricsServiceName" -}}
{{- printf "%s-metrics" (include "finetune-operator.fullname" . | trunc 55 | trimSuffix "-") }}
{{- end }}

{{/* The API Service's name, like the metrics Service's. */}}
{{- define "finetune-operator.apiServiceName" -}}
{{- printf "%s-api" (include "finetune-operator.fullname" . | trunc 59 | trimSuffix "-") }}
{{- end }}
