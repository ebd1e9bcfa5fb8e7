"""Settings (pydantic-settings, prefix CPIS_): the only reader of the environment. docs/contract.md §1 is the list."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal, TypedDict

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from cpis_bridge.core.records import VisibilityWindows

BUNDLED_REGISTRY = Path(__file__).parent / "data" / "demo-registry.yaml"


class RedisSecrets(TypedDict):
    password: str | None
    sentinel_password: str | None


def _secret(value: SecretStr | None, file: Path | None) -> str | None:
    if value is not None:
        return value.get_secret_value() or None
    if file is not None:
        return file.read_text().strip() or None
    return None


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CPIS_", env_file=".env", extra="ignore")

    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    reuse_port: bool = False  # SO_REUSEPORT: set for its workers by ``serve --workers N`` (several on one port)
    redis_url: str | None = None  # redis://, rediss://, unix:// or redis+sentinel://h1:26379,h2:26379/<master>
    redis_max_connections: int = Field(64, ge=2)
    # High availability (docs/contract.md §1): passwords from the environment or a mounted file, never the URL
    redis_password: SecretStr | None = None
    redis_password_file: Path | None = None
    redis_sentinel_password: SecretStr | None = None  # the Sentinels' own (requirepass), when they have one
    redis_sentinel_password_file: Path | None = None
    redis_min_replicas: int = Field(0, ge=0)  # each write step waits until this many replicas hold it; 0 = no wait
    redis_replica_timeout_s: float = Field(1.0, gt=0)  # that wait's bound; shorter than CPIS_REDIS_TIMEOUT_S
    redis_confirm: Literal["wait", "waitaof"] = "wait"  # waitaof: replicas' AOF fsync, where the server has WAITAOF
    key_prefix: str = Field("cpis", pattern=r"^[A-Za-z0-9_.-]{1,32}$")
    data_dir: Path = Path("./var")
    registry: Path = BUNDLED_REGISTRY
    allow_embedded_redis: bool = False

    auth_jwks_url: str | None = None
    auth_issuer: str | None = None
    auth_audience: str | None = None
    auth_dev_secret: str | None = None

    fhir_base_url: str | None = None
    fhir_write_mode: Literal["auto", "id", "conditional"] = "auto"
    fhir_auth_mode: Literal["none", "bearer", "client-secret", "private-key-jwt"] = "none"
    fhir_auth_token: str | None = None
    fhir_auth_token_url: str | None = None
    fhir_auth_client_id: str | None = None
    fhir_auth_client_secret: str | None = None
    fhir_auth_private_key_file: Path | None = None
    fhir_auth_kid: str | None = None
    fhir_auth_alg: str = "RS384"
    fhir_auth_scope: str | None = None

    public_base_url: str | None = None
    upload_max_bytes: int = Field(128 * 1024 * 1024, ge=1)  # POST /v1/uploads body limit (docs/contract.md: 128 MiB)
    upload_max_end_fraction: float = Field(0.25, ge=0, le=1)  # a full upload ending more needs Upload-Confirm-End

    delivery_first_retry_s: float = Field(1.0, gt=0, lt=2)  # docs/contract.md §6: first retry within 2 s
    delivery_max_backoff_s: float = Field(60.0, gt=0)
    delivery_max_age_h: float = Field(72.0, gt=0)
    delivery_timeout_s: float = Field(10.0, gt=0)  # one HTTP attempt to a webhook or FHIR endpoint
    relays: bool = True
    relay_concurrency: int = Field(256, ge=1, le=4096)  # deliveries in flight per process
    relay_claim_idle_s: float = Field(60.0, gt=0)  # reclaim entries a consumer has held this long (> timeout)
    relay_reclaim_interval_s: float = Field(5.0, gt=0)
    delivery_endpoint_concurrency: int = Field(32, ge=1, le=1024)  # deliveries in flight per LA endpoint, per process
    delivery_breaker_failures: int = Field(5, ge=1)  # consecutive failures or timeouts that open an endpoint's breaker
    delivery_breaker_cooldown_s: float = Field(30.0, gt=0)  # open this long before one probe is let through

    retention_record_days: int = Field(90, ge=0)
    retention_access_days: int = Field(730, ge=0)
    retention_inbox_days: int = Field(90, ge=0)
    retention_audit_days: int = Field(2922, ge=0)

    log_hash_key: str | None = None
    log_level: str = "INFO"
    log_format: Literal["json", "text"] = "json"

    visible_days_after_end: int = Field(364, ge=0)
    ucpp_visible_days_after_end: int = Field(28, ge=0)
    test_numbers_only: bool | None = None  # default: true in dev mode

    web_session_idle_s: int = Field(900, ge=1)  # web views: a session ends after this long without a request
    web_signin_failures: int = Field(5, ge=1)  # failed sign-ins allowed per client address in 15 minutes
    web_launch_ttl_s: int = Field(600, ge=30, le=3600)  # a CDS card's SMART link (appContext) can launch this long
    web_signin_la_failures: int = Field(50, ge=1)  # failed sign-ins allowed per LA (all addresses) in 15 minutes

    shutdown_grace_s: float = Field(5.0, ge=0)
    drain_delay_s: float = Field(0.0, ge=0)

    request_deadline_s: float = Field(2.5, gt=0)  # /fhir and /cds-services: 503 + Retry-After past it
    api_request_deadline_s: float = Field(30.0, gt=0)  # every other route but /v1/uploads (exempt)
    redis_timeout_s: float = Field(2.0, gt=0)  # a look-up's wait for Redis; inside request_deadline_s

    @model_validator(mode="after")
    def _production_needs_issuer(self) -> Settings:
        if self.auth_jwks_url and not self.auth_issuer:
            raise ValueError("CPIS_AUTH_ISSUER is required when CPIS_AUTH_JWKS_URL is set")
        if self.auth_jwks_url and not self.auth_audience:
            raise ValueError(
                "CPIS_AUTH_AUDIENCE is required when CPIS_AUTH_JWKS_URL is set: without it a token "
                "issued for any other service would be accepted"
            )
        return self

    @model_validator(mode="after")
    def _store_waits_fit_the_deadline(self) -> Settings:
        if self.redis_timeout_s >= self.request_deadline_s:
            raise ValueError("CPIS_REDIS_TIMEOUT_S must be shorter than CPIS_REQUEST_DEADLINE_S")
        if self.redis_min_replicas and self.redis_replica_timeout_s >= self.redis_timeout_s:
            raise ValueError("CPIS_REDIS_REPLICA_TIMEOUT_S must be shorter than CPIS_REDIS_TIMEOUT_S")
        return self

    def redis_secrets(self) -> RedisSecrets:
        """The Redis and Sentinel passwords (for make_client): the variable, else the file's first line."""
        return {
            "password": _secret(self.redis_password, self.redis_password_file),
            "sentinel_password": _secret(self.redis_sentinel_password, self.redis_sentinel_password_file),
        }

    # -- derived --------------------------------------------------------------------------------------------
    @property
    def dev_mode(self) -> bool:
        return not self.auth_jwks_url

    @property
    def only_test_numbers(self) -> bool:
        return self.dev_mode if self.test_numbers_only is None else self.test_numbers_only

    @property
    def windows(self) -> VisibilityWindows:
        return VisibilityWindows(self.visible_days_after_end, self.ucpp_visible_days_after_end)

    @property
    def base_url(self) -> str:
        return (self.public_base_url or f"http://{self.host}:{self.port}").rstrip("/")

    @property
    def redis_socket(self) -> Path:
        return self.data_dir.resolve() / "redis.sock"

    @staticmethod
    def env_secret(name: str) -> str | None:
        """A secret the registry names by environment variable (webhook secrets, FHIR tokens)."""
        return os.environ.get(name) or None
