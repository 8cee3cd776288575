"""The ClearML SDK inside a long-lived worker: bounded calls, and who owns what was reported.

Three things the SDK does not give a worker, built here:

- **Bounded calls.** Once logged in, SDK calls retry forever while the server is gone. Each
  call runs in a thread and is given up after a timeout; the thread is left to finish (it
  may succeed much later), and until it has, no other call is started for that run. So a
  long outage leaves at most one stuck thread per run, never one per attempt, and a
  creation that was given up cannot race a second one.
- **Ownership.** What a worker reported sits in its SDK's queue, in this process only,
  until the SDK's thread sends it. Each report is first *handed* to this process in Redis
  (``<ns>:clearml:<run>:pending:handed``: unit -> owner token). Other workers leave handed
  units alone while the owner's lease (``<ns>:clearml:owner:<token>``, renewed by a thread)
  lives; if the owner dies its units are reported again by whoever drains the run next.
- **Confirmation.** A background thread watches each task's queue; once the SDK has sent
  everything handed so far, those units are done in Redis. A flush that takes longer than a
  timeout therefore never makes another worker report the same units.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import redis

from shared.errors import TrainbusError
from shared.keys import Keys

log = logging.getLogger("trainbus.clearml")

OWNER_TTL_S = 60  # a worker silent this long is taken as dead; what it handed is reported again
OWNER_RENEW_S = 10
CONFIRM_EVERY_S = 0.1
T = TypeVar("T")


class ClearmlTimeout(TrainbusError):
    """A ClearML call did not return in time (server down or slow): retried later."""


class ClearmlBusy(ClearmlTimeout):
    """An earlier call for the run has not returned yet; nothing new is started beside it."""


class SdkCalls:
    """At most one SDK call in flight per run, each bounded by a timeout."""

    def __init__(self) -> None:
        self._running: dict[str, str] = {}  # run -> what the unfinished call does
        self._lock = threading.Lock()

    def call(self, run_id: str, what: str, fn: Callable[[], T], timeout: float) -> T:
        with self._lock:
            if run_id in self._running:
                raise ClearmlBusy(f"ClearML {self._running[run_id]} for run {run_id} has not returned yet")
            self._running[run_id] = what
        result: list[Any] = []
        error: list[BaseException] = []

        def run() -> None:
            try:
                result.append(fn())
            except BaseException as exc:
                error.append(exc)
            finally:
                with self._lock:
                    self._running.pop(run_id, None)

        thread = threading.Thread(target=run, daemon=True, name=f"clearml-{what}-{run_id}")
        thread.start()
        thread.join(timeout)
        if thread.is_alive():
            raise ClearmlTimeout(f"ClearML {what} did not return within {timeout:.0f} s")
        if error:
            raise error[0]
        return result[0]

    def busy(self, run_id: str) -> bool:
        with self._lock:
            return run_id in self._running


@dataclass
class TaskHandle:
    """A run's task in this process, and the units reported through it but not yet confirmed."""

    task: Any
    handed: list[str] = field(default_factory=list)


class Owner:
    """This worker process as the owner of what it handed to its SDK: a lease in Redis.

    A thread renews the lease and confirms what the SDK has sent, for every task of the
    process, whether or not a drain job is running.
    """

    def __init__(self, client: redis.Redis, keys: Keys, sink: str, confirm: Callable[[str, list[str]], None]) -> None:
        self.client = client
        self.keys = keys
        self.sink = sink
        self.token = f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"
        self.tasks: dict[str, TaskHandle] = {}
        self.calls = SdkCalls()
        self._confirm = confirm
        self._lock = threading.Lock()
        self._next_renew = 0.0
        self._thread = threading.Thread(target=self._loop, daemon=True, name="clearml-confirm")

    def start(self) -> None:
        self.renew()
        self._thread.start()

    def renew(self) -> None:
        self.client.set(self.keys.owner(self.sink, self.token), b"1", ex=OWNER_TTL_S)
        self._next_renew = time.monotonic() + OWNER_RENEW_S

    def alive(self, token: bytes | str) -> bool:
        token = token.decode() if isinstance(token, bytes) else token
        return token == self.token or bool(self.client.exists(self.keys.owner(self.sink, token)))

    def handed(self, run_id: str, unit: str) -> None:
        """``unit`` went into the SDK's queue of the run's task (called right after the report)."""
        with self._lock:
            self.tasks[run_id].handed.append(unit)

    def confirm_sent(self, run_id: str) -> int:
        """Confirm what the SDK of ``run_id``'s task has sent; returns how many units are still unsent."""
        with self._lock:
            handle = self.tasks.get(run_id)
            if handle is None or not handle.handed:
                return 0
            count = len(handle.handed)
        if sdk_sending(handle.task):
            return count
        self._confirm(run_id, handle.handed[:count])  # Redis first: if it fails, the units stay to confirm later
        with self._lock:
            del handle.handed[:count]
        return len(handle.handed)

    def forget(self, run_id: str) -> None:
        with self._lock:
            self.tasks.pop(run_id, None)

    def _loop(self) -> None:
        while True:
            time.sleep(CONFIRM_EVERY_S)
            try:
                if time.monotonic() >= self._next_renew:
                    self.renew()
                for run_id in list(self.tasks):
                    self.confirm_sent(run_id)
            except Exception:  # Redis away: the lease may lapse, then others take over what is unconfirmed
                log.warning("confirming ClearML reports failed; retrying", exc_info=True)
                time.sleep(1.0)


def sdk_sending(task: Any) -> bool:
    """True while the task's SDK queue holds reports or a send or model upload is in progress."""
    from clearml.backend_interface.model import Model as BackendModel

    return bool(task._reporter.events_waiting()) or BackendModel.get_num_results() > 0


def offline() -> bool:
    return os.environ.get("CLEARML_OFFLINE_MODE", "").strip().lower() in ("1", "true", "yes", "on")
