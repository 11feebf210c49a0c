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

{{/* Rights on the objects the operator reconciles, in the namespaces it watches. RBAC cannot
name the objects written here (their names come from the MoEDeployments), so the writes are
bounded by the ValidatingAdmissionPolicies in rbac.yaml: moeplace-owned ConfigMaps only, and only
the placement annotation of a workload its MoEDeployment names as rollout target. */}}
{{- define "moeplace.namespacedRules" -}}
- apiGroups: ["moeplace.io"]
  resources: ["moedeployments"]
  verbs: ["get", "list", "watch", "patch"]  # patch: kopf's annotations and finalizer only
- apiGroups: ["moeplace.io"]
  resources: ["moedeployments/status"]
  verbs: ["get", "patch"]
- apiGroups: [""]
  resources: ["configmaps"]
  verbs: ["get", "create", "update"]  # get: load and pinned maps; writes: policy -owned-configmaps
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create"]
- apiGroups: ["events.k8s.io"]
  resources: ["events"]
  verbs: ["create"]
- apiGroups: ["apps"]
  resources: ["deployments", "statefulsets"]
  verbs: ["get", "patch"]  # policy -rollout-target: the placement annotation of a target only
{{- end -}}

{{/* The admission-policy condition "this request comes from the operator's ServiceAccount". */}}
{{- define "moeplace.isTheOperator" -}}
- name: is-the-operator
  expression: >-
    request.userInfo.username ==
    'system:serviceaccount:{{ .Release.Namespace }}:{{ include "moeplace.serviceAccountName" . }}'
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

{{/* CEL validations shared by the operator's and the profiler's node policies: the spec, the
ownerReferences (garbage collection of the Node) and the finalizers (its deletion) stay as
they are. The argument names the ServiceAccount in the messages. */}}
{{- define "moeplace.frozenNodeFields" -}}
- expression: "object.spec == oldObject.spec"
  message: "the {{ . }} may not change a node's spec"
  reason: Forbidden
- expression: >-
    has(object.metadata.ownerReferences) == has(oldObject.metadata.ownerReferences) &&
    (!has(object.metadata.ownerReferences) ||
    object.metadata.ownerReferences == oldObject.metadata.ownerReferences)
  message: "the {{ . }} may not change a node's ownerReferences"
  reason: Forbidden
- expression: >-
    has(object.metadata.finalizers) == has(oldObject.metadata.finalizers) &&
    (!has(object.metadata.finalizers) || object.metadata.finalizers == oldObject.metadata.finalizers)
  message: "the {{ . }} may not change a node's finalizers"
  reason: Forbidden
{{- end -}}
