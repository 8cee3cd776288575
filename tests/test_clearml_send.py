"""Reports are sent once through a ClearML outage: the sink never sends beside the SDK's own thread.

clearml 2.1's ``task.flush(wait_for_uploads=True)``, after waiting 10 s, sends the pending
events from the caller's thread while the SDK's thread is still retrying the same list:
the server then gets them twice. ``ClearmlSink._send_reports`` only wakes the SDK's thread
and watches its queue. The scenario (found by the soak run, pinned down with the SDK's
source): the SDK's thread takes events 1-6 on its 5 s tick while the server is down, events
7-9 are reported, the sink asks for a send that times out (3 s), the outage ends at 7.5 s.
"""

from __future__ import annotations

import collections
import subprocess
import sys

import pytest

from tests.pipeline import ROOT, ClearmlServer

SCENARIO = """
import sys, time
import redis
from clearml import Task
from shared.keys import Keys
from shared.settings import WorkerSettings
from tests.pipeline import ClearmlServer
from workers.clearml_sink import ClearmlSink, ClearmlTimeout

redis_url, namespace, url = sys.argv[1:4]
server = ClearmlServer.__new__(ClearmlServer)
server.url = url
settings = WorkerSettings.from_env({}, redis_url=redis_url, namespace=namespace, clearml_timeout_s=3.0)
sink = ClearmlSink(redis.Redis.from_url(redis_url), Keys(namespace), settings)
task = Task._create(project_name="send-once", task_name="outage", task_type=Task.TaskTypes.training)
logger = task.get_logger()
logger.report_scalar("warm", "w", 0.0, iteration=0)
sink._send_reports(task)
started = time.monotonic()
time.sleep(4.6)  # just before the SDK thread's 5 s tick
server.fault(down=True)
for i in range(1, 7):
    logger.report_scalar("x", "s", float(i), iteration=i)
time.sleep(0.9)  # the tick took 1-6 and is stuck retrying
for i in range(7, 10):
    logger.report_scalar("x", "s", float(i), iteration=i)
try:
    sink._send_reports(task)
except ClearmlTimeout:
    print("timed out, as expected", flush=True)
time.sleep(max(0.0, 4.6 + 7.5 - (time.monotonic() - started)))
server.fault(down=False)
# the next job: wait until everything is taken
settings_long = WorkerSettings.from_env({}, redis_url=redis_url, namespace=namespace, clearml_timeout_s=120.0)
ClearmlSink(sink.client, sink.keys, settings_long)._send_reports(task)
time.sleep(6)  # a late second send would show up now
print("done", flush=True)
"""


@pytest.mark.timeout(120)
def test_reports_are_sent_once_through_an_outage(redis_url, namespace, tmp_path):
    server = ClearmlServer()
    try:
        env = {
            "PATH": "/usr/bin:/bin",
            "HOME": str(tmp_path),
            "PYTHONPATH": str(ROOT),
            **server.env(),
        }
        out = subprocess.run(
            [sys.executable, "-c", SCENARIO, redis_url, namespace, server.url],
            env=env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=100,
        )
        assert "done" in out.stdout, out.stderr[-3000:]
        sent = collections.Counter((e["iter"], e["value"]) for e in server.state()["events"] if e.get("metric") == "x")
    finally:
        server.stop()
    assert sorted(sent) == [(i, float(i)) for i in range(1, 10)]
    assert max(sent.values()) == 1, f"sent twice: {sorted(k for k, n in sent.items() if n > 1)}"
