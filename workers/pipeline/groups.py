"""The stream's consumer groups: which are fed, which are abandoned, and dropping one.

A group is one sink's read position in the stream. Every dispatcher records, every few
seconds, that it feeds the groups of its ``TRAINBUS_SINKS`` (``<ns>:groups:fed``). A group
no dispatcher fed for ``TRAINBUS_GROUP_ABANDON_H`` hours (default 24) is *abandoned*: that
sink was taken out of every dispatcher's ``TRAINBUS_SINKS``. Until then the stream keeps
every entry the group has not read (it waits, and ``trainbus status`` shows for how long);
from then on the stream is trimmed without it (what it had not read is gone for that sink,
which nobody runs), a warning says so once, status and ``trainbus_group_abandoned`` show
it, and ``trainbus groups drop NAME`` removes it. A dispatcher feeding it again revives it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass

import redis

from shared.keys import Keys

log = logging.getLogger("trainbus.groups")


@dataclass(frozen=True)
class Group:
    name: str
    lag: int | None  # entries not read yet
    pending: int  # read, not acknowledged
    consumers: int
    fed_s_ago: float | None  # since a dispatcher last fed it (None: never recorded)
    abandoned: bool


def mark_fed(client: redis.Redis, keys: Keys, sinks: tuple[str, ...] | list[str]) -> None:
    now = repr(time.time())
    client.hset(keys.groups_fed, mapping=dict.fromkeys(sinks, now))


def groups(client: redis.Redis, keys: Keys) -> list[Group]:
    try:
        infos = client.xinfo_groups(keys.events)
    except redis.ResponseError:  # no stream yet
        return []
    fed = {k.decode(): float(v) for k, v in client.hgetall(keys.groups_fed).items()}
    abandoned = {a.decode() for a in client.smembers(keys.abandoned_groups)}
    now = time.time()
    found = []
    for info in infos:
        name = info["name"].decode() if isinstance(info["name"], bytes) else info["name"]
        found.append(
            Group(
                name=name,
                lag=info.get("lag"),
                pending=info.get("pending") or 0,
                consumers=info.get("consumers") or 0,
                fed_s_ago=round(now - fed[name], 1) if name in fed else None,
                abandoned=name in abandoned,
            )
        )
    return found


def refresh_abandoned(client: redis.Redis, keys: Keys, grace_s: float, feeding: Iterable[str] = ()) -> set[str]:
    """Mark groups nobody fed for ``grace_s`` as abandoned (said once each); returns the abandoned.
    ``feeding``: the caller's own groups, fed by it whatever their mark says (it is renewed every few
    seconds, which a grace shorter than that would miss)."""
    feeding = set(feeding)
    now = time.time()
    abandoned = set()
    for group in groups(client, keys):
        if group.fed_s_ago is None:
            client.hsetnx(keys.groups_fed, group.name, repr(now))  # its grace starts when first seen
            continue
        if group.name in feeding or group.fed_s_ago < grace_s:
            if group.abandoned:
                client.srem(keys.abandoned_groups, group.name)
                log.warning("consumer group %s is fed again; the stream waits for it again", group.name)
            continue
        abandoned.add(group.name)
        if not group.abandoned and client.sadd(keys.abandoned_groups, group.name):
            log.warning(
                "consumer group %s: no dispatcher has fed it for %.1f h (its sink is in no TRAINBUS_SINKS); "
                "the stream is trimmed without it from now on (%s unread entries are lost for it). "
                "`trainbus groups drop %s` removes it",
                group.name,
                group.fed_s_ago / 3600,
                group.lag,
                group.name,
            )
    return abandoned


def drop(client: redis.Redis, keys: Keys, name: str) -> bool:
    """Remove a consumer group and what trainbus knows about it; False if there is none."""
    try:
        removed = bool(client.xgroup_destroy(keys.events, name))
    except redis.ResponseError:
        removed = False
    client.hdel(keys.groups_fed, name)
    client.srem(keys.abandoned_groups, name)
    return removed
