{{- define "kubetune.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "kubetune.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "kubetune.operatorSelector" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end -}}

{{/* A Prometheus duration (30s, 15m, 2h, 1d) as seconds, for comparisons inside PromQL. The number is read
as decimal (atoi): sprig's `int` reads a leading 0 as octal, "015" as 13 and "08" as 0. */}}
{{- define "kubetune.seconds" -}}
{{- $d := toString . -}}
{{- if not (regexMatch "^[0-9]+[smhd]$" $d) -}}
{{- fail (printf "prometheusRule: %q is not a duration like 30s, 15m, 2h or 1d" $d) -}}
{{- end -}}
{{- $units := dict "s" 1 "m" 60 "h" 3600 "d" 86400 -}}
{{- $unit := substr (sub (len $d) 1 | int) (len $d) $d -}}
{{- mul (trimSuffix $unit $d | atoi) (get $units $unit) -}}
{{- end -}}

{{/* PromQL for the PrometheusRule: a run in one of .phases for longer than .longerThan (a duration), timed
from its last phase change (kubetune_run_phase_transition_timestamp_seconds, from the run's conditions). */}}
{{- define "kubetune.inPhaseLongerThan" -}}
max by (namespace, run, phase) (kubetune_run_phase{phase=~"{{ join "|" .phases }}"}) == 1
and on (namespace, run)
(time() - max by (namespace, run) (kubetune_run_phase_transition_timestamp_seconds))
  > {{ include "kubetune.seconds" .longerThan }}
{{- end -}}

{{/* kopf's liveness endpoint, which the probes call: the port Dockerfile.operator's ENTRYPOINT gives --liveness. */}}
{{- define "kubetune.healthPort" -}}8081{{- end -}}

{{/* The operator's /metrics port; never the health port, which both servers would then try to bind. */}}
{{- define "kubetune.metricsPort" -}}
{{- $port := int .Values.metrics.port -}}
{{- if eq $port (int (include "kubetune.healthPort" .)) -}}
{{- fail (printf "metrics.port: %d is the operator's health port (kopf's liveness endpoint, which the probes call); choose another port, such as 8080" $port) -}}
{{- end -}}
{{- $port -}}
{{- end -}}

{{- define "kubetune.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "kubetune.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "kubetune.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{- define "kubetune.pullSecretNames" -}}
{{- $names := list -}}
{{- range .Values.imagePullSecrets }}{{ $names = append $names .name }}{{ end -}}
{{- join "," $names -}}
{{- end -}}
