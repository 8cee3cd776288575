"""RQ's settings module (``RQ_CONFIG=workers.pipeline.rq_settings``): ``rq worker`` connects where
``TRAINBUS_REDIS_URL`` says, a Sentinel URL included.

``rq worker`` reads ``RQ_REDIS_URL`` with redis-py's ``from_url``, which knows no Sentinel URL;
from a settings module it takes ``REDIS_URL``, or a ``SENTINEL`` dict. The worker image sets
RQ_CONFIG to this module, and ``worker_env`` does for a Sentinel URL, so the worker follows the
primary as the rest of trainbus does. (RQ_REDIS_URL, if set, wins over this module.)
"""

from __future__ import annotations

import os

from shared.redis_client import WORKER, is_sentinel, parse_sentinel_url, sentinel_options
from shared.settings import DEFAULT_REDIS_URL

_url = os.environ.get("TRAINBUS_REDIS_URL") or DEFAULT_REDIS_URL

if not is_sentinel(_url):
    REDIS_URL = _url
else:
    _parsed = parse_sentinel_url(_url)
    _nodes, _sentinels = sentinel_options(_parsed, WORKER)
    SENTINEL = {
        "INSTANCES": list(_parsed.sentinels),
        "MASTER_NAME": _parsed.master,
        "DB": _parsed.db,
        "USERNAME": _parsed.username,
        "PASSWORD": _parsed.password,
        "SOCKET_TIMEOUT": WORKER.socket,
        "CONNECTION_KWARGS": _nodes,
        "SENTINEL_KWARGS": _sentinels,
    }
