"""A real third-party FHIR client (SMART's `fhirclient`, R4 models, synchronous: run in a thread) against the
service on a real port: capability statement, Flag and CareTeam searches parse with its models."""

from __future__ import annotations

import asyncio
from typing import Any

from fhirclient import client as fhir_client
from fhirclient.models.bundle import Bundle
from fhirclient.models.careteam import CareTeam
from fhirclient.models.flag import Flag
from fhirclient.models.organization import Organization

from cpis_bridge.app import KEYS, REDIS, create_app
from tests.support.world import ED, LA1, record

NHS_SYS = "https://fhir.nhs.uk/Id/nhs-number"
CHILD = "9990000018"


def run_client(base: str, headers: dict[str, str]) -> dict[str, Any]:
    smart = fhir_client.FHIRClient(settings={"app_id": "cpis-bridge-test", "api_base": base})
    smart.server.session.headers.update(headers)
    try:
        capability = smart.server.capabilityStatement  # fetched and parsed with fhirclient's R4 models
        flags = Flag.where(struct={"patient:identifier": f"{NHS_SYS}|{CHILD}"}).perform(smart.server)
        teams = CareTeam.where(struct={"patient:identifier": f"{NHS_SYS}|{CHILD}"}).perform(smart.server)
        return {"capability": capability, "flags": flags, "teams": teams}
    finally:
        smart.server.session.close()


async def test_fhirclient_searches_flags_and_careteams(aiohttp_server, aiohttp_client, settings):
    server = await aiohttp_server(create_app(settings))
    http = await aiohttp_client(server)
    r = await http.put("/v1/records/CASE-1", json=record(), headers=LA1)
    assert r.status == 201
    base = str(server.make_url("/fhir/"))
    out = await asyncio.wait_for(asyncio.to_thread(run_client, base, {**ED, "TraceID": "fhirclient-1"}), 30)
    assert out["capability"].fhirVersion == "4.0.1"
    flags: Bundle = out["flags"]
    assert flags.type == "searchset" and flags.total == 1
    [flag] = [e.resource for e in flags.entry]
    assert isinstance(flag, Flag) and flag.status == "active"
    assert flag.code.coding[0].code == "342191000000101"
    assert flag.subject.identifier.value == CHILD
    teams: Bundle = out["teams"]
    assert teams.total == 1
    resources = [e.resource for e in teams.entry]
    [team] = [r for r in resources if isinstance(r, CareTeam)]
    [org] = [r for r in resources if isinstance(r, Organization)]
    assert team.managingOrganization[0].reference == "Organization/LA001"
    assert sorted(c.telecom[0].value for c in org.contact) == ["0300 000 0001", "0300 000 0002"]
    keys = server.app[KEYS]
    history = await server.app[REDIS].lrange(keys.accesses(keys.tag(CHILD)), 0, -1)
    assert len(history) == 1  # Flag and CareTeam searches under one TraceID: one access
