{{/* Names and labels shared by every template. */}}
{{- define "cpis.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "cpis.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else if contains (include "cpis.name" .) .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name (include "cpis.name" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "cpis.selectorLabels" -}}
app.kubernetes.io/name: {{ include "cpis.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "cpis.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "cpis.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: cpis-bridge
{{- end -}}

{{- define "cpis.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{/* Seconds Kubernetes waits after SIGTERM: preStop + drain + in-flight grace + a margin for the final exit. */}}
{{- define "cpis.terminationGrace" -}}
{{- if .Values.terminationGracePeriodSeconds -}}
{{- .Values.terminationGracePeriodSeconds -}}
{{- else -}}
{{- add (int .Values.preStopSleepSeconds) (int .Values.drainDelaySeconds) (int .Values.shutdownGraceSeconds) 10 -}}
{{- end -}}
{{- end -}}

{{/* The environment shared by the service and the purge CronJob. */}}
{{- define "cpis.env" -}}
- name: CPIS_HOST
  value: "0.0.0.0"
- name: CPIS_PORT
  value: {{ .Values.containerPort | quote }}
- name: CPIS_DATA_DIR
  value: /tmp/cpis
- name: CPIS_REGISTRY
  value: /etc/cpis/registry.yaml
- name: CPIS_KEY_PREFIX
  value: {{ .Values.keyPrefix | quote }}
{{- if .Values.redis.sentinel.hosts }}
- name: CPIS_REDIS_URL
  value: {{ printf "redis+sentinel://%s/%s" (join "," .Values.redis.sentinel.hosts) (required "redis.sentinel.masterName is required with Sentinel hosts" .Values.redis.sentinel.masterName) | quote }}
{{- else if .Values.redis.existingSecret }}
- name: CPIS_REDIS_URL
  valueFrom:
    secretKeyRef:
      name: {{ .Values.redis.existingSecret }}
      key: {{ .Values.redis.secretKey }}
{{- else }}
- name: CPIS_REDIS_URL
  value: {{ required "redis.url or redis.existingSecret is required: the chart runs against an external Redis" .Values.redis.url | quote }}
{{- end }}
{{- with .Values.redis.passwordSecret }}
- name: CPIS_REDIS_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ . }}
      key: {{ $.Values.redis.passwordKey }}
{{- end }}
{{- with .Values.redis.sentinel.passwordSecret }}
- name: CPIS_REDIS_SENTINEL_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ . }}
      key: {{ $.Values.redis.sentinel.passwordKey }}
{{- end }}
{{- if .Values.redis.minReplicas }}
- name: CPIS_REDIS_MIN_REPLICAS
  value: {{ .Values.redis.minReplicas | quote }}
{{- end }}
{{- with .Values.auth.jwksUrl }}
- name: CPIS_AUTH_JWKS_URL
  value: {{ . | quote }}
- name: CPIS_AUTH_ISSUER
  value: {{ required "auth.issuer is required with auth.jwksUrl" $.Values.auth.issuer | quote }}
- name: CPIS_AUTH_AUDIENCE
  value: {{ required "auth.audience is required with auth.jwksUrl (the service refuses to start without it)" $.Values.auth.audience | quote }}
{{- end }}
{{- with .Values.publicBaseUrl }}
- name: CPIS_PUBLIC_BASE_URL
  value: {{ . | quote }}
{{- end }}
{{- /* The hash key also names every child's Redis keys: all replicas and restarts must share it. */}}
- name: CPIS_LOG_HASH_KEY
  valueFrom:
    secretKeyRef:
      name: {{ required "secrets.existingSecret is required: its log hash key also derives the Redis key names, so every replica, restart and the purge job must share it" .Values.secrets.existingSecret }}
      key: {{ required "secrets.logHashKeyKey is required" .Values.secrets.logHashKeyKey }}
{{- with .Values.secrets.devSecretKey }}
- name: CPIS_AUTH_DEV_SECRET
  valueFrom:
    secretKeyRef:
      name: {{ $.Values.secrets.existingSecret }}
      key: {{ . }}
{{- end }}
{{- with .Values.fhir.baseUrl }}
- name: CPIS_FHIR_BASE_URL
  value: {{ . | quote }}
- name: CPIS_FHIR_WRITE_MODE
  value: {{ $.Values.fhir.writeMode | quote }}
- name: CPIS_FHIR_AUTH_MODE
  value: {{ $.Values.fhir.authMode | quote }}
{{- range $name, $value := dict "TOKEN_URL" $.Values.fhir.tokenUrl "CLIENT_ID" $.Values.fhir.clientId "SCOPE" $.Values.fhir.scope "KID" $.Values.fhir.kid "ALG" $.Values.fhir.alg }}
{{- if $value }}
- name: CPIS_FHIR_AUTH_{{ $name }}
  value: {{ $value | quote }}
{{- end }}
{{- end }}
{{- if and $.Values.fhir.existingSecret (eq $.Values.fhir.authMode "bearer") }}
- name: CPIS_FHIR_AUTH_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ $.Values.fhir.existingSecret }}
      key: {{ $.Values.fhir.tokenKey }}
{{- end }}
{{- if and $.Values.fhir.existingSecret (eq $.Values.fhir.authMode "client-secret") }}
- name: CPIS_FHIR_AUTH_CLIENT_SECRET
  valueFrom:
    secretKeyRef:
      name: {{ $.Values.fhir.existingSecret }}
      key: {{ $.Values.fhir.clientSecretKey }}
{{- end }}
{{- if and $.Values.fhir.existingSecret (eq $.Values.fhir.authMode "private-key-jwt") }}
- name: CPIS_FHIR_AUTH_PRIVATE_KEY_FILE
  value: /etc/cpis/fhir/{{ $.Values.fhir.privateKeyKey }}
{{- end }}
{{- end }}
- name: CPIS_DELIVERY_FIRST_RETRY_S
  value: {{ .Values.delivery.firstRetryS | quote }}
