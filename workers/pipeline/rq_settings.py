"""RQ's settings module for a Sentinel URL (``RQ_CONFIG=workers.pipeline.rq_settings``).

``rq worker`` reads ``RQ_REDIS_URL`` with redis-py's ``from_url``, which knows no Sentinel URL;
from a settings module it takes a ``SENTINEL`` dict instead. This one is built from
``TRAINBUS_REDIS_URL`` (``worker_env`` sets RQ_CONFIG to it when that URL is a Sentinel URL), so
the worker follows the primary as the rest of trainbus does.
"""

from __future__ import annotations

import os

from shared.redis_client import WORKER, parse_sentinel_url

_url = parse_sentinel_url(os.environ["TRAINBUS_REDIS_URL"])
_common = {"socket_connect_timeout": WORKER.connect, **_url.tls}

SENTINEL = {
    "INSTANCES": list(_url.sentinels),
    "MASTER_NAME": _url.master,
    "DB": _url.db,
    "USERNAME": _url.username,
    "PASSWORD": _url.password,
    "SOCKET_TIMEOUT": WORKER.socket,
    "CONNECTION_KWARGS": _common,
    "SENTINEL_KWARGS": {
        "socket_timeout": WORKER.socket,
        "username": _url.sentinel_username,
        "password": _url.sentinel_password,
        **_common,
    },
}
