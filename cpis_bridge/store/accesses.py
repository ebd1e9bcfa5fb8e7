"""Access storage: the one-round-trip lookup that records an access and queues notifications (access.lua),
the child's last 25 accesses, retained Encounters."""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from functools import lru_cache
from typing import Any

import orjson
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from cpis_bridge.core.access import (
    NS_NOTIFICATION_BYTES,
    Access,
    Unreadable,
    ignore_unreadable,
    readable_accesses,
)
from cpis_bridge.core.nhs import NhsNumber
from cpis_bridge.core.ports import LookupOutcome, LookupStatus
from cpis_bridge.core.records import Record, VisibilityWindows
from cpis_bridge.store.connection import Lane, Multiplexed, StoreDown, failover_reply
from cpis_bridge.store.keys import Keys
from cpis_bridge.store.records import decode_field, decode_fields
from cpis_bridge.store.replicas import Command
from cpis_bridge.store.scripts import Scripts, run_scripts

# The look-up path decodes the same stored records again and again (a child is looked up several times per
# attendance); a stored value changes with every write (it carries its version), so it is its own cache key.
_decoded = lru_cache(maxsize=4096)(decode_field)


def _as_dict(value: Mapping[str, Any]) -> dict[str, Any]:
    return value if type(value) is dict else dict(value)


