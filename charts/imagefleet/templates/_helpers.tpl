{{/*
Helpers of the imagefleet chart. Every helper is prefixed with the chart name.
*/}}

{{/*
The chart name, or nameOverride.
*/}}
{{- define "imagefleet.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
A default fully qualified app name: release name + chart name, or the release name alone when it
already contains the chart name, or fullnameOverride.
We truncate at 63 chars because some Kubernetes name fields are limited to this (by the DNS naming
spec).
*/}}
{{- define "imagefleet.fullname" -}}
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

{{/*
The operator's objects in the release namespace: <fullname>-operator, within 63 chars.
*/}}
{{- define "imagefleet.operatorName" -}}
{{- printf "%s-operator" (include "imagefleet.fullname" . | trunc 54 | trimSuffix "-") }}
{{- end }}

{{/*
Cluster-scoped objects (ClusterRole, ClusterRoleBinding) carry the release namespace in their name,
so that releases of the same name in two namespaces (say, two operators watching disjoint
namespaces) do not claim the same object. Such names may be up to 253 characters.
*/}}
{{- define "imagefleet.clusterName" -}}
{{- printf "%s-%s" (include "imagefleet.namespace" .) (include "imagefleet.operatorName" .) | trunc 253 | trimSuffix "-" }}
{{- end }}

{{/*
Chart name and version, as used by the helm.sh/chart label.
*/}}
{{- define "imagefleet.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The namespace of the release, or namespaceOverride.
*/}}
{{- define "imagefleet.namespace" -}}
{{- default .Release.Namespace .Values.namespaceOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Common labels of every object the chart makes: the selector labels plus helm.sh/chart (never in a
selector: selectors are immutable, and the chart version changes with every upgrade), version,
component, part-of and managed-by.
*/}}
{{- define "imagefleet.labels" -}}
helm.sh/chart: {{ include "imagefleet.chart" . }}
{{ include "imagefleet.selectorLabels" . }}
{{- if .Chart.AppVersion }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- end }}
app.kubernetes.io/component: operator
app.kubernetes.io/part-of: imagefleet
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/*
Selector labels: only app.kubernetes.io/name and app.kubernetes.io/instance.
*/}}
{{- define "imagefleet.selectorLabels" -}}
app.kubernetes.io/name: {{ include "imagefleet.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/*
What the operator Deployment and its metrics Service select: the selector labels plus the
component. The component is needed because the inference pods and routers the operator creates
also carry app.kubernetes.io/name=imagefleet and app.kubernetes.io/instance=<their ImageGenerator>:
an ImageGenerator named like the release, in the release namespace, must not match the operator.
*/}}
{{- define "imagefleet.operatorSelectorLabels" -}}
{{ include "imagefleet.selectorLabels" . }}
app.kubernetes.io/component: operator
{{- end }}

{{/*
The name of the operator's ServiceAccount.
*/}}
{{- define "imagefleet.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "imagefleet.operatorName" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name must name an existing ServiceAccount when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
The operator image: repository:tag, the tag defaulting to the chart's appVersion.
*/}}
{{- define "imagefleet.operatorImage" -}}
{{- printf "%s:%s" .Values.operator.image.repository (default .Chart.AppVersion .Values.operator.image.tag) }}
{{- end }}

{{/*
Whether the operator runs with leader election ("true" or ""): when asked to, and always with
more than one replica.
*/}}
{{- define "imagefleet.leaderElection" -}}
{{- if or .Values.operator.leaderElection (gt (int .Values.operator.replicas) 1) }}true{{ end }}
{{- end }}

{{/*
Defaults of the operator's own that the Deployment itself must know, because Kubernetes fields
(a container port, a grace period, an RBAC resource name) cannot be left to the process. The
values are imagefleet.settings.OperatorSettings' defaults; tests/unit/test_chart_values.py checks
that they still agree. No flag is passed for them: the operator applies its own default.
*/}}
{{- define "imagefleet.operatorDefaults" -}}
health_port: 8080
stop_timeout_s: 30
lease_name: imagefleet-operator
{{- end }}

{{/*
One operator setting: operator.settings.<name> when set, else the operator's default (above).
Call with (list $ "name").
*/}}
{{- define "imagefleet.operatorSetting" -}}
{{- $root := index . 0 }}
{{- $name := index . 1 }}
{{- $defaults := include "imagefleet.operatorDefaults" $root | fromYaml }}
{{- $settings := $root.Values.operator.settings | default dict }}
{{- if and (hasKey $settings $name) (not (kindIs "invalid" (index $settings $name))) }}
{{- index $settings $name }}
{{- else }}
{{- index $defaults $name }}
{{- end }}
{{- end }}

{{/*
The operator's health and metrics port (--health-port): 0 turns the endpoint off.
*/}}
{{- define "imagefleet.healthPort" -}}
{{- include "imagefleet.operatorSetting" (list . "health_port") | int }}
{{- end }}

{{/*
The namespace of the leader-election Lease: operator.settings.lease_namespace, else the
operator's own (it reads POD_NAMESPACE).
*/}}
{{- define "imagefleet.leaseNamespace" -}}
{{- $settings := .Values.operator.settings | default dict }}
{{- default (include "imagefleet.namespace" .) (get $settings "lease_namespace") }}
{{- end }}

{{/*
One command-line value: whole numbers without an exponent (YAML numbers arrive as float64, and
1000000.0 would print as 1e+06), lists comma separated, everything else as text.
*/}}
{{- define "imagefleet.flagValue" -}}
{{- if kindIs "float64" . }}
{{- if eq . (floor .) }}{{ int64 . }}{{ else }}{{ . }}{{ end }}
{{- else if kindIs "slice" . }}
{{- join "," . }}
{{- else }}
{{- . }}
{{- end }}
{{- end }}

{{/*
The operator's arguments: the dedicated values, then operator.settings in name order; unset
values pass nothing.
*/}}
{{- define "imagefleet.operatorArgs" -}}
{{- $args := list }}
{{- with .Values.watchNamespaces }}
{{- $args = append $args (printf "--namespaces=%s" (join "," .)) }}
{{- end }}
{{- with .Values.generatorDefaults.podImage }}
{{- $args = append $args (printf "--default-image=%s" .) }}
{{- end }}
{{- with .Values.generatorDefaults.routerImage }}
{{- $args = append $args (printf "--router-image=%s" .) }}
{{- end }}
{{- with .Values.generatorDefaults.imagePullPolicy }}
{{- $args = append $args (printf "--image-pull-policy=%s" .) }}
{{- end }}
{{- if include "imagefleet.leaderElection" . }}
{{- $args = append $args "--leader-election" }}
{{- end }}
{{- $settings := .Values.operator.settings | default dict }}
{{- range $name := keys $settings | sortAlpha }}
{{- $value := index $settings $name }}
{{- $flag := $name | replace "_" "-" }}
{{- if kindIs "invalid" $value }}
{{- else if kindIs "bool" $value }}
{{- $args = append $args (printf "--%s%s" (ternary "" "no-" $value) $flag) }}
{{- else }}
{{- $args = append $args (printf "--%s=%s" $flag (include "imagefleet.flagValue" $value)) }}
{{- end }}
{{- end }}
{{- toYaml $args }}
{{- end }}
