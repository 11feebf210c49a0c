{{- define "moeplace.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "moeplace.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "moeplace.labels" -}}
app.kubernetes.io/name: {{ include "moeplace.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "moeplace.selectorLabels" -}}
app.kubernetes.io/name: {{ include "moeplace.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* An image reference: repository@digest when a digest is set, else repository:tag (the
tag defaulting to the chart's appVersion). Argument: dict "image" <values> "chart" .Chart */}}
{{- define "moeplace.image" -}}
{{- $img := .image | default dict -}}
{{- if $img.digest -}}
{{- printf "%s@%s" $img.repository $img.digest -}}
{{- else -}}
{{- printf "%s:%s" $img.repository ($img.tag | default .chart.AppVersion) -}}
{{- end -}}
{{- end -}}

{{- define "moeplace.crdConfigMapName" -}}
{{- printf "%s-crd" (include "moeplace.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "moeplace.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "moeplace.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* Rights on the objects the operator reconciles, in the namespaces it watches. */}}
{{- define "moeplace.namespacedRules" -}}
- apiGroups: ["moeplace.io"]
  resources: ["moedeployments"]
  verbs: ["get", "list", "watch", "patch"]  # patch: kopf's annotations and finalizer only
- apiGroups: ["moeplace.io"]
  resources: ["moedeployments/status"]
  verbs: ["get", "patch"]
- apiGroups: [""]
  resources: ["configmaps"]
  verbs: ["get", "create", "update"]  # placement/proposal maps; load and pinned maps are read
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create"]
- apiGroups: ["events.k8s.io"]
  resources: ["events"]
  verbs: ["create"]
- apiGroups: ["apps"]
  resources: ["deployments", "statefulsets"]
  verbs: ["get", "patch"]  # the rollout.target pod-template annotation
{{- end -}}

{{/* CEL variables of a node update: old and new labels and annotations (empty maps when
absent). Shared by the ValidatingAdmissionPolicies that bound what the operator and the
profiler may change on a Node. */}}
{{- define "moeplace.nodeMetaVariables" -}}
- name: oldLabels
  expression: "has(oldObject.metadata.labels) ? oldObject.metadata.labels : {}"
- name: newLabels
  expression: "has(object.metadata.labels) ? object.metadata.labels : {}"
- name: oldAnn
  expression: "has(oldObject.metadata.annotations) ? oldObject.metadata.annotations : {}"
- name: newAnn
  expression: "has(object.metadata.annotations) ? object.metadata.annotations : {}"
{{- end -}}
