{{/* The release's name prefix: "ferry" for a release named ferry, else "<release>-ferry". */}}
{{- define "ferry.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "ferry.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "ferry.image" -}}
{{- $tag := .Values.image.tag | default (printf "%s-%s" .Chart.AppVersion .Values.image.device) -}}
{{- printf "%s:%s" .Values.image.repository $tag -}}
{{- end -}}

{{/* One model's settings: modelDefaults overridden by its entry. Call with (list $ $entry). */}}
{{- define "ferry.model" -}}
{{- $root := index . 0 -}}
{{- $m := mergeOverwrite (deepCopy $root.Values.modelDefaults) (deepCopy (index . 1)) -}}
{{- if not (regexMatch "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$" $m.name) -}}
{{- fail (printf "models[].name %q must be a DNS label: lower-case letters, digits and '-'" $m.name) -}}
{{- end -}}
{{- $_ := set $m "servedModelName" ($m.servedModelName | default $m.name) -}}
{{- $_ := set $m "fullname" (printf "%s-%s" (include "ferry.fullname" $root) $m.name | trunc 63 | trimSuffix "-") -}}
{{- toYaml $m -}}
{{- end -}}
