"""JSON encoding that never raises into training.

orjson does the work. What it cannot encode natively goes through :func:`_default`:
tensors and numpy values become numbers or lists, paths become strings, anything else
becomes its ``str()`` with a warning (once per type). NaN and infinity become ``null``
and the event lists where they were, so a consumer can tell "missing" from "not a number".
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from pathlib import PurePath
from typing import Any

import orjson

log = logging.getLogger("trainbus.encoding")

OPTIONS = orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS
MAX_DEPTH = 64  # orjson refuses deeper than 254; we cut earlier so the fallback is cheap
_warned_types: set[type] = set()


def encode(obj: Any) -> bytes:
    """Encode ``obj`` as JSON bytes; falls back to a sanitised copy instead of raising."""
    try:
        return orjson.dumps(obj, default=_default, option=OPTIONS)
    except (orjson.JSONEncodeError, TypeError, ValueError, RecursionError) as exc:
        log.warning("event needed sanitising before encoding: %s", exc)
        return orjson.dumps(_sanitise(obj, 0), option=OPTIONS)


def non_finite_paths(obj: Any) -> list[str]:
    """Dotted paths of every NaN or infinite number in ``obj`` (which encode as null).

    Called only when the encoded bytes contain ``null``, so the common case pays nothing.
    """
    found: list[str] = []
    _walk_non_finite(obj, "", found, 0)
    return found


def _walk_non_finite(obj: Any, path: str, found: list[str], depth: int) -> None:
    """Leaves that cannot be NaN (None, int, str, bool) are passed over without a call or a path."""
    if depth > MAX_DEPTH:
        return
    if isinstance(obj, float):
        if not math.isfinite(obj):
            found.append(path)
        return
    if isinstance(obj, Mapping):
        items: Any = obj.items()
    elif isinstance(obj, (list, tuple)):
        items = enumerate(obj)
    elif _is_array(obj):
        value = _array_value(obj)
        if isinstance(value, (float, list)):
            _walk_non_finite(value, path, found, depth + 1)
        return
    else:
        return
    for key, value in items:
        if value is None or type(value) in _PLAIN:
            continue
        _walk_non_finite(value, f"{path}.{key}" if path else str(key), found, depth + 1)


_PLAIN = frozenset({int, str, bool})


def _is_array(obj: Any) -> bool:
    """True for torch tensors and numpy arrays/scalars, without importing either library."""
    module = type(obj).__module__
    return module.startswith("torch") or module.startswith("numpy")


def _array_value(obj: Any) -> Any:
    """A tensor or numpy value as a Python number or (nested) list."""
    if hasattr(obj, "detach"):
        obj = obj.detach().cpu()
    return obj.tolist()  # a 0-d tensor or numpy scalar gives a plain number


def _default(obj: Any) -> Any:
    if _is_array(obj) and hasattr(obj, "tolist"):
        return _array_value(obj)
    if isinstance(obj, PurePath):
        return str(obj)
    if isinstance(obj, (set, frozenset)):
        return sorted(obj, key=repr)
    if isinstance(obj, (bytes, bytearray, memoryview)):
        return bytes(obj).decode("utf-8", "replace")
    return _as_string(obj)


def _as_string(obj: Any) -> str:
    kind = type(obj)
    if kind not in _warned_types:
        _warned_types.add(kind)
        log.warning("encoding %s.%s as its string form", kind.__module__, kind.__qualname__)
    try:
        return str(obj)
    except Exception:  # a broken __str__ must not reach training
        return f"<unencodable {kind.__name__}>"


def _sanitise(obj: Any, depth: int) -> Any:
    """A JSON-safe copy: depth cut at MAX_DEPTH, big ints as strings, odd keys as strings."""
    if depth >= MAX_DEPTH:
        return "<too deep>"
    if obj is None or isinstance(obj, (bool, float, str)):
        return obj
    if isinstance(obj, int):
        return obj if -(2**63) <= obj < 2**64 else str(obj)
    if isinstance(obj, Mapping):
        return {str(k): _sanitise(v, depth + 1) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_sanitise(v, depth + 1) for v in obj]
    try:
        converted = _default(obj)
    except Exception:
        converted = _as_string(obj)
    return converted if isinstance(converted, str) else _sanitise(converted, depth + 1)
