"""Loads and validates the registry YAML (docs/contract.md §7) into core types; errors name file, entry and field."""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from cpis_bridge.core.registry import (
    END_OF_DAY,
    WEEKDAYS,
    CareSetting,
    CdsClient,
    FhirChannel,
    LocalAuthority,
    OfficeHours,
    OidcSignIn,
    Origin,
    Registry,
    SmartLaunch,
    WebhookChannel,
    Weekday,
    origin_of,
)

_ODS = r"^[A-Z0-9]{3,10}$"
_HHMM = r"^([01][0-9]|2[0-3]):[0-5][0-9]$|^24:00$"


class RegistryError(ValueError):
    """The registry file is missing or invalid; the message names the file, the entry and the field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class _Webhook(_Strict):
    url: str = Field(pattern=r"^https?://")
    secret_env: str = Field(alias="secretEnv", pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")


class _Fhir(_Strict):
    base_url: str = Field(alias="baseUrl", pattern=r"^https?://")
    auth: dict[str, str] = Field(default_factory=dict)


class _Notify(_Strict):
    webhook: _Webhook | None = None
    fhir: _Fhir | None = None


def _clock(text: str) -> dt.time:
    return END_OF_DAY if text == "24:00" else dt.time.fromisoformat(text)


class _OfficeHours(_Strict):
    """When the office-hours number is staffed (Europe/London); default Monday-Friday 09:00-17:00, closed on
    England bank holidays."""

    days: list[Weekday] = Field(default_factory=lambda: list(WEEKDAYS[:5]))
    opens: str = Field(alias="open", default="09:00", pattern=_HHMM)
    closes: str = Field(alias="close", default="17:00", pattern=_HHMM)
    bank_holidays: Literal["closed", "open"] = Field(alias="bankHolidays", default="closed")

    @model_validator(mode="after")
    def _open_before_close(self) -> _OfficeHours:
        if _clock(self.opens) >= _clock(self.closes):
            raise ValueError(f"open ({self.opens}) must be before close ({self.closes})")
        return self

    def build(self) -> OfficeHours:
        return OfficeHours(
            frozenset(WEEKDAYS.index(d) for d in self.days),
            _clock(self.opens),
            _clock(self.closes),
            self.bank_holidays == "open",
        )


_LOOPBACK = frozenset({"127.0.0.1", "localhost", "::1"})


class _SignIn(_Strict):
    """The LA's OpenID Connect provider for the web views (README, web views)."""

    issuer: str = Field(min_length=1, max_length=500)
    client_id: str = Field(alias="clientId", min_length=1, max_length=200)
    client_secret_env: str | None = Field(alias="clientSecretEnv", default=None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    client_secret_file: str | None = Field(alias="clientSecretFile", default=None, min_length=1)
    claim: str = Field(min_length=1, max_length=100)
    value: str = Field(min_length=1, max_length=200)
    scopes: list[str] = Field(default_factory=lambda: ["openid", "profile"])

    @field_validator("issuer")
    @classmethod
    def _https(cls, v: str) -> str:
        origin = origin_of(v)
        if origin is None:
            raise ValueError(f"{v[:100]!r} is not an http(s) URL with a host")
        if origin[0] != "https" and origin[1] not in _LOOPBACK:
            raise ValueError("the issuer must be an https URL (http only on this machine, for tests)")
        return v.rstrip("/")

    @field_validator("scopes")
    @classmethod
    def _openid(cls, v: list[str]) -> list[str]:
        if "openid" not in v:
            raise ValueError("scopes must include openid")
        return v

    @model_validator(mode="after")
    def _one_secret(self) -> _SignIn:
        if (self.client_secret_env is None) == (self.client_secret_file is None):
            raise ValueError("give exactly one of clientSecretEnv and clientSecretFile (the secret is never here)")
        return self

    def build(self) -> OidcSignIn:
        return OidcSignIn(
            issuer=self.issuer,
            client_id=self.client_id,
            claim=self.claim,
            value=self.value,
            client_secret_env=self.client_secret_env,
            client_secret_file=self.client_secret_file,
            scopes=tuple(self.scopes),
        )


class _LA(_Strict):
    ods: str = Field(pattern=_ODS)
    name: str = Field(min_length=1, max_length=200)
    office_hours_phone: str = Field(alias="officeHoursPhone", min_length=3, max_length=40)
    emergency_duty_phone: str = Field(alias="emergencyDutyPhone", min_length=3, max_length=40)
    office_hours: _OfficeHours = Field(alias="officeHours", default_factory=_OfficeHours)
    notify: _Notify | None = None
    sign_in: _SignIn | None = Field(alias="signIn", default=None)


def _origins(urls: list[str]) -> list[str]:
    for url in urls:
        if origin_of(url) is None:
            raise ValueError(f"{url[:100]!r} is not an http(s) URL with a host")
    return urls


class _Smart(_Strict):
    """The clinician view's SMART EHR launch (docs/contract.md §7): issuers are FHIR base URLs, compared exactly."""

    client_id: str = Field(alias="clientId", min_length=1, max_length=200)
    issuers: list[str] = Field(min_length=1)
    frame_origins: list[str] = Field(alias="frameOrigins", default_factory=list)

    _check_issuers = field_validator("issuers")(_origins)

    @field_validator("frame_origins")
    @classmethod
    def _bare_origins(cls, urls: list[str]) -> list[str]:
        for url in _origins(urls):
            parts = urlsplit(url)
            if parts.path not in ("", "/") or parts.query or parts.fragment:
                raise ValueError(f"{url[:100]!r} must be an origin only (scheme://host[:port])")
        return [_origin_text(u) for u in urls]

    def build(self) -> SmartLaunch:
        return SmartLaunch(self.client_id, frozenset(i.rstrip("/") for i in self.issuers), tuple(self.frame_origins))


def _origin_text(url: str) -> str:
    origin = origin_of(url)
    assert origin is not None
    scheme, host, port = origin
    default = {"http": 80, "https": 443}[scheme]
    return f"{scheme}://{host}" + ("" if port == default else f":{port}")


class _CareSetting(_Strict):
    ods: str = Field(pattern=_ODS)
    name: str = Field(min_length=1, max_length=200)
    type: str = Field(min_length=1, max_length=20)
    unscheduled: bool
    fhir_servers: list[str] = Field(alias="fhirServers", default_factory=list)
    smart_launch: _Smart | None = Field(alias="smartLaunch", default=None)

    _check_origins = field_validator("fhir_servers")(_origins)

    @field_validator("type")
    @classmethod
    def _upper(cls, v: str) -> str:
        return v.upper()


class _Cds(_Strict):
    iss: str = Field(min_length=1)
    jwks_url: str = Field(alias="jwksUrl", pattern=r"^https?://")
    ods: str = Field(pattern=_ODS)
    fhir_servers: list[str] = Field(alias="fhirServers", default_factory=list)

    _check_origins = field_validator("fhir_servers")(_origins)


def _origin_set(urls: list[str]) -> frozenset[Origin]:
    return frozenset(o for o in map(origin_of, urls) if o is not None)


class _File(_Strict):
    local_authorities: list[_LA] = Field(alias="localAuthorities", default_factory=list)
    care_settings: list[_CareSetting] = Field(alias="careSettings", default_factory=list)
    cds_clients: list[_Cds] = Field(alias="cdsClients", default_factory=list)


_SECTION = {"localAuthorities": "local authority", "careSettings": "care setting", "cdsClients": "CDS client"}


def _describe(err: dict[str, Any], raw: dict[str, Any]) -> str:
    loc = list(err["loc"])
    where = ".".join(str(p) for p in loc)
    if len(loc) >= 2 and loc[0] in _SECTION and isinstance(loc[1], int):
        entries = raw.get(str(loc[0])) or []
        entry = entries[loc[1]] if loc[1] < len(entries) else {}
        ods = entry.get("ods") if isinstance(entry, dict) else None
        label = f"{_SECTION[str(loc[0])]} #{loc[1] + 1}" + (f" ({ods})" if ods else "")
        fld = ".".join(str(p) for p in loc[2:]) or "(entry)"
        return f"{label}, field {fld}: {err['msg']}"
    return f"{where}: {err['msg']}"


def load_registry(path: Path) -> Registry:
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RegistryError(f"{path}: registry file not found") from None
    except yaml.YAMLError as exc:
        raise RegistryError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise RegistryError(f"{path}: the top level must be a mapping with localAuthorities and careSettings")
    try:
        parsed = _File.model_validate(raw)
    except ValidationError as exc:
        lines = [_describe(dict(e), raw) for e in exc.errors()]
        raise RegistryError(f"{path}: " + "; ".join(lines)) from None

    problems: list[str] = []
    las: dict[str, LocalAuthority] = {}
    for i, la in enumerate(parsed.local_authorities):
        if la.ods in las:
            problems.append(f"local authority #{i + 1} ({la.ods}), field ods: duplicate ODS code")
        notify = la.notify or _Notify()
        las[la.ods] = LocalAuthority(
            ods=la.ods,
            name=la.name,
            office_hours_phone=la.office_hours_phone,
            emergency_duty_phone=la.emergency_duty_phone,
            webhook=WebhookChannel(notify.webhook.url, notify.webhook.secret_env) if notify.webhook else None,
            fhir=FhirChannel(notify.fhir.base_url, dict(notify.fhir.auth)) if notify.fhir else None,
            office_hours=la.office_hours.build(),
            sign_in=la.sign_in.build() if la.sign_in else None,
        )
    settings: dict[str, CareSetting] = {}
    for i, cs in enumerate(parsed.care_settings):
        if cs.ods in settings or cs.ods in las:
            problems.append(f"care setting #{i + 1} ({cs.ods}), field ods: duplicate ODS code")
        smart = cs.smart_launch.build() if cs.smart_launch is not None else None
        settings[cs.ods] = CareSetting(cs.ods, cs.name, cs.type, cs.unscheduled, _origin_set(cs.fhir_servers), smart)
    clients: dict[str, str] = {}  # SMART issuer -> the client id registered with it
    for i, cs in enumerate(parsed.care_settings):
        launch = cs.smart_launch
        for iss in launch.issuers if launch is not None else []:
            assert launch is not None
            if clients.setdefault(iss.rstrip("/"), launch.client_id) != launch.client_id:
                problems.append(
                    f"care setting #{i + 1} ({cs.ods}), field smartLaunch.clientId: {iss[:100]} is registered "
                    "with another clientId by another care setting (one EHR, one client)"
                )
    cds: dict[str, CdsClient] = {}
    for i, c in enumerate(parsed.cds_clients):
        if c.ods not in settings:
            problems.append(f"CDS client #{i + 1} ({c.iss}), field ods: {c.ods} is not a registered care setting")
        cds[c.iss] = CdsClient(c.iss, c.jwks_url, c.ods, _origin_set(c.fhir_servers))
    if problems:
        raise RegistryError(f"{path}: " + "; ".join(problems))
    return Registry(las, settings, cds)


def webhook_secret_problems(registry: Registry, environ: dict[str, str]) -> list[str]:
    """Webhook channels whose secret is missing from the environment or not a ``whsec_`` secret."""
    out = []
    for la in registry.local_authorities.values():
        if la.webhook is None:
            continue
        value = environ.get(la.webhook.secret_env, "")
        if not re.fullmatch(r"whsec_[A-Za-z0-9+/=]+", value):
            out.append(f"local authority {la.ods}: {la.webhook.secret_env} must hold a whsec_ secret")
    return out


def sign_in_secret(sign_in: OidcSignIn, env: Callable[[str], str | None]) -> str | None:
    """The client secret of an LA's sign-in: from the environment variable (``env`` looks it up) or the file the
    registry names."""
    if sign_in.client_secret_env:
        return env(sign_in.client_secret_env) or None
    assert sign_in.client_secret_file is not None
    try:
        return Path(sign_in.client_secret_file).read_text(encoding="utf-8").strip() or None
    except OSError:
        return None


def sign_in_secret_problems(registry: Registry, env: Callable[[str], str | None]) -> list[str]:
    """LAs whose sign-in client secret cannot be read (the service refuses to start)."""
    out = []
    for la in registry.local_authorities.values():
        if la.sign_in is not None and sign_in_secret(la.sign_in, env) is None:
            where = la.sign_in.client_secret_env or la.sign_in.client_secret_file
            out.append(f"local authority {la.ods}: the sign-in client secret ({where}) is missing or empty")
    return out