- name: CPIS_DELIVERY_MAX_BACKOFF_S
  value: {{ .Values.delivery.maxBackoffS | quote }}
- name: CPIS_DELIVERY_MAX_AGE_H
  value: {{ .Values.delivery.maxAgeH | quote }}
- name: CPIS_RETENTION_RECORD_DAYS
  value: {{ .Values.retention.recordDays | quote }}
- name: CPIS_RETENTION_ACCESS_DAYS
  value: {{ .Values.retention.accessDays | quote }}
- name: CPIS_RETENTION_INBOX_DAYS
  value: {{ .Values.retention.inboxDays | quote }}
- name: CPIS_RETENTION_AUDIT_DAYS
  value: {{ .Values.retention.auditDays | quote }}
- name: CPIS_LOG_LEVEL
  value: {{ .Values.logLevel | quote }}
- name: CPIS_LOG_FORMAT
  value: {{ .Values.logFormat | quote }}
- name: CPIS_DRAIN_DELAY_S
  value: {{ .Values.drainDelaySeconds | quote }}
- name: CPIS_SHUTDOWN_GRACE_S
  value: {{ .Values.shutdownGraceSeconds | quote }}
{{- with .Values.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- define "cpis.envFrom" -}}
{{- with .Values.secrets.webhookSecret }}
envFrom:
  - secretRef:
      name: {{ . }}
{{- end }}
{{- end -}}

{{- define "cpis.volumes" -}}
- name: tmp
  emptyDir:
    sizeLimit: {{ .Values.tmpSizeLimit }}
- name: registry
  configMap:
    name: {{ include "cpis.fullname" . }}-registry
{{- if and .Values.fhir.baseUrl .Values.fhir.existingSecret (eq .Values.fhir.authMode "private-key-jwt") }}
- name: fhir-key
  secret:
    secretName: {{ .Values.fhir.existingSecret }}
    defaultMode: 0400
    items:
      - key: {{ .Values.fhir.privateKeyKey }}
        path: {{ .Values.fhir.privateKeyKey }}
{{- end }}
{{- end -}}

{{- define "cpis.volumeMounts" -}}
- name: tmp
  mountPath: /tmp
- name: registry
  mountPath: /etc/cpis/registry.yaml
  subPath: registry.yaml
  readOnly: true
{{- if and .Values.fhir.baseUrl .Values.fhir.existingSecret (eq .Values.fhir.authMode "private-key-jwt") }}
- name: fhir-key
  mountPath: /etc/cpis/fhir
  readOnly: true
{{- end }}
{{- end -}}
