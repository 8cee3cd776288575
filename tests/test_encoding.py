"""The encoder: valid JSON for anything, NaN/inf listed, never an exception into training."""

from __future__ import annotations

import datetime as dt
import json
import logging
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.encoding import encode
from shared.errors import InvalidEvent
from shared.events import decode_event, encode_event

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
)
keys_ = st.text(min_size=1, max_size=8).filter(lambda k: "." not in k)
trees = st.recursive(
    scalars, lambda kids: st.lists(kids, max_size=4) | st.dictionaries(keys_, kids, max_size=4), max_leaves=30
)


def strict_loads(data: bytes):
    """json.loads that refuses NaN/Infinity literals, as any standard JSON parser would."""

    def refuse(token: str):
        raise ValueError(f"invalid JSON constant {token}")

    return json.loads(data, parse_constant=refuse)


def non_finite_paths(obj, path=""):
    if isinstance(obj, float) and not math.isfinite(obj):
        yield path
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from non_finite_paths(v, f"{path}.{k}" if path else k)
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from non_finite_paths(v, f"{path}.{i}" if path else str(i))


def at_path(obj, path):
    for part in path.split("."):
        obj = obj[int(part)] if isinstance(obj, list) else obj[part]
    return obj


# Top-level keys that decode_event checks whatever the type (file lists, a checkpoint's shape).
CHECKED = ("paths", "names", "files", "checkpoint")


@settings(max_examples=300, deadline=None)
@given(payload=st.dictionaries(keys_.filter(lambda k: k not in CHECKED), trees, max_size=6))
def test_any_payload_encodes_to_strict_json_with_nulls_listed(payload):
    data = encode_event("run-1", 3, 1.5, "val_end", payload)  # a type whose payload has no required shape
    event = strict_loads(data)
    expected = sorted(non_finite_paths(payload))
    assert sorted(event.get("nulls", [])) == expected
    for path in expected:
        assert at_path(event["payload"], path) is None
    assert decode_event(data).seq == 3


@settings(max_examples=200, deadline=None)
@given(value=st.floats(allow_nan=False, allow_infinity=False))
def test_finite_floats_round_trip_exactly(value):
    assert strict_loads(encode({"v": value}))["v"] == value


def test_tensors_numpy_paths_and_datetimes_encode():
    payload = {
        "scalar": torch.tensor(0.5),
        "vector": torch.tensor([1.0, float("nan")]),
        "grad": torch.tensor(2.0, requires_grad=True) * 1,
        "np32": np.float32(0.25),
        "np_nan": np.float64("nan"),
        "array": np.arange(3),
        "path": Path("/runs/train/weights/last.pt"),
        "when": dt.datetime(2026, 11, 22, 2, 30, tzinfo=dt.timezone.utc),
        "bf16": torch.tensor(1.5, dtype=torch.bfloat16),
    }
    event = strict_loads(encode_event("r", 0, 0.0, "fit_epoch", payload))
    p = event["payload"]
    assert p["scalar"] == 0.5 and p["vector"] == [1.0, None] and p["grad"] == 2.0
    assert p["np32"] == 0.25 and p["np_nan"] is None and p["array"] == [0, 1, 2]
    assert p["path"] == "/runs/train/weights/last.pt"
    assert p["when"].startswith("2026-11-22T02:30:00")
    assert p["bf16"] == 1.5
    assert sorted(event["nulls"]) == ["np_nan", "vector.1"]


def test_unknown_objects_become_strings_with_one_warning(caplog):
    class Odd:
        def __str__(self):
            return "odd!"

    class Broken:
        def __str__(self):
            raise RuntimeError("no")

    with caplog.at_level(logging.WARNING, logger="trainbus.encoding"):
        first = strict_loads(encode({"a": Odd(), "b": Odd(), "c": Broken()}))
    assert first == {"a": "odd!", "b": "odd!", "c": "<unencodable Broken>"}
    assert sum("Odd" in r.getMessage() for r in caplog.records) == 1


def test_pathological_inputs_are_sanitised_not_raised():
    deep: dict = {}
    node = deep
    for _ in range(400):
        node["x"] = {}
        node = node["x"]
    huge_int = 2**200
    data = encode({"deep": deep, "big": huge_int, 1: "int key", (1, 2): "tuple key"})
    obj = strict_loads(data)
    assert obj["big"] == str(huge_int)
    assert obj["1"] == "int key"


def ev(**fields) -> bytes:
    """A valid event's JSON with some fields replaced."""
    base = {"schema": 1, "run_id": "r", "seq": 0, "ts": 0, "type": "media", "payload": {}}
    return json.dumps({**base, **fields}).encode()


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"not json", "not JSON"),
        (b"[1, 2]", "expected a JSON object"),
        (b'{"schema": 2}', "unsupported schema version 2"),
        (b'{"schema": 1, "seq": 0}', "missing field 'run_id'"),
        (ev(seq="7"), "field 'seq' must be int"),
        (ev(run_id="a b"), "run_id 'a b'"),
        (ev(type="boom"), "unknown event type 'boom'"),
        (ev(seq=-1), "integer from 0 to 4294967295"),
        (ev(seq=2**32), "integer from 0 to 4294967295"),
        (ev(type="fit_epoch", payload={"epoch": "3"}), "fit_epoch payload: 'epoch' must be int, got str"),
        (ev(type="fit_epoch", payload={"epoch": True}), "'epoch' must be int, got bool"),
        (ev(type="train_epoch", payload={"metrics": [1]}), "'metrics' must be dict"),
        (ev(type="final", payload={"checkpoint": {"path": 7}}), "checkpoint: 'path' must be str"),
        (ev(type="media", payload={"paths": ["a", 1]}), "'paths' must be a list of strings"),
        (ev(type="session", payload={"hub_model_id": {"x": 1}}), "'hub_model_id' must be str"),
        (ev(payload=[]), "field 'payload' must be dict"),
        (ev(nulls="x"), "'nulls' must be a list"),
        (b"{" + b'"a":"' + b"x" * (2 << 20) + b'"}', "more than"),
        (b'{"schema": 1, "run_id": "r\xff", "seq": 0}', "not JSON"),
    ],
)
def test_decode_names_what_is_wrong(raw, reason):
    with pytest.raises(InvalidEvent) as err:
        decode_event(raw)
    assert reason in err.value.reason
