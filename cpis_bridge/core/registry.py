"""The organisations the service knows: local authorities (with contacts, office hours, notify channels and the
identity provider their people sign in with), care settings and CDS clients; and whether an LA's office is open at a
given instant (which of its numbers to ring)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Final, Literal, TypeAlias
from urllib.parse import urlsplit

import holidays

from cpis_bridge.core.clock import LONDON

Weekday: TypeAlias = Literal["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"]
WEEKDAYS: Final[tuple[Weekday, ...]] = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
END_OF_DAY: Final = dt.time.max  # "24:00": open until midnight


@lru_cache(maxsize=64)
def bank_holidays(year: int) -> frozenset[dt.date]:
    """England's bank holidays in ``year`` (the holidays package; built once per year, it is not cheap)."""
    return frozenset(holidays.country_holidays("GB", subdiv="ENG", years=year))


@dataclass(frozen=True, slots=True)
class OfficeHours:
    """When an LA's office-hours line is staffed, in Europe/London local time; outside it, ring emergency duty.

    ``days`` are ISO weekday numbers less one (Monday 0). ``open_on_bank_holidays`` False closes every England bank
    holiday. An instant is open when its local day is listed and open <= local time < close."""

    days: frozenset[int] = frozenset(range(5))
    opens: dt.time = dt.time(9, 0)
    closes: dt.time = dt.time(17, 0)
    open_on_bank_holidays: bool = False

    def open_at(self, now: dt.datetime) -> bool:
        local = now.astimezone(LONDON)
        if local.weekday() not in self.days:
            return False
        if not self.opens <= local.time() < self.closes:
            return False
        return self.open_on_bank_holidays or local.date() not in bank_holidays(local.year)


DEFAULT_OFFICE_HOURS: Final = OfficeHours()


def office_open(hours: OfficeHours, now: dt.datetime) -> bool:
    """``hours.open_at(now)`` on the look-up path: answered once per UTC minute per set of hours (office hours start
    and end on whole minutes, and the registry accepts only HH:MM), so a search costs a cache look-up, not a
    time-zone conversion."""
    return _open_in_minute(hours, int(now.timestamp()) // 60)


@lru_cache(maxsize=1024)
def _open_in_minute(hours: OfficeHours, minute: int) -> bool:
    return hours.open_at(dt.datetime.fromtimestamp(minute * 60, dt.UTC))


Origin = tuple[str, str, int]  # scheme, host (lower case), port
_DEFAULT_PORTS: Final = {"http": 80, "https": 443}


def origin_of(url: str) -> Origin | None:
    """scheme://host:port of an http(s) URL (the default port filled in); None when it is not one."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return None
    if parts.scheme not in _DEFAULT_PORTS or not parts.hostname or parts.username is not None:
        return None
    return parts.scheme, parts.hostname, port or _DEFAULT_PORTS[parts.scheme]


@dataclass(frozen=True, slots=True)
class WebhookChannel:
    url: str
    secret_env: str


@dataclass(frozen=True, slots=True)
class FhirChannel:
    base_url: str
    auth: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class OidcSignIn:
    """How an LA's people sign in to the web views: the LA's own OpenID Connect provider (``issuer``), this
    service's client there, where its secret is kept (an environment variable or a file: never the registry), and
    the ID token claim that says a person belongs to the LA (``claim`` holding ``value``, or a list containing it)."""

    issuer: str
    client_id: str
    claim: str
    value: str
    client_secret_env: str | None = None
    client_secret_file: str | None = None
    scopes: tuple[str, ...] = ("openid", "profile")

    def admits(self, claims: Mapping[str, object]) -> bool:
        """Whether the ID token's claims map the person to this LA."""
        got = claims.get(self.claim)
        if isinstance(got, str):
            return got == self.value
        if isinstance(got, list | tuple):
            return any(isinstance(g, str) and g == self.value for g in got)
        return False


@dataclass(frozen=True, slots=True)
class LocalAuthority:
    ods: str
    name: str
    office_hours_phone: str
    emergency_duty_phone: str
    webhook: WebhookChannel | None = None
    fhir: FhirChannel | None = None
    office_hours: OfficeHours = DEFAULT_OFFICE_HOURS
    sign_in: OidcSignIn | None = None


@dataclass(frozen=True, slots=True)
class SmartLaunch:
    """How a care setting's EHR launches the clinician view (SMART App Launch, EHR launch): the FHIR servers
    (``iss``, exactly as the EHR sends it) it launches from, the client id the EHR registered for us, and the EHR
    origins allowed to frame the view (CSP frame-ancestors)."""

    client_id: str
    issuers: frozenset[str]
    frame_origins: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class CareSetting:
    ods: str
    name: str
    type: str
    unscheduled: bool
    fhir_servers: frozenset[Origin] = frozenset()  # where its own CDS calls' fhirServer may point
    smart: SmartLaunch | None = None  # the clinician view's SMART launch from this setting's EHR, if registered


@dataclass(frozen=True, slots=True)
class CdsClient:
    """A production CDS Hooks caller: its token issuer, keys, the care setting it speaks for, and the FHIR servers
    (origins) its hook calls may name as fhirServer: no other is ever sent its access token."""

    iss: str
    jwks_url: str
    ods: str
    fhir_servers: frozenset[Origin] = frozenset()


@dataclass(frozen=True, slots=True)
class Registry:
    local_authorities: dict[str, LocalAuthority]
    care_settings: dict[str, CareSetting]
    cds_clients: dict[str, CdsClient] = field(default_factory=dict)

    def smart_settings(self, iss: str) -> list[CareSetting]:
        """The care settings whose EHR may launch the clinician view from FHIR server ``iss``."""
        return [c for c in self.care_settings.values() if c.smart is not None and iss in c.smart.issuers]

    def care_setting_names(self) -> dict[str, tuple[str, str]]:
        return {c.ods: (c.name, c.type) for c in self.care_settings.values()}
