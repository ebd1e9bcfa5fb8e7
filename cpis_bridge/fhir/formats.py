"""FHIR wire formats of the care-setting API: which one a request asks for (``_format`` over ``Accept``) and FHIR
XML rendered from the JSON dicts with fhir.resources R4B. JSON stays dict + orjson; XML is built only when asked."""

from __future__ import annotations

import re
from typing import Any, Final, Literal

import orjson
from fhir.resources.R4B import get_fhir_model_class
from lxml import etree

Format = Literal["json", "xml"]
JSON_CT: Final = "application/fhir+json"
XML_CT: Final = "application/fhir+xml"
CONTENT_TYPES: Final[dict[str, str]] = {"json": JSON_CT, "xml": XML_CT}

# _format values (FHIR http.html#mime-type) and Accept media types we serve; "+" may arrive decoded as a space.
_FORMAT_VALUES: Final[dict[str, Format]] = {
    "json": "json",
    "application/json": "json",
    "application/fhir+json": "json",
    "application/json+fhir": "json",
    "text/json": "json",
    "xml": "xml",
    "application/xml": "xml",
    "application/fhir+xml": "xml",
    "application/xml+fhir": "xml",
    "text/xml": "xml",
}
_ANY: Final = frozenset({"*/*", "application/*"})
_JSON_AT_ONCE: Final = frozenset(
    {
        "",
        "*/*",
        "application/fhir+json",
        "application/json",
        "application/json, */*",
        "application/fhir+json, application/json",
    }
)


class NotAcceptable(ValueError):
    """No format the client accepts is served (406)."""


def _media(value: str) -> str:
    return value.split(";", 1)[0].strip().lower().replace(" ", "+")


def negotiate(format_param: str | None, accept: str | None) -> Format:
    """``_format`` wins over ``Accept``; no preference, ``*/*`` and the JSON types mean JSON. Raises NotAcceptable."""
    if format_param is not None:
        fmt = _FORMAT_VALUES.get(_media(format_param))
        if fmt is None:
            raise NotAcceptable("_format: only json and xml are served")
        return fmt
    if accept is None or accept in _JSON_AT_ONCE:
        return "json"  # what almost every client sends, decided without parsing
    best: tuple[float, int, Format] | None = None
    for part in accept.split(","):
        media, *params = part.split(";")
        quality = 1.0
        for param in params:
            name, _, value = param.strip().partition("=")
            if name.strip().lower() == "q":
                try:
                    quality = float(value)
                except ValueError:
                    quality = 0.0
        kind = _media(media)
        fmt = "json" if kind in _ANY else _FORMAT_VALUES.get(kind)
        if fmt is None or quality <= 0:
            continue
        rank = (quality, 1 if fmt == "json" else 0, fmt)  # equal quality: JSON
        if best is None or rank > best:
            best = rank
    if best is None:
        if not accept.strip():
            return "json"
        raise NotAcceptable("Accept: only application/fhir+json and application/fhir+xml are served")
    return best[2]


# Characters XML 1.0 cannot carry at all (JSON can): a token's name claim or an echoed element name may hold them.
_NOT_XML: Final = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")


def _xml_safe(value: Any) -> Any:
    if isinstance(value, str):
        return _NOT_XML.sub("\ufffd", value)
    if isinstance(value, dict):
        return {k: _xml_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_xml_safe(v) for v in value]
    return value


def render(body: dict[str, Any], fmt: str) -> bytes:
    """The resource as bytes in ``fmt``. XML goes through the R4B model, so what is sent is valid FHIR XML."""
    if fmt == "json":
        return orjson.dumps(body)
    model = get_fhir_model_class(body["resourceType"]).model_validate(_xml_safe(body))
    xml: str | bytes = model.model_dump_xml(xml_declaration=True)
    return xml if isinstance(xml, bytes) else xml.encode()


def parse_xml(data: bytes, resource_type: str) -> dict[str, Any]:
    """A FHIR XML body as the JSON dict the handlers read. Raises ValueError when it is not that resource."""
    try:
        model = get_fhir_model_class(resource_type).model_validate_xml(data)
    except etree.LxmlError as exc:  # not XML at all (pydantic's own errors are ValueErrors already)
        raise ValueError(str(exc)) from None
    out: dict[str, Any] = orjson.loads(model.model_dump_json())
    return out
