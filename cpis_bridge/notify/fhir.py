"""The FHIR channel: PUT [base]/Communication/{uuid5 of the notification id} (R4), status completed, subject the
NHS number, recipient the LA by ODS code, payload[0].contentAttachment the notification body as application/json."""

from __future__ import annotations

import base64
import uuid
from typing import Any, Final

import aiohttp
import orjson

from cpis_bridge.core.nhs import NhsNumber
from cpis_bridge.core.ports import DeliveryOutcome, DeliveryResult
from cpis_bridge.fhir.client import Auth, AuthFailed, NoAuth
from cpis_bridge.fhir.formats import JSON_CT
from cpis_bridge.notify.http import send

# Fixed (documented in the README): Communication.id = uuid5(NS_COMMUNICATION, notification id).
NS_COMMUNICATION: Final = uuid.UUID("6f1c2f4e-8a55-5b7e-9d3a-2b7c0c1d4e03")
NHS_SYSTEM: Final = "https://fhir.nhs.uk/Id/nhs-number"
ODS_SYSTEM: Final = "https://fhir.nhs.uk/Id/ods-organization-code"


def communication_id(notification_id: str) -> str:
    return str(uuid.uuid5(NS_COMMUNICATION, notification_id))


def communication(la: str, notification_id: str, nhs: NhsNumber, body: bytes, sent: str | None) -> dict[str, Any]:
    """The R4 Communication carrying one notification (built as plain JSON; tests validate it with R4B)."""
    resource: dict[str, Any] = {
        "resourceType": "Communication",
        "id": communication_id(notification_id),
        "identifier": [{"system": "urn:ietf:rfc:3986", "value": f"urn:uuid:{notification_id}"}],
        "status": "completed",
        "subject": {"identifier": {"system": NHS_SYSTEM, "value": nhs}},
        "recipient": [{"identifier": {"system": ODS_SYSTEM, "value": la}}],
        "payload": [
            {"contentAttachment": {"contentType": "application/json", "data": base64.b64encode(body).decode()}}
        ],
    }
    if sent:
        resource["sent"] = sent
    return resource


class FhirCommunicationChannel:
    name = "fhir"

    def __init__(
        self, session: aiohttp.ClientSession, base_url: str, *, auth: Auth | None = None, timeout_s: float = 10.0
    ) -> None:
        self.session = session
        self.base_url = base_url.rstrip("/")
        self.auth: Auth = auth or NoAuth()
        self.timeout_s = timeout_s

    async def deliver(self, la: str, notification_id: str, nhs: NhsNumber, body: bytes) -> DeliveryResult:
        sent = orjson.loads(body).get("createdAt")
        resource = orjson.dumps(communication(la, notification_id, nhs, body, sent))
        url = f"{self.base_url}/Communication/{communication_id(notification_id)}"
        try:
            authorization = await self.auth.header(self.session)
        except AuthFailed as exc:
            return DeliveryResult(DeliveryOutcome.TRANSIENT, None, None, f"token endpoint: {exc}")
        extra = {"Authorization": authorization} if authorization else {}

        def headers() -> dict[str, str]:
            return {"Content-Type": JSON_CT, "Accept": JSON_CT, **extra}

        result = await send(self.session, "PUT", url, resource, headers, self.timeout_s)
        if result.status == 401:
            self.auth.invalidate()  # a fresh token next time (the answer is retried like any other 4xx)
        return result