class RedisAccessStore:
    def __init__(
        self,
        redis: Redis,
        keys: Keys,
        scripts: Scripts,
        *,
        encounter_ttl_s: int,
        push_las: Iterable[str] = (),
        unreadable: Unreadable = ignore_unreadable,
        timeout: float = 10.0,
    ) -> None:
        """``push_las``: the LAs with a webhook or FHIR channel; only their notifications go to the delivery queue
        (every LA's goes to its pull inbox, indexed, in the same step). ``unreadable`` is told of each stored item a
        read skips because it cannot be decoded. ``timeout``: how long a look-up waits for Redis (inside the
        request's deadline)."""
        self.redis = redis
        self.unreadable = unreadable
        self.push_las = "," + ",".join(sorted(push_las)) + ","
        self.keys = keys
        self.scripts = scripts
        self.encounter_ttl_s = encounter_ttl_s
        self.lane = Multiplexed(redis, timeout=timeout)
        # With replicas to wait for, each look-up's script, fence and WAIT share a connection of their own (a WAIT
        # on the shared connection would hold every look-up behind it).
        self.confirmed = Lane(redis, size=64, timeout=timeout) if scripts.replicas.enabled else None

    async def aclose(self) -> None:
        await self.lane.aclose()
        if self.confirmed is not None:
            await self.confirmed.aclose()

    async def lookup(
        self,
        nhs: NhsNumber,
        *,
        today_day: int,
        windows: VisibilityWindows,
        record_access: Access | None,
        audit_with: Mapping[str, Any],
        audit_without: Mapping[str, Any],
        encounter: Mapping[str, Any] | None = None,
        recent: bool = False,
    ) -> LookupOutcome:
        k = self.keys
        tag = k.tag(nhs)
        # The access id (a uuid5) names a retained Encounter's key and rides on the notification queue entries.
        access_id = record_access.access_id(tag) if record_access is not None else ""
        keep = encounter is not None and record_access is not None
        out = await self._eval_access(
            k.records(tag),
            k.accesses(tag),
            k.audit(tag),
            k.notify_queue,
            k.care_settings,
            k.encounter(access_id or "none"),
            today_day,
            windows.after_end_days,
            windows.ucpp_after_end_days,
            "1" if record_access is not None else "0",
            record_access.encode() if record_access is not None else "",
            record_access.idempotency_prefix if record_access is not None else "",
            int(time.time() * 1000),
            orjson.dumps(_as_dict(audit_with)),
            orjson.dumps(_as_dict(audit_without)),
            k.inbox(""),
            orjson.dumps(_as_dict(encounter)) if encounter is not None and keep else "",
            nhs,
            tag,
            self.encounter_ttl_s,
            access_id,
            self.push_las,
            NS_NOTIFICATION_BYTES,
            "1" if recent else "0",
        )
        status, existing = LookupStatus(int(out[0])), out[1]
        records = [_decoded(out[i], out[i + 1]) for i in range(3, len(out), 2)]
        access: Access | None = None
        if status == LookupStatus.RECORDED and record_access is not None:
            access = record_access
        elif status == LookupStatus.REPEAT:
            access = Access.decode(existing)
            access_id = access.access_id(tag)
        else:
            access_id = ""
        return LookupOutcome(
            records, status, access, access_id or None, [Access.decode(a) for a in out[2]] if out[2] else []
        )

    async def _eval_access(self, *keys_and_args: Any) -> Any:
        """EVALSHA of access.lua on the hot-path lane (redis-py's Script wrapper costs more per call than the
        script's own work); after NOSCRIPT, EVAL sends it on the same lane."""
        call = [(keys_and_args[:6], keys_and_args[6:])]
        if self.confirmed is not None:
            return await self._eval_confirmed(call)
        [result] = await run_scripts(self._send, self.scripts.access, call)
        if isinstance(result, ResponseError):
            if failover_reply(result):  # a demoted or fenced primary (without Sentinel to follow): 503, not 500
                raise StoreDown("Redis refused the write: not a primary with enough replicas") from result
            raise result
        return result

    async def _send(self, commands: list[Command]) -> list[Any]:
        """One command on the shared lane, its error reply in its place (for run_scripts)."""
        try:
            return [await self.lane.call(*commands[0])]
        except ResponseError as exc:
            return [exc]

    async def _eval_confirmed(self, call: Sequence[tuple[Sequence[Any], Sequence[Any]]]) -> Any:
        """The look-up, its access and notifications acknowledged only once CPIS_REDIS_MIN_REPLICAS replicas hold
        them (store/replicas.py); a retry with the same event id finds the access already recorded (status 2)."""
        assert self.confirmed is not None
        replicas = self.scripts.replicas

        def check(out: list[Any]) -> None:
            if isinstance(out[0], BaseException):
                replicas.refused(out[0])
            replicas.check(out)

        [result] = await run_scripts(self.confirmed.pipeline, self.scripts.access, call, replicas.commands(), check)
        return result

    async def history(self, nhs: NhsNumber) -> tuple[list[Record], list[tuple[str, Access]]]:
        """All the child's records (visible or not) and its last 25 accesses with their ids, newest first."""
        tag = self.keys.tag(nhs)
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hgetall(self.keys.records(tag))
            pipe.lrange(self.keys.accesses(tag), 0, 24)
            raw_records, raw_accesses = await pipe.execute()
        records = decode_fields(raw_records, self.unreadable)
        return records, readable_accesses(raw_accesses, tag, self.unreadable)

    async def encounter(self, encounter_id: str) -> dict[str, Any] | None:
        return await self._json(self.keys.encounter(encounter_id))

    async def _json(self, key: str) -> dict[str, Any] | None:
        raw = await self.redis.get(key)
        if raw is None:
            return None
        result: dict[str, Any] = orjson.loads(raw)
        return result

    async def keep_practitioner_roles(self, roles: Mapping[str, bytes]) -> None:
        """Refreshed on every AuditEvent search that refers to them; they expire with the accesses they describe."""
        if not roles:
            return
        async with self.redis.pipeline(transaction=False) as pipe:
            for role_id, body in roles.items():
                pipe.set(self.keys.practitioner_role(role_id), body, ex=self.encounter_ttl_s)
            await pipe.execute()

    async def practitioner_role(self, role_id: str) -> dict[str, Any] | None:
        return await self._json(self.keys.practitioner_role(role_id))

    async def append_audit(self, nhs: NhsNumber, entry: Mapping[str, Any]) -> None:
        await self.redis.lpush(self.keys.audit(self.keys.tag(nhs)), orjson.dumps(dict(entry)))
