"""``trainbus status``: what the pipeline holds right now, read from Redis only.

Stream length, per consumer group the lag (entries not yet read) and pending entries (read,
not acknowledged), dead letters; per active run its last event, whether its producer is
alive, pending work and the next slot per upload type; RQ queue depths and failed jobs.
"""

from __future__ import annotations

import time
from typing import Any

import redis
from rq.registry import FailedJobRegistry

from shared.keys import Keys
from workers.pipeline.groups import groups as consumer_groups
from workers.pipeline.queues import queue_for
from workers.sinks.registry import sink_class


def pipeline_status(client: redis.Redis, keys: Keys, sinks: tuple[str, ...]) -> dict[str, Any]:
    now = time.time()
    return {
        "redis": _replication(client),
        "stream": _stream(client, keys),
        "dead_letters": client.xlen(keys.dead_letters),
        "queues": {sink: _queue(client, keys, sink) for sink in sinks},
        "runs": {
            sink: {
                run.decode(): _run(client, keys, sink, run.decode(), now)
                for run in sorted(client.smembers(keys.active(sink)))
            }
            for sink in sinks
        },
    }


def _replication(client: redis.Redis) -> dict[str, Any]:
    """The node answering (the primary, behind Sentinel) and its replicas with how far behind each is:
    bytes of the replication stream not yet acknowledged, and seconds since its last acknowledgement."""
    info = client.info("replication")
    offset = int(info.get("master_repl_offset", 0))
    replicas = []
    for name, value in sorted(info.items()):
        if name.startswith("slave") and isinstance(value, dict):
            replicas.append(
                {
                    "address": f"{value.get('ip')}:{value.get('port')}",
                    "state": value.get("state"),
                    "behind_bytes": max(0, offset - int(value.get("offset", 0))),
                    "ack_s_ago": value.get("lag"),
                }
            )
    return {"role": info.get("role"), "replicas": replicas}


def _stream(client: redis.Redis, keys: Keys) -> dict[str, Any]:
    groups = {
        g.name: {
            "lag": g.lag,
            "pending": g.pending,
            "consumers": g.consumers,
            "fed_s_ago": g.fed_s_ago,
            "abandoned": g.abandoned,
        }
        for g in consumer_groups(client, keys)
    }
    return {"key": keys.events, "length": client.xlen(keys.events), "groups": groups}


def _queue(client: redis.Redis, keys: Keys, sink: str) -> dict[str, Any]:
    queue = queue_for(client, keys, sink)
    return {"name": queue.name, "queued": queue.count, "failed": FailedJobRegistry(queue=queue).count}


def _run(client: redis.Redis, keys: Keys, sink: str, run_id: str, now: float) -> dict[str, Any]:
    state = {k.decode(): v.decode() for k, v in client.hgetall(keys.state(sink, run_id)).items()}
    last = float(state.get("last_event_ts", 0) or 0)
    pending = {kind: n for kind, n in sink_class(sink).pending(client, keys, run_id).items() if n}
    next_in = {
        field.removeprefix("next:"): round(max(0.0, float(value) - now), 1)
        for field, value in state.items()
        if field.startswith("next:")
    }
    alive_ttl = client.ttl(keys.alive(run_id))
    blocked = client.get(keys.blocked(sink, run_id))
    return {
        "last_event_s_ago": round(now - last, 1) if last else None,
        "producer_alive": alive_ttl > 0,
        "pending": pending,
        "next_upload_in_s": next_in,
        "retries": int(state.get("retries", 0)),
        "retrying": sorted(k.removeprefix("fail:") for k in state if k.startswith("fail")),
        "error": state.get("error"),
        "ended": state.get("ended"),
        "blocked": blocked.decode() if blocked else None,
    }


def format_status(status: dict[str, Any]) -> str:
    stream, node = status["stream"], status["redis"]
    replicas = ", ".join(
        f"{r['address']} {r['state']} {r['behind_bytes']} B behind, acked {r['ack_s_ago']} s ago"
        for r in node["replicas"]
    )
    lines = [
        f"redis {node['role']}, replicas: {replicas or 'none'}",
        f"stream {stream['key']}: {stream['length']} entries, {status['dead_letters']} dead letters",
    ]
    for name, group in stream["groups"].items():
        fed = "never fed" if group["fed_s_ago"] is None else f"fed {group['fed_s_ago']:.0f} s ago"
        state = f"ABANDONED ({fed}; not waited for; `trainbus groups drop {name}`)" if group["abandoned"] else fed
        lines.append(
            f"  group {name:<8} lag {group['lag']}  pending {group['pending']}  consumers {group['consumers']}  {state}"
        )
    for queue in status["queues"].values():
        lines.append(f"queue {queue['name']}: {queue['queued']} queued, {queue['failed']} failed")
    for sink, runs in status["runs"].items():
        for run_id, run in runs.items():
            alive = "alive" if run["producer_alive"] else "silent"
            lines.append(
                f"{sink:<8} run {run_id}: last event {run['last_event_s_ago']} s ago, producer {alive}, "
                f"pending {run['pending'] or '-'}, next {run['next_upload_in_s'] or '-'}, "
                f"retries {run['retries']}" + (f", BLOCKED: {run['blocked']}" if run["blocked"] else "")
            )
    if not any(status["runs"].values()):
        lines.append("no active runs")
    return "\n".join(lines)
