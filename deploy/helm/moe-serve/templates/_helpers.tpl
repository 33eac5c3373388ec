{{/* Chart name, truncated to the 63 characters of a DNS label. */}}
{{- define "moe-serve.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Release-qualified name of the chart's objects. */}}
{{- define "moe-serve.fullname" -}}
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

{{- define "moe-serve.selectorLabels" -}}
app.kubernetes.io/name: {{ include "moe-serve.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "moe-serve.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "moe-serve.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "moe-serve.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{/* The planner's image: its own if set, else the server image (which carries moe-place). */}}
{{- define "moe-serve.placementImage" -}}
{{- if .Values.placement.image.repository -}}
{{- printf "%s:%s" .Values.placement.image.repository (default .Chart.AppVersion .Values.placement.image.tag) -}}
{{- else -}}
{{- include "moe-serve.image" . -}}
{{- end -}}
{{- end -}}

{{- define "moe-serve.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "moe-serve.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "moe-serve.apiKeySecretName" -}}
{{- default (printf "%s-api-key" (include "moe-serve.fullname" .)) .Values.apiKey.existingSecret -}}
{{- end -}}

{{/* Paths the planner reads and writes (see values.yaml: placement.args). */}}
{{- define "moe-serve.tracePath" -}}
{{- printf "/var/lib/moe/traces/%s" .Values.placement.traces.file -}}
{{- end -}}

{{- define "moe-serve.clusterPath" -}}
/etc/moe/placement/cluster.toml
{{- end -}}

{{/* Job mode writes one plan per Helm revision, so pods of a revision never read an older plan. */}}
{{- define "moe-serve.planPath" -}}
{{- if eq .Values.placement.mode "job" -}}
{{- printf "/var/lib/moe/plan/plan-%d.json" (int .Release.Revision) -}}
{{- else -}}
/var/lib/moe/plan/plan.json
{{- end -}}
{{- end -}}

{{/* The placement Job of this revision. */}}
{{- define "moe-serve.placementJobName" -}}
{{- printf "%s-place-%d" (include "moe-serve.fullname" . | trunc 50 | trimSuffix "-") (int .Release.Revision) -}}
{{- end -}}

{{/* Fails the render on settings that cannot work. */}}
{{- define "moe-serve.validate" -}}
{{- if and .Values.apiKey.enabled (not .Values.apiKey.existingSecret) (not .Values.apiKey.value) -}}
{{- fail "apiKey.enabled needs apiKey.value or apiKey.existingSecret" -}}
{{- end -}}
{{- if and .Values.model.volume (not .Values.model.path) -}}
{{- fail "model.volume needs model.path (the checkpoint directory on the volume)" -}}
{{- end -}}
{{- if .Values.placement.enabled -}}
{{- if not (has .Values.placement.mode (list "initContainer" "job")) -}}
{{- fail (printf "placement.mode must be initContainer or job, not %q" .Values.placement.mode) -}}
{{- end -}}
{{- if not .Values.placement.cluster -}}
{{- fail "placement.enabled needs placement.cluster (the text of moe-place's cluster TOML file)" -}}
{{- end -}}
{{- if not .Values.placement.traces.volume -}}
{{- fail "placement.enabled needs placement.traces.volume (where the recorded routing traces are)" -}}
{{- end -}}
{{- if and (eq .Values.placement.mode "job") (not .Values.placement.planVolume) -}}
{{- fail "placement.mode=job needs placement.planVolume (shared by the Job and the server pods)" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* Volumes and mounts the planner needs, as YAML lists. */}}
{{- define "moe-serve.placementVolumes" -}}
- name: traces
{{ toYaml .Values.placement.traces.volume | indent 2 }}
- name: placement-cluster
  configMap:
    name: {{ include "moe-serve.fullname" . }}-placement
{{- end -}}

{{/* The planner container, as one item of a container list. */}}
{{- define "moe-serve.placementContainer" -}}
- name: {{ .name }}
  image: {{ include "moe-serve.placementImage" .root }}
  imagePullPolicy: {{ .root.Values.image.pullPolicy }}
  command:
    {{- toYaml .root.Values.placement.command | nindent 4 }}
  args:
    {{- range .root.Values.placement.args }}
    - {{ tpl . $.root | quote }}
    {{- end }}
  volumeMounts:
    - name: traces
      mountPath: /var/lib/moe/traces
      readOnly: true
    - name: placement-cluster
      mountPath: /etc/moe/placement
      readOnly: true
    - name: plan
      mountPath: /var/lib/moe/plan
  resources:
    {{- toYaml .root.Values.placement.resources | nindent 4 }}
  securityContext:
    {{- toYaml .root.Values.securityContext | nindent 4 }}
{{- end -}}
