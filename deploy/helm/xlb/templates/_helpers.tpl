{{/* Labels on every object: the name the selectors use, plus Helm's own. */}}
{{- define "xlb.labels" -}}
app.kubernetes.io/name: xlb
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service | quote }}
app.kubernetes.io/instance: {{ .Release.Name | quote }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- end -}}
