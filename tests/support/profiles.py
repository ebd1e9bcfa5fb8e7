"""Conformance checks for the tests (only tests use them): R4 validation with fhir.resources R4B, and a checker of an
instance against a StructureDefinition's differential (cardinality, fixed/pattern values, required bindings, slices)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fhir.resources.R4B import get_fhir_model_class


def validate_r4(resource: dict[str, Any]) -> Any:
    """Parse ``resource`` with the fhir.resources R4B model of its type (raises pydantic.ValidationError)."""
    return get_fhir_model_class(resource["resourceType"]).model_validate(resource)


ValueSets = dict[str, set[tuple[str | None, str]]]
_SINGLE = ("fixed", "pattern")


def load_definitions(folder: Path) -> tuple[dict[str, dict[str, Any]], ValueSets]:
    """StructureDefinitions by canonical url, and ValueSets (explicit concepts) by url, from a folder of JSON files."""
    sds: dict[str, dict[str, Any]] = {}
    valuesets: ValueSets = {}
    for path in sorted(folder.glob("*.json")):
        res = json.loads(path.read_text(encoding="utf-8"))
        if res.get("resourceType") == "StructureDefinition":
            sds[res["url"]] = res
        elif res.get("resourceType") == "ValueSet":
            codes: set[tuple[str | None, str]] = set()
            for inc in res.get("compose", {}).get("include", []):
                for concept in inc.get("concept", []):
                    codes.add((inc.get("system"), concept["code"]))
            valuesets[res["url"]] = codes
    return sds, valuesets


def _children(node: Any, name: str) -> list[Any]:
    if not isinstance(node, dict) or node.get(name) is None:
        return []
    value = node[name]
    return list(value) if isinstance(value, list) else [value]


def matches(value: Any, pattern: Any) -> bool:
    """FHIR pattern semantics: every property of the pattern is present with a matching value (lists: each pattern
    item matches some value item)."""
    if isinstance(pattern, dict):
        return isinstance(value, dict) and all(matches(value.get(k), v) for k, v in pattern.items())
    if isinstance(pattern, list):
        return isinstance(value, list) and all(any(matches(v, p) for v in value) for p in pattern)
    return bool(value == pattern)


def _constraint(el: dict[str, Any], kind: str) -> tuple[bool, Any]:
    for key, value in el.items():
        if key.startswith(kind) and key != kind:
            return True, value
    return False, None


def _in_valueset(value: Any, codes: set[tuple[str | None, str]]) -> bool:
    if isinstance(value, str):
        return any(code == value for _, code in codes)
    if isinstance(value, dict) and "coding" in value:
        return any(_in_valueset(c, codes) for c in value.get("coding") or [])
    if isinstance(value, dict) and "code" in value:
        return (value.get("system"), value["code"]) in codes
    return False


def check_differential(instance: dict[str, Any], sd: dict[str, Any], valuesets: ValueSets) -> list[str]:
    """Problems of ``instance`` against ``sd``'s differential: min/max cardinality (per parent), fixed[x] and
    pattern[x] values, required bindings to ValueSets in ``valuesets``, and slices (discriminator type pattern/value
    on ``$this`` or a child path). An empty list means the instance conforms to what the differential says."""
    if instance.get("resourceType") != sd["type"]:
        return [f"resourceType {instance.get('resourceType')} is not {sd['type']}"]
    by_id = {el.get("id", el["path"]): el for el in sd["differential"]["element"]}
    problems: list[str] = []

    def slice_filter(prefix: str, slice_name: str, items: list[Any]) -> list[Any]:
        slicing = by_id.get(prefix, {}).get("slicing") or {}
        disc = (slicing.get("discriminator") or [{"path": "$this"}])[0]["path"]
        pat_el = by_id.get(f"{prefix}:{slice_name}" + ("" if disc == "$this" else f".{disc}"), {})
        found, pattern = _constraint(pat_el, "pattern")
        if not found:
            found, pattern = _constraint(pat_el, "fixed")
        if not found:
            raise ValueError(f"slice {prefix}:{slice_name} has no discriminating pattern")

        def disc_values(item: Any) -> list[Any]:
            nodes = [item]
            for part in [] if disc == "$this" else disc.split("."):
                nodes = [c for n in nodes for c in _children(n, part)]
            return nodes

        return [i for i in items if any(matches(v, pattern) for v in disc_values(i))]

    def resolve(segments: list[str], prefix: str, nodes: list[Any]) -> list[tuple[Any, list[Any]]]:
        """(parent, items) pairs for the last segment, slice filters applied along the way."""
        head, _, slice_name = segments[0].partition(":")
        here = f"{prefix}.{head}"
        pairs = []
        for node in nodes:
            items = _children(node, head)
            if slice_name:
                items = slice_filter(here, slice_name, items)
            pairs.append((node, items))
        if len(segments) == 1:
            return pairs
        nxt = here + (f":{slice_name}" if slice_name else "")
        return resolve(segments[1:], nxt, [i for _, items in pairs for i in items])

    for eid, el in by_id.items():
        segments = eid.split(".")
        if len(segments) == 1:
            continue
        pairs = resolve(segments[1:], segments[0], [instance])
        lo = int(el.get("min", 0))
        hi_raw = el.get("max", "*")
        hi = None if hi_raw == "*" else int(hi_raw)
        for _, items in pairs:
            if len(items) < lo:
                problems.append(f"{eid}: {len(items)} found, at least {lo} required")
            if hi is not None and len(items) > hi:
                problems.append(f"{eid}: {len(items)} found, at most {hi} allowed")
            for item in items:
                found, fixed = _constraint(el, "fixed")
                if found and item != fixed:
                    problems.append(f"{eid}: {item!r} is not the fixed value {fixed!r}")
                found, pattern = _constraint(el, "pattern")
                if found and not matches(item, pattern):
                    problems.append(f"{eid}: {item!r} does not match the pattern {pattern!r}")
                binding = el.get("binding") or {}
                if binding.get("strength") == "required" and binding.get("valueSet") in valuesets:
                    if not _in_valueset(item, valuesets[binding["valueSet"]]):
                        problems.append(f"{eid}: {item!r} is not in {binding['valueSet']}")
    return problems


def conformance_problems(resource: dict[str, Any], sds: dict[str, dict[str, Any]], valuesets: ValueSets) -> list[str]:
    """Check ``resource`` (and, for a Bundle, every entry) against each of its meta.profile found in ``sds``."""
    problems: list[str] = []
    if resource.get("resourceType") == "Bundle":
        for entry in resource.get("entry") or []:
            problems += conformance_problems(entry["resource"], sds, valuesets)
        return problems
    for url in (resource.get("meta") or {}).get("profile") or []:
        if url in sds:
            problems += [
                f"{resource['resourceType']}/{resource.get('id')}: {p}"
                for p in check_differential(resource, sds[url], valuesets)
            ]
    return problems
