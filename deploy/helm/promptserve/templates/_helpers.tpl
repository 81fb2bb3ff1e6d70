{{/* The release's full name: the release name, or <release>-promptserve when it does not say promptserve. */}}
{{- define "promptserve.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{/* The labels that select the pods (the kustomize base's, plus the release's instance). */}}
{{- define "promptserve.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: server
{{- end -}}

{{- define "promptserve.labels" -}}
{{ include "promptserve.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "promptserve.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "promptserve.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* The task store's location: the s3:// URI, or the mounted directory. */}}
{{- define "promptserve.storeDir" -}}
{{- if eq .Values.store.type "s3" -}}
{{- .Values.store.s3.uri -}}
{{- else -}}
{{- .Values.store.dir.path -}}
{{- end -}}
{{- end -}}

{{- define "promptserve.storeClaim" -}}
{{- default (printf "%s-store" (include "promptserve.fullname" .)) .Values.store.dir.existingClaim -}}
{{- end -}}

{{/* An optional key of an existing Secret as an environment variable; nothing when the Secret is not named. */}}
{{- define "promptserve.secretEnv" -}}
{{- $secret := index . 1 -}}
{{- if $secret.name -}}
- name: {{ index . 0 }}
  valueFrom:
    secretKeyRef:
      name: {{ $secret.name }}
      key: {{ $secret.key }}
      optional: true
{{- end -}}
{{- end -}}
