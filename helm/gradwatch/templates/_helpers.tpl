{{/* Chart name, at most 63 characters. */}}
{{- define "gradwatch.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Fully qualified app name: the release name, with the chart name unless the release already has it. */}}
{{- define "gradwatch.fullname" -}}
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

{{- define "gradwatch.headless" -}}
{{- printf "%s-headless" (include "gradwatch.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "gradwatch.selectorLabels" -}}
app.kubernetes.io/name: {{ include "gradwatch.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "gradwatch.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "gradwatch.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/part-of: gradwatch
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "gradwatch.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "gradwatch.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "gradwatch.image" -}}
{{- printf "%s:%s" .Values.image.repository .Values.image.tag }}
{{- end }}

{{/* True (non-empty) when the Prometheus Operator's API is served or the value forces the resource. */}}
{{- define "gradwatch.monitoringApi" -}}
{{- if or .force (.root.Capabilities.APIVersions.Has "monitoring.coreos.com/v1") }}true{{ end }}
{{- end }}

{{/* Health probes. Kubelet's gRPC probes speak plaintext only, so a TLS port gets TCP probes. */}}
{{- define "gradwatch.probe" -}}
{{- if .tls -}}
tcpSocket:
  port: grpc
{{- else -}}
grpc:
  port: {{ .port }}
  {{- with .service }}
  service: {{ . }}
  {{- end }}
{{- end }}
{{- end }}

{{/*
The gradwatch native sidecar: one `initContainers` entry (restartPolicy Always, Kubernetes >= 1.29) that starts
before the pod's containers, gates them with its gRPC startup probe and is stopped after they exit.
Call with a dict: "values" = the gradwatch chart's values (`.Values` here, `.Values.gradwatch` in a chart that
depends on this one). Add the volumes from "gradwatch.sidecarVolumes" to the pod and the environment from
"gradwatch.agentEnv" to its training containers.

  initContainers:
    {{- include "gradwatch.sidecar" (dict "values" .Values.gradwatch) | nindent 4 }}
*/}}
{{- define "gradwatch.sidecar" -}}
{{- $v := .values -}}
- name: gradwatch
  image: {{ printf "%s:%s" (default $v.image.repository $v.sidecar.image.repository) (default $v.image.tag $v.sidecar.image.tag) | quote }}
  imagePullPolicy: {{ $v.image.pullPolicy }}
  restartPolicy: Always
  args:
    - serve
    {{- range $v.sidecar.args }}
    - {{ . | quote }}
    {{- end }}
  env:
    - name: GRADWATCH_GRPC_PORT
      value: {{ $v.ports.grpc | quote }}
    - name: GRADWATCH_HTTP_PORT
      value: {{ $v.ports.http | quote }}
    - name: GRADWATCH_DATA_DIR
      value: {{ $v.persistence.mountPath | quote }}
    {{- with $v.sidecar.upstream }}
    - name: GRADWATCH_UPSTREAM
      value: {{ . | quote }}
    {{- end }}
  ports:
    - name: gw-grpc
      containerPort: {{ $v.ports.grpc }}
      protocol: TCP
    - name: gw-http
      containerPort: {{ $v.ports.http }}
      protocol: TCP
  startupProbe:
    grpc:
      port: {{ $v.ports.grpc }}
      service: gradwatch.v1.Ingest
    periodSeconds: 1
    failureThreshold: 60
  livenessProbe:
    grpc:
      port: {{ $v.ports.grpc }}
    periodSeconds: 10
    timeoutSeconds: 5
    failureThreshold: 3
  resources:
    {{- toYaml $v.sidecar.resources | nindent 4 }}
  securityContext:
    {{- $pod := dict "runAsNonRoot" true "runAsUser" 10001 "runAsGroup" 10001 "seccompProfile" (dict "type" "RuntimeDefault") }}
    {{- toYaml (mergeOverwrite $pod (deepCopy $v.securityContext)) | nindent 4 }}
  volumeMounts:
    - name: gradwatch-data
      mountPath: {{ $v.persistence.mountPath }}
    - name: gradwatch-tmp
      mountPath: /tmp
{{- end }}

{{/* The sidecar's volumes, for the pod's `volumes` list. */}}
{{- define "gradwatch.sidecarVolumes" -}}
- name: gradwatch-data
  emptyDir: {}
- name: gradwatch-tmp
  emptyDir: {}
{{- end }}

{{/* The agent's environment in a pod with the sidecar. Same dict as "gradwatch.sidecar". */}}
{{- define "gradwatch.agentEnv" -}}
- name: GRADWATCH_SERVER
  value: {{ printf "localhost:%v" .values.ports.grpc | quote }}
{{- end }}
