"""The event schema: one envelope, one encode, one decode, used by both sides.

An event on the stream is a JSON object::

    {"schema": 1, "run_id": "...", "seq": 7, "ts": 1763778600.1, "type": "fit_epoch",
     "payload": {...}, "nulls": ["metrics.val/loss"]}

``seq`` counts from 0 per run, without gaps, in the order the hooks were called.
``nulls`` is present only when the payload held NaN or infinity: it lists the dotted
payload paths that were encoded as ``null`` for that reason.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import orjson

from shared.encoding import encode, non_finite_paths
from shared.errors import InvalidEvent

SCHEMA_VERSION = 1
RUN_ID_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # also valid inside RQ job ids
MAX_EVENT_BYTES = 1 << 20  # an event is a small record; files travel as paths
MAX_SEQ = (1 << 32) - 1
MAX_SEQ_AHEAD = 100_000  # a seq this far past what its run pushed is refused (keeps per-run state bounded)


class EventType(str, Enum):
    SESSION = "session"  # run started: args, HUB model id, host, library versions
    PRETRAIN_END = "pretrain_end"
    TRAIN_START = "train_start"
    TRAIN_EPOCH = "train_epoch"  # training part of an epoch done: losses, learning rates
    FIT_EPOCH = "fit_epoch"  # epoch done incl. validation: HUB's per-epoch metrics
    CHECKPOINT = "checkpoint"  # a snapshot of a checkpoint file, with its sha256
    MEDIA = "media"  # debug images or plots on disk, to be logged by path
    VAL_START = "val_start"
    VAL_END = "val_end"
    PREDICT_START = "predict_start"
    EXPORT_START = "export_start"
    FINAL = "final"  # training finished: best checkpoint snapshot and final metrics
    RUN_END = "run_end"  # the run is over: status completed, failed or stopped
    SPOOL_OVERFLOW = "spool_overflow"  # the spool was full: what was dropped, counted
    CONSOLE = "console"  # a batch of the training's console lines (for the Platform's console_output)


TYPES = frozenset(t.value for t in EventType)
# Types the spool keeps even past its size limit: few, small, and not recoverable.
KEPT_WHEN_FULL = frozenset(
    {
        EventType.SESSION,
        EventType.CHECKPOINT,
        EventType.FINAL,
        EventType.RUN_END,
        EventType.SPOOL_OVERFLOW,
    }
)

NUMBER = (int, float)
# The payload fields the sinks read, by event type, and what each must be when present and
# not null. Anything else in a payload is carried along unread. A field of the wrong type
# would fail inside a sink, so decode_event refuses it up front with the field's name.
PAYLOAD_FIELDS: dict[str, dict[str, type | tuple[type, ...]]] = {
    "session": {"args": dict, "name": str, "project": str, "hub_model_id": str, "device": str, "environment": dict},
    "pretrain_end": {"args": dict},
    # step: the framework's global step, where ClearML and MLflow plot the point (else at the epoch);
    # series_logged: the fit_epoch's metrics went out as train_epoch points already (Lightning's log calls).
    "train_epoch": {"epoch": int, "metrics": dict, "lr": dict, "step": int},
    "fit_epoch": {
        "epoch": int,
        "step": int,
        "series_logged": bool,
        "metrics": dict,
        "model_info": dict,
        "epoch_time": NUMBER,
        "final_eval": bool,
        "fitness": NUMBER,
        "best_fitness": NUMBER,
        "lr": NUMBER,
        "system": dict,
    },
    "checkpoint": {"epoch": int, "is_best": bool, "checkpoint": dict},
    "media": {"kind": str, "title": str, "paths": list, "dir": str, "pattern": str, "names": list, "iteration": int},
    "final": {"epoch": int, "metrics": dict, "map50_95": NUMBER, "checkpoint": dict, "summary": dict, "files": list},
    "run_end": {"status": str, "error": str},
    "console": {"chunk_id": int, "content": str, "line_count": int, "progress": dict},
}
CHECKPOINT_FIELDS: dict[str, type | tuple[type, ...]] = {
    "source": str,
    "label": str,
    "stamp": dict,
    "error": str,
    "path": str,  # the snapshot, added by the delivery process with its sha256 and size
    "sha256": str,
    "size": int,
}


@dataclass(slots=True)
class Event:
    run_id: str
    seq: int
    ts: float
    type: str
    payload: dict[str, Any]
    nulls: list[str] = field(default_factory=list)
    schema: int = SCHEMA_VERSION


def encode_event(run_id: str, seq: int, ts: float, type: str, payload: dict[str, Any]) -> bytes:
    """The JSON bytes of one event; NaN/inf become null and are listed under ``nulls``."""
    envelope = {
        "schema": SCHEMA_VERSION,
        "run_id": run_id,
        "seq": seq,
        "ts": ts,
        "type": type,
        "payload": payload,
    }
    data = encode(envelope)
    if b"null" in data:
        nulls = non_finite_paths(payload)
        if nulls:  # the last key, as if it had been in the envelope: no second encoding of the payload
            data = b'%s,"nulls":%s}' % (data[:-1], encode(nulls))
    return data


def decode_event(data: bytes | str) -> Event:
    """Parse and validate one event; raises :class:`InvalidEvent` saying what is wrong."""
    if len(data) > MAX_EVENT_BYTES:
        raise InvalidEvent(f"event is {len(data)} bytes, more than the {MAX_EVENT_BYTES} allowed")
    try:
        obj = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise InvalidEvent(f"not JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise InvalidEvent(f"expected a JSON object, got {type(obj).__name__}")
    schema = obj.get("schema")
    if schema != SCHEMA_VERSION:
        raise InvalidEvent(f"unsupported schema version {schema!r}; this build reads {SCHEMA_VERSION}")
    run_id = _field(obj, "run_id", str)
    if not RUN_ID_PATTERN.match(run_id):
        raise InvalidEvent(f"run_id {run_id[:80]!r} must be 1-64 letters, digits, '_' or '-'")
    seq = _field(obj, "seq", int)
    if isinstance(seq, bool) or not 0 <= seq <= MAX_SEQ:
        raise InvalidEvent(f"seq must be an integer from 0 to {MAX_SEQ}, got {str(seq)[:40]}")
    try:
        ts = _field(obj, "ts", (int, float))
        kind = _field(obj, "type", str)
        if kind not in TYPES:
            raise InvalidEvent(f"unknown event type {kind[:80]!r}")
        payload = _field(obj, "payload", dict)
        _check_fields(payload, PAYLOAD_FIELDS.get(kind, {}), f"{kind} payload")
        if isinstance(payload.get("checkpoint"), dict):
            _check_fields(payload["checkpoint"], CHECKPOINT_FIELDS, f"{kind} payload's checkpoint")
        for name in ("paths", "names", "files"):
            if not all(isinstance(p, str) for p in payload.get(name) or []):
                raise InvalidEvent(f"{kind} payload: {name!r} must be a list of strings")
        nulls = obj.get("nulls", [])
        if not isinstance(nulls, list):
            raise InvalidEvent("'nulls' must be a list of payload paths")
    except InvalidEvent as exc:
        raise InvalidEvent(exc.reason, run_id, seq) from None
    return Event(run_id=run_id, seq=seq, ts=float(ts), type=kind, payload=payload, nulls=nulls)


def _check_fields(obj: dict[str, Any], fields: dict[str, type | tuple[type, ...]], where: str) -> None:
    for name, kind in fields.items():
        value = obj.get(name)
        if value is None:
            continue
        if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
            expected = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
            raise InvalidEvent(f"{where}: {name!r} must be {expected}, got {type(value).__name__}")


def _field(obj: dict[str, Any], name: str, kind: type | tuple[type, ...]) -> Any:
    if name not in obj:
        raise InvalidEvent(f"missing field {name!r}")
    value = obj[name]
    if not isinstance(value, kind):
        expected = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise InvalidEvent(f"field {name!r} must be {expected}, got {type(value).__name__}")
    return value
