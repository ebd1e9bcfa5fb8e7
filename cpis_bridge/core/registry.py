"""The organisations the service knows: local authorities (with contacts and notify channels) and care settings."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class WebhookChannel:
    url: str
    secret_env: str


@dataclass(frozen=True, slots=True)
class FhirChannel:
    base_url: str
    auth: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class LocalAuthority:
    ods: str
    name: str
    office_hours_phone: str
    emergency_duty_phone: str
    webhook: WebhookChannel | None = None
    fhir: FhirChannel | None = None


@dataclass(frozen=True, slots=True)
class CareSetting:
    ods: str
    name: str
    type: str
    unscheduled: bool


@dataclass(frozen=True, slots=True)
class CdsClient:
    iss: str
    jwks_url: str
    ods: str


@dataclass(frozen=True, slots=True)
class Registry:
    local_authorities: dict[str, LocalAuthority]
    care_settings: dict[str, CareSetting]
    cds_clients: dict[str, CdsClient] = field(default_factory=dict)

    def care_setting_names(self) -> dict[str, tuple[str, str]]:
        return {c.ods: (c.name, c.type) for c in self.care_settings.values()}
