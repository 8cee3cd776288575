"""Whatever lands on the stream, the dispatcher routes it or dead-letters it with a reason,
acknowledges it, and keeps going: hypothesis writes the entries, a real Redis holds them."""

from __future__ import annotations

import json
import uuid

import orjson
import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shared.errors import InvalidEvent
from shared.events import PAYLOAD_FIELDS, TYPES, decode_event, encode_event
from shared.keys import Keys
from shared.settings import WorkerSettings
from workers.pipeline.dispatch import Dispatcher

SINKS = ("hub", "clearml")


def dumps(value: object) -> bytes:
    """The standard library's JSON: it writes integers of any size, which orjson refuses."""
    return json.dumps(value).encode()


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=20,
)
field_names = st.sampled_from(sorted({name for fields in PAYLOAD_FIELDS.values() for name in fields})) | st.text(
    max_size=8
)
envelopes = st.fixed_dictionaries(
    {},
    optional={
        "schema": st.sampled_from([1, 2, 0, "1", None]),
        "run_id": st.sampled_from(["unknown-run", "x"]) | st.text(max_size=70),
        "seq": st.sampled_from([0, 1, 1, 5, -1, 2**32, 2**63]) | st.integers() | st.floats() | st.text(max_size=3),
        "ts": st.floats(allow_nan=False) | st.integers() | st.text(max_size=3),
        "type": st.sampled_from(sorted(TYPES)) | st.text(max_size=12),
        "payload": st.dictionaries(field_names, json_values, max_size=6) | json_values,
        "nulls": json_values,
    },
)
entries = st.one_of(
    st.binary(max_size=100),  # not JSON, not UTF-8
    json_values.map(dumps),  # JSON, but not an object
    envelopes.map(dumps),  # objects with any mix of right and wrong fields
    st.integers(1, 3000).map(lambda depth: b'{"schema": 1, "payload": ' + b"[" * depth + b"]" * depth + b"}"),
)


def good_run() -> list[bytes]:
    return [
        encode_event("good", 0, 1.0, "session", {"args": {"epochs": 1}, "hub_model_id": "M" * 20}),
        encode_event("good", 1, 2.0, "fit_epoch", {"epoch": 0, "metrics": {"loss": 0.5}}),
        encode_event("good", 2, 3.0, "run_end", {"status": "completed"}),
    ]


@pytest.fixture(scope="module")
def client(redis_url):
    return redis.Redis.from_url(redis_url)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(junk=st.lists(entries, min_size=1, max_size=12), at=st.integers(0, 12))
def test_any_entry_is_routed_or_dead_lettered_and_nothing_else_is_lost(client, redis_url, junk, at):
    keys = Keys(f"test-bad-{uuid.uuid4().hex[:10]}")
    try:
        stream = [*junk[:at], *good_run(), *junk[at:]]
        for raw in stream:
            client.xadd(keys.events, {"event": raw})
        client.xadd(keys.events, {"no-event-field": b"1"})
        settings_ = WorkerSettings.from_env({}, redis_url=redis_url, namespace=keys.namespace, sinks=SINKS)
        Dispatcher(client, settings_, claim_idle_s=0).run(burst=True)

        invalid = 1 + sum(1 for raw in junk if not decodes(raw))
        for sink in SINKS:
            assert client.xpending(keys.events, sink)["pending"] == 0, "every entry acknowledged"
        letters = [fields for _, fields in client.xrange(keys.dead_letters)]
        assert len(letters) == invalid * len(SINKS), "each invalid entry dead-lettered once per sink"
        assert all(fields[b"reason"] for fields in letters)
        assert orjson.loads(client.hget(keys.pending("hub", "good", "metrics"), "0")) == {"loss": 0.5}
        assert client.hget(keys.state("hub", "good"), "ended") == b"completed"
        assert client.zcard(keys.pending("clearml", "good", "events")) == 3
    finally:
        names = list(client.scan_iter(match=f"{keys.namespace}:*"))
        if names:
            client.delete(*names)


def decodes(raw: bytes) -> bool:
    try:
        decode_event(raw)
    except InvalidEvent:
        return False
    return True
