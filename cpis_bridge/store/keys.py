"""The whole Redis key schema. Child keys are hash-tagged by a keyed hash of the NHS number, so one child's keys
share a slot and no key name contains an NHS number.

Layout (P = settings.key_prefix, h = child tag):
  P:c:{h}:r            HASH   "<la>|<localId>" -> compact record JSON (core.records.Record.to_compact)
  P:c:{h}:a            LIST   the child's access log, newest first (core.access.Access.encode): every unscheduled
                              access the retention period keeps, at most 1,000; the history shown is the newest 25
  P:c:{h}:au           LIST   the child's audit trail, newest first (append-only; only purge trims it)
  P:la:<ods>:ids       HASH   localId -> NHS number (this LA's caseload index)
  P:la:<ods>:up        HASH   upload sequence -> stored report JSON (idempotent re-sends)
  P:la:<ods>:seq       STRING last applied upload sequence
  P:la:<ods>:lock      STRING an upload in progress
  P:enc:<id>           STRING a retained Encounter (minimal JSON)
  P:prole:<id>         STRING a PractitionerRole an AuditEvent search referred to (for its read), with the accesses' TTL
  P:cs                 HASH   care-setting ODS -> "name\\x1ftype" (registry mirror read by Lua)
  P:inbox:<la>         STREAM every notification for that LA (the pull inbox), body parts fixed at queue time:
                              {nhs, tag, acc, n (access-log length after acc: the 25 recent are read by
                              reference), recs, cs, at}
  P:inbox:<la>:ack     SET    acknowledged inbox entry ids
  P:inbox:<la>:ackby   HASH   inbox entry id -> "<ms>\x1f<subject>\x1f<name>" of the acknowledgement (web views)
  P:inbox:<la>:idx     HASH   notification id -> inbox entry id (written by access.lua, rebuilt on demand)
  P:q:notify           STREAM delivery queue (LAs with push channels): {la, ref=<inbox entry id>, aid} (group "relays")
  P:q:notify:delay     ZSET   delivery retries waiting for their time
  P:q:sync             STREAM flag sync queue: {la, lid[, t=tombstone JSON]} (group "relays")
  P:q:sync:delay       ZSET   sync retries waiting for their time
  P:sched:sync         ZSET   "<la>|<localId>" -> epoch day on which its visibility ends (time-driven Flag status)
  P:sync:pause         STRING epoch ms until which every process waits before writing to the sync server (Retry-After)
  P:sync:lock:<la>|<localId>  STRING  a conditional Flag write in progress for that identifier (serialised, with TTL)
  P:dead               STREAM dead letters of every channel (fields: channel, la, ref | lid[, t], reason, ...)
  P:pause:<ch>:<la>    STRING epoch ms until which that endpoint is paused (Retry-After), with a matching TTL
  P:audit:sys          LIST   audit entries that concern no NHS number (ops reads)
  P:jti:<h>            STRING a CDS client token id already used (h = hash of iss and jti), until the token expires
  P:ha:fence           STRING written before each WAIT for replicas (store/replicas.py); its value means nothing
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

from cpis_bridge.core.nhs import NhsTagger


@dataclass(frozen=True, slots=True)
class Keys:
    prefix: str
    hash_key: bytes
    tag: NhsTagger = field(init=False, repr=False, compare=False)
    """The keyed hash standing in for an NHS number in key names, logs and no-record audit entries."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "tag", NhsTagger(self.hash_key))

    # -- children -----------------------------------------------------------------------------------------------

    def child(self, tag: str) -> str:
        return f"{self.prefix}:c:{{{tag}}}"

    def records(self, tag: str) -> str:
        return f"{self.prefix}:c:{{{tag}}}:r"

    def accesses(self, tag: str) -> str:
        return f"{self.prefix}:c:{{{tag}}}:a"

    def audit(self, tag: str) -> str:
        return f"{self.prefix}:c:{{{tag}}}:au"

    @staticmethod
    def record_field(la: str, local_id: str) -> str:
        return f"{la}|{local_id}"

    # -- local authorities --------------------------------------------------------------------------------------
    def la_ids(self, la: str) -> str:
        return f"{self.prefix}:la:{la}:ids"

    def la_uploads(self, la: str) -> str:
        return f"{self.prefix}:la:{la}:up"

    def la_sequence(self, la: str) -> str:
        return f"{self.prefix}:la:{la}:seq"

    def la_lock(self, la: str) -> str:
        return f"{self.prefix}:la:{la}:lock"

    def la_journal(self, la: str) -> str:
        return f"{self.prefix}:la:{la}:journal"

    def la_journal_body(self, la: str) -> str:
        return f"{self.prefix}:la:{la}:journal:body"

    # -- accesses, notifications, outbox ------------------------------------------------------------------------
    def encounter(self, encounter_id: str) -> str:
        return f"{self.prefix}:enc:{encounter_id}"

    def practitioner_role(self, role_id: str) -> str:
        return f"{self.prefix}:prole:{role_id}"

    @property
    def care_settings(self) -> str:
        return f"{self.prefix}:cs"

    @property
    def replica_fence(self) -> str:
        return f"{self.prefix}:ha:fence"

    def inbox(self, la: str) -> str:
        return f"{self.prefix}:inbox:{la}"

    def inbox_acks(self, la: str) -> str:
        return f"{self.prefix}:inbox:{la}:ack"

    def inbox_acks_by(self, la: str) -> str:
        return f"{self.prefix}:inbox:{la}:ackby"

    def inbox_index(self, la: str) -> str:
        return f"{self.prefix}:inbox:{la}:idx"

    def delivery_pause(self, la: str, channel: str) -> str:
        return f"{self.prefix}:pause:{channel}:{la}"

    @property
    def notify_queue(self) -> str:
        return f"{self.prefix}:q:notify"

    @property
    def notify_delay(self) -> str:
        return f"{self.prefix}:q:notify:delay"

    @property
    def notify_held_index(self) -> str:
        """The set of endpoints ("<channel>:<la>") with entries held aside (see notify_held)."""
        return f"{self.prefix}:q:notify:held"

    def notify_held(self, la: str, channel: str) -> str:
        """Entries set aside for one endpoint (open breaker or saturated), scored by when first queued."""
        return f"{self.prefix}:q:notify:held:{channel}:{la}"

    @property
    def sync_queue(self) -> str:
        return f"{self.prefix}:q:sync"

    @property
    def sync_delay(self) -> str:
        return f"{self.prefix}:q:sync:delay"

    @property
    def sync_schedule(self) -> str:
        return f"{self.prefix}:sched:sync"

    @property
    def sync_pause(self) -> str:
        return f"{self.prefix}:sync:pause"

    def sync_lock(self, field: str) -> str:
        return f"{self.prefix}:sync:lock:{field}"

    @property
    def dead_letters(self) -> str:
        return f"{self.prefix}:dead"

    @property
    def system_audit(self) -> str:
        return f"{self.prefix}:audit:sys"

    def cds_jti(self, iss: str, jti: str) -> str:
        return f"{self.prefix}:jti:" + hashlib.sha256(f"{iss}\x1f{jti}".encode()).hexdigest()[:40]

    def pattern(self, suffix: str = "*") -> str:
        return f"{self.prefix}:{suffix}"
