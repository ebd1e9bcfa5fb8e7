"""The shapes of Redis replies as this service's clients decode them, for the type checker.

Every client is opened with ``decode_responses=True`` (store/connection.py), so replies hold ``str`` where
redis-py's annotations allow ``bytes | str`` (and a stream read never answers None). Adapters ``cast`` a reply to
one of these aliases where they read it; nothing is converted at run time."""

from __future__ import annotations

from typing import TypeAlias

Fields: TypeAlias = dict[str, str]
"""A hash (HGETALL) or one stream entry's fields."""

Entries: TypeAlias = list[tuple[str, Fields]]
"""A stream range (XRANGE, XREVRANGE): (entry id, fields), in the order read."""

Streams: TypeAlias = list[tuple[str, Entries]]
"""An XREAD reply: (stream key, its entries); None (not []) when the wait ended with nothing new."""
