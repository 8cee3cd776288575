"""A seeded chaos scenario over the whole system, and the checker that judges it.

Three training producers (``tests.reliability.producer``) run through two dispatchers,
two hub-uploads workers, one clearml worker and one platform worker, against a redis-server
with AOF of our own, the local HUB server, the ClearML test server and the local Platform
server, all real processes. A fault schedule, drawn from a seed, kills and restarts
producers, dispatchers and workers (one in the middle of an upload), restarts Redis and
takes it away for 10 s (with ``failover``: the current primary of a primary, a replica and
three Sentinels, and SIGKILLs the primary: "primary-failover"), makes HUB answer 5xx, 429
with Retry-After, hang or reset, makes the Platform answer 5xx and 429, and takes ClearML
down for a stretch.

The checker compares what every producer's hooks accepted (its intents file) with what
HUB, ClearML and the Platform received. Same seed, same schedule; the timing of the processes still
varies from run to run, which is the point of running it again.
"""

from __future__ import annotations

import hashlib
import itertools
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
from rq import Queue, Worker

from shared.keys import Keys
from shared.redis_client import connect
from tests.clearml_server import ACCESS_KEY, SECRET_KEY
from tests.pipeline import API_KEY, PLATFORM_KEY, ROOT, ClearmlServer, HubServer, Pipeline, PlatformServer
from tests.sentinel_cluster import SentinelCluster
from workers.devstack.embedded_redis import RedisServer

RUNS = 3
JITTER_S = 0.25  # server arrival times vs the limiter's: scheduling delays on a loaded 2-core machine
RATES = {"TRAINBUS_RATE_METRICS": 1.0, "TRAINBUS_RATE_CKPT": 2.0, "TRAINBUS_RATE_HEARTBEAT": 1.0}
REDIS_DOWN_S = 10.0
PLATFORM_LIMIT = ("100", "20")  # events per window of seconds, per key (the Platform's 100/min, faster)
FAULT_KINDS = (
    "kill-producer",
    "kill-dispatcher",
    "kill-worker-mid-upload",
    "restart-redis",
    "redis-down",
    "hub-5xx",
    "hub-429",
    "hub-hang",
    "hub-reset",
    "clearml-down",
    "platform-5xx",
    "platform-429",
)
FAILOVER_KIND = "primary-failover"  # with a Sentinel cluster only (run_scenario's ``failover``)


@dataclass(frozen=True)
class Fault:
    """One step of the schedule: wait ``after`` seconds, then do ``kind`` with ``args``."""

    after: float
    kind: str
    args: dict[str, Any] = field(default_factory=dict)

    def __str__(self) -> str:
        args = " ".join(f"{k}={v}" for k, v in self.args.items())
        return f"+{self.after:4.1f}s {self.kind} {args}".rstrip()


def schedule(seed: int, rounds: int = 1, kinds: tuple[str, ...] = FAULT_KINDS) -> list[Fault]:
    """Every kind of fault ``rounds`` times, in an order and with arguments the seed picks."""
    rng = random.Random(seed)
    kinds = list(kinds) * rounds
    rng.shuffle(kinds)
    # Producers can only be killed while they train: move those kills to the first half.
    kinds.sort(key=lambda k: 0 if k == "kill-producer" and rng.random() < 0.8 else 1)
    faults = []
    for kind in kinds:
        args: dict[str, Any] = {}
        if kind == "kill-producer":
            args = {"producer": rng.randrange(RUNS), "restart_after": round(rng.uniform(0.2, 2.0), 1)}
        elif kind == "kill-dispatcher":
            args = {"dispatcher": rng.randrange(2)}
        elif kind == "hub-5xx":
            args = {
                "endpoint": rng.choice(["metrics", "upload", "heartbeat", "any"]),
                "status": rng.choice([500, 502, 503]),
                "count": rng.randint(2, 6),
            }
        elif kind == "hub-429":
            args = {
                "endpoint": rng.choice(["metrics", "upload", "any"]),
                "status": 429,
                "retry_after": rng.choice([1, 2, 3]),
                "count": rng.randint(2, 5),
            }
        elif kind == "hub-hang":
            args = {"endpoint": rng.choice(["metrics", "upload", "any"]), "hang": 5, "count": 1}
        elif kind == "hub-reset":
            args = {"endpoint": "any", "reset": True, "count": rng.randint(1, 3)}
        elif kind == "clearml-down":
            args = {"seconds": round(rng.uniform(4.0, 8.0), 1)}
        elif kind == "platform-5xx":
            args = {"endpoint": rng.choice(["metrics", "upload_url", "put"]), "status": 503, "count": rng.randint(2, 6)}
        elif kind == "platform-429":
            args = {"endpoint": "metrics", "status": 429, "retry_after": rng.choice([1, 2]), "count": rng.randint(1, 3)}
        faults.append(Fault(round(rng.uniform(0.5, 3.0), 1), kind, args))
    return faults


class Cluster:
    """Every process of the scenario, and the faults that can be done to them."""

    def __init__(self, tmp: Path, namespace: str, epochs: int, pause: float, *, failover: bool = False) -> None:
        self.tmp, self.epochs, self.pause = tmp, epochs, pause
        self.spool = tmp / "spool"
        self.runs_dir = tmp / "runs"
        self.runs_dir.mkdir(parents=True)
        self.run_ids = [f"chaos{i}" for i in range(RUNS)]
        self.models = {run: hashlib.sha256(run.encode()).hexdigest()[:20] for run in self.run_ids}
        self.sentinels = SentinelCluster(tmp / "redis") if failover else None
        self.redis = None if self.sentinels else RedisServer(tmp / "redis", None, "--appendonly", "yes").start()
        self.redis_url = self.sentinels.url if self.sentinels else self.redis.url
        self.hub = HubServer(*self.models.values())
        self.clearml = ClearmlServer()
        self.platform = PlatformServer(
            PLATFORM_KEY, "--events-per-min", PLATFORM_LIMIT[0], "--window", PLATFORM_LIMIT[1]
        )
        self.pipeline = Pipeline(
            self.redis_url,
            namespace,
            self.hub,
            self.spool,
            TRAINBUS_SINKS="hub,clearml,platform",
            TRAINBUS_PLATFORM_EVENTS_PER_MIN=PLATFORM_LIMIT[0],
            TRAINBUS_PLATFORM_WINDOW_S=PLATFORM_LIMIT[1],
            TRAINBUS_PLATFORM_TIMEOUT_S=3,
            **self.platform.env(),
            TRAINBUS_FILE_ROOTS=f"{self.spool}:{self.runs_dir}",
            TRAINBUS_CLEARML_TIMEOUT_S=3,
            TRAINBUS_SPOOL_DIR=self.spool,
            **RATES,
            **self.clearml.env(),
            TRAINBUS_REDIS_MIN_REPLICAS=1 if failover else 0,
        )
        self.keys = Keys(namespace)
        self.dispatchers = [self.pipeline.dispatcher(), self.pipeline.dispatcher()]
        self.hub_workers = [self.pipeline.worker("hub"), self.pipeline.worker("hub")]
        self.clearml_worker = self.pipeline.worker("clearml")
        self.platform_worker = self.pipeline.worker("platform")
        self.producers = [self._start_producer(i) for i in range(RUNS)]
        self.timers: list[threading.Timer] = []

    # -- producers -------------------------------------------------------------------

    def _start_producer(self, i: int) -> subprocess.Popen:
        run = self.run_ids[i]
        log = open(self.runs_dir / f"{run}.log", "ab")  # noqa: SIM115 (the process owns it)
        args = [sys.executable, "-m", "tests.reliability.producer", run, self.models[run]]
        args += [str(self.runs_dir / run), str(self.epochs), str(self.pause)]
        return subprocess.Popen(args, env=self.pipeline.env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)

    def producers_done(self) -> bool:
        return all(p.poll() is not None for p in self.producers)

    def intents(self, run: str) -> list[dict[str, Any]]:
        path = self.runs_dir / run / "intents.jsonl"
        return [orjson.loads(line) for line in path.read_bytes().splitlines()] if path.exists() else []

    # -- faults ----------------------------------------------------------------------

    def apply(self, fault: Fault) -> str:
        """Do one fault; returns what was done, for the printed log."""
        a = fault.args
        if fault.kind == "kill-producer":
            return self.kill_producer(a["producer"], a["restart_after"])
        if fault.kind == "kill-dispatcher":
            self.pipeline.kill(self.dispatchers[a["dispatcher"]])
            self.dispatchers[a["dispatcher"]] = self.pipeline.dispatcher()
            return "killed and replaced"
        if fault.kind == "kill-worker-mid-upload":
            return self.kill_worker_mid_upload()
        if fault.kind == "restart-redis":
            return self.restart_redis(0.0)
        if fault.kind == "redis-down":
            return self.restart_redis(REDIS_DOWN_S)
        if fault.kind == FAILOVER_KIND:
            return self.fail_over()
        if fault.kind == "clearml-down":
            self.clearml.fault(down=True)
            timer = threading.Timer(a["seconds"], self.clearml.fault, kwargs={"down": False})
            timer.start()
            self.timers.append(timer)
            return f"down {a['seconds']} s"
        if fault.kind.startswith("platform-"):
            self.platform.fault(**a)
            return "injected"
        self.hub.fault(**a)
        return "injected"

    def restart_redis(self, down_s: float) -> str:
        """Stop Redis (the current primary), start it again after ``down_s``: long enough, and the
        Sentinels promote the replica meanwhile."""
        node = self.sentinels.current_primary() if self.sentinels else self.redis
        node.stop()
        time.sleep(down_s)
        if not self.sentinels:
            node.start()
            return f"down {down_s:g} s" if down_s else "restarted"
        self.sentinels.restart(node)
        promoted = self.sentinels.primary_port() != node.port
        return f"primary down {down_s:g} s, {'the replica promoted' if promoted else 'no failover'}, in sync again"

    def fail_over(self) -> str:
        """SIGKILL the primary; once the Sentinels promoted the replica, the dead node back as its replica."""
        assert self.sentinels is not None
        killed = time.monotonic()
        dead = self.sentinels.kill_primary()
        promoted_s = time.monotonic() - killed
        self.sentinels.restart(dead)
        return f"primary SIGKILLed, replica promoted in {promoted_s:.1f} s, the old primary in sync as its replica"

    def kill_producer(self, i: int, restart_after: float) -> str:
        """SIGKILL a training producer, then start it again with the same run id and spool."""
        alive = [j for j, p in enumerate(self.producers) if p.poll() is None]
        if not alive:
            return "skipped: every producer has finished"
        i = i if i in alive else alive[0]
        self.producers[i].send_signal(signal.SIGKILL)
        self.producers[i].wait()
        time.sleep(restart_after)
        self.producers[i] = self._start_producer(i)
        return f"killed {self.run_ids[i]}, restarted after {restart_after} s"

    def kill_worker_mid_upload(self) -> str:
        """Slow the next HUB upload down, wait until a worker is inside it, SIGKILL that worker."""
        self.hub.fault(endpoint="upload", delay=4, count=1)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if any(r["status"] == "pending" and r["endpoint"] == "upload" for r in self.hub.requests(status=None)):
                break
            time.sleep(0.05)
        else:
            victim = self.hub_workers[0]
            self.pipeline.kill(victim)
            self.hub_workers[0] = self.pipeline.worker("hub")
            return "no upload started within 15 s: killed a hub worker anyway"
        busy = self._busy_hub_worker_pids()
        i = next((i for i, w in enumerate(self.hub_workers) if w.pid in busy), 0)
        self.pipeline.kill(self.hub_workers[i])
        self.hub_workers[i] = self.pipeline.worker("hub")
        return f"killed hub worker {i} {'mid-upload' if busy else '(no busy worker found)'} and replaced it"

    def _busy_hub_worker_pids(self) -> set[int]:
        client = connect(self.redis_url)
        queue = Queue(self.keys.queue("hub"), connection=client)
        return {w.pid for w in Worker.all(queue=queue) if w.get_current_job_id() and w.pid}

    def stop(self) -> None:
        for timer in self.timers:
            timer.cancel()
        for proc in self.producers:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        self.pipeline.stop()
        self.hub.stop()
        self.clearml.stop()
        self.platform.stop()
        if self.sentinels:
            self.sentinels.stop()
        else:
            self.redis.stop()


# -- the checker -----------------------------------------------------------------------


def expected_scalars(intents: list[dict[str, Any]], pause: float) -> Counter:
    """The ClearML scalars the accepted events make: (title, series, iteration, value)."""
    want: Counter = Counter()
    for i in intents:
        e = i["epoch"]
        if i["kind"] == "train":
            want.update((("train", k, e, v) for k, v in i["train"].items()))
            want.update((("lr", k, e, v) for k, v in i["lr"].items()))
        elif i["kind"] == "fit":
            want.update(((k.split("/")[0], k, e, v) for k, v in i["fit"].items()))  # title: the part before "/"
            want[("Epoch Time", "Epoch Time", e, pause)] += 1
    return want


def rate_problems(model: str, requests: list[dict[str, Any]]) -> list[str]:
    """Arrival gaps per upload type against the limits, and Retry-After honoured.

    Every metrics and heartbeat request counts. For checkpoints only accepted uploads
    count: a failed upload is retried after its backoff, before the next slot (HUB's
    limit is one checkpoint per 900 s; a failure should not cost 15 minutes)."""
    problems = []
    kinds = {
        "metrics": ("metrics", RATES["TRAINBUS_RATE_METRICS"]),
        "ckpt": ("upload", RATES["TRAINBUS_RATE_CKPT"]),
        "heartbeat": ("heartbeat", RATES["TRAINBUS_RATE_HEARTBEAT"]),
    }
    for kind, (endpoint, limit) in kinds.items():
        times = [
            r["ts"]
            for r in requests
            if r["endpoint"] == endpoint
            and (kind != "ckpt" or (r["fields"].get("type") != "final" and r["status"] == 200))
        ]
        for a, b in itertools.pairwise(times):
            if b - a < limit - JITTER_S:
                problems.append(f"{model}: two {kind} requests {b - a:.3f} s apart (limit {limit} s)")
    for n, r in enumerate(requests):
        if r["status"] == 429:
            later = next((s for s in requests[n + 1 :] if s["endpoint"] == r["endpoint"]), None)
            retry_after = float(r.get("retry_after") or 0)
            if later and later["ts"] - r["ts"] < retry_after - JITTER_S:
                problems.append(f"{model}: {r['endpoint']} retried {later['ts'] - r['ts']:.2f} s after a 429")
    return problems


def hub_problems(
    run: str, model: str, mine: list[dict[str, Any]], intents: list[dict[str, Any]]
) -> tuple[list[str], int]:
    """Every accepted epoch once or more with its values, the final last, rate limits held.

    ``mine``: every request HUB recorded for the run's model, in arrival order."""
    problems = rate_problems(model, mine)
    got: dict[int, list[dict]] = {}
    for r in mine:
        if r["endpoint"] == "metrics" and r["status"] == 200:
            for epoch, values in r["metrics"].items():
                got.setdefault(int(epoch), []).append(values)
    want = {i["epoch"]: i["fit"] for i in intents if i["kind"] == "fit"}
    if sorted(got) != sorted(want):
        problems.append(f"{run}: HUB has epochs {sorted(set(got) ^ set(want))} that differ from the accepted ones")
    problems += [
        f"{run}: epoch {e} arrived as {v}, accepted {want.get(e)}"
        for e, vs in got.items()
        for v in vs
        if v != want.get(e)
    ]
    duplicates = sum(len(vs) - 1 for vs in got.values())

    finals = [r for r in mine if r["endpoint"] == "upload" and (r.get("fields") or {}).get("type") == "final"]
    sha = next((i["sha256"] for i in intents if i["kind"] == "final"), None)
    if not any(r["status"] == 200 and sha in {f["sha256"] for f in r["files"].values()} for r in finals):
        problems.append(f"{run}: no final upload of best.pt (sha256 {sha}) reached HUB")
    elif any(r["ts"] > finals[-1]["ts"] for r in mine):
        problems.append(
            f"{run}: requests after the final: {[r['endpoint'] for r in mine if r['ts'] > finals[-1]['ts']]}"
        )
    if finals and any(r["endpoint"] == "metrics" and r["ts"] > finals[0]["ts"] for r in mine):
        problems.append(f"{run}: metrics sent after the final upload began")
    return problems, duplicates


def clearml_problems(state: dict[str, Any], run: str, intents: list[dict[str, Any]], pause: float) -> list[str]:
    """One completed task per run; each accepted scalar exactly once; the output model set."""
    tasks = [t for t in state["tasks"].values() if t.get("name") == run]
    if len(tasks) != 1:
        return [f"{run}: {len(tasks)} ClearML tasks (want 1)"]
    task = tasks[0]
    problems = [] if task["status"] == "completed" else [f"{run}: ClearML task is {task['status']}"]
    got = Counter(
        (e["metric"], e["variant"], e["iter"], e["value"])
        for e in state["events"]
        if e.get("task") == task["id"] and e["type"] == "training_stats_scalar" and e["metric"] != "Summary"
    )
    want = expected_scalars(intents, pause)
    if got != want:
        problems.append(f"{run}: ClearML scalars missing {dict(want - got)}, extra {dict(got - want)}")
    if not task.get("models", {}).get("output"):
        problems.append(f"{run}: ClearML task has no output model")
    return problems


def platform_problems(
    run: str, models: list[dict[str, Any]], requests: list[dict[str, Any]], intents
) -> tuple[list[str], int]:
    """One model (a restarted producer resumes it: a new Platform run of it each time); every accepted
    epoch with its values (a resend after a lost reply is allowed: keyed by epoch); the final's
    checkpoint promoted with best.pt's sha256; training_complete last."""
    mine = [m for m in models if m["slug"] == run]
    if len(mine) != 1:
        return [f"{run}: {len(mine)} Platform models (want 1)"], 0
    platform_run = mine[0]["runs"][-1]
    want = {i["epoch"]: i["fit"] for i in intents if i["kind"] == "fit"}
    got: dict[int, list[dict]] = {}
    for e in (e for r in mine[0]["runs"] for e in r["epochs"]):
        got.setdefault(e["epoch"], []).append(e["metrics"])
    problems = []
    if sorted(got) != sorted(want):
        problems.append(
            f"{run}: the Platform has epochs {sorted(set(got) ^ set(want))} that differ from the accepted ones"
        )
    problems += [f"{run}: epoch {e} arrived as {v}" for e, vs in got.items() for v in vs if v != want.get(e)]
    end = platform_run["end"] or {}
    sha = next((i["sha256"] for i in intents if i["kind"] == "final"), None)
    promoted = {c["modelPath"]: c["sha256"] for r in mine[0]["runs"] for c in r["checkpoints"]}
    if end.get("event") != "training_complete":
        problems.append(f"{run}: the Platform run ended with {end.get('event')}")
    elif promoted.get(end["results"].get("modelPath")) != sha:
        problems.append(f"{run}: training_complete's model is not best.pt (sha256 {sha})")
    events = [r for r in requests if r["endpoint"] == "metrics" and r["status"] == 200]
    completes = [
        r for r in events if r.get("event") == "training_complete" and r["json"].get("modelId") == mine[0]["id"]
    ]
    if completes and any(r["ts"] > completes[-1]["ts"] and r["json"].get("modelId") == mine[0]["id"] for r in events):
        problems.append(f"{run}: Platform events after training_complete")
    return problems, sum(len(vs) - 1 for vs in got.values())


def platform_limit_problems(requests: list[dict[str, Any]]) -> list[str]:
    """No more event requests of the key in any window than its limit, and none refused for it."""
    limit, window = int(PLATFORM_LIMIT[0]), float(PLATFORM_LIMIT[1])
    arrivals = sorted(r["ts"] for r in requests if r["endpoint"] in ("metrics", "models"))
    busiest = max((sum(1 for t in arrivals if start <= t < start + window) for start in arrivals), default=0)
    problems = []
    if busiest > limit:
        problems.append(f"Platform: {busiest} event requests of one key within {window:g} s (limit {limit})")
    if limited := [r for r in requests if r.get("limited")]:
        problems.append(f"Platform: {len(limited)} requests refused by its own limit")
    return problems


def secret_problems(cluster: Cluster) -> list[str]:
    """The HUB and Platform API keys and the ClearML secret appear in no Redis key or value and no log."""
    secrets = (API_KEY.encode(), SECRET_KEY.encode(), ACCESS_KEY.encode(), PLATFORM_KEY.encode())
    client = connect(cluster.redis_url)
    problems = []
    for name in client.scan_iter(match="*"):
        dumped = client.dump(name) or b""
        problems += [f"secret in Redis key {name!r}" for s in secrets if s in name or s in dumped]
    for log in [*cluster.spool.glob("proc-*.log"), *cluster.runs_dir.glob("*.log")]:
        problems += [f"secret in {log.name}" for s in secrets if s in log.read_bytes()]
    return problems


@dataclass
class Outcome:
    seed: int
    log: list[str]
    problems: list[str]
    delivered_s: float
    hub_duplicates: int

    def summary(self) -> str:
        verdict = "held" if not self.problems else f"{len(self.problems)} problems"
        lines = [f"chaos seed {self.seed}: {verdict}; delivered {self.delivered_s:.0f} s after the start"]
        lines += [f"  {line}" for line in self.log]
        lines.append(
            f"  epochs HUB or the Platform received more than once: {self.hub_duplicates} (allowed: keyed by epoch)"
        )
        lines += [f"  PROBLEM {p}" for p in self.problems]
        return "\n".join(lines)


def delivered(cluster: Cluster) -> bool:
    """Producers finished, every run's final at HUB, every ClearML task completed."""
    if not cluster.producers_done():
        return False
    finals = {r["model"] for r in cluster.hub.requests("upload") if r["fields"].get("type") == "final"}
    if not set(cluster.models.values()) <= finals:
        return False
    done = {t.get("name") for t in cluster.clearml.state()["tasks"].values() if t["status"] == "completed"}
    if not set(cluster.run_ids) <= done:
        return False
    ended = {m["slug"] for m in cluster.platform.models() if m["runs"] and m["runs"][-1]["end"]}
    return set(cluster.run_ids) <= ended


def run_scenario(
    seed: int, tmp: Path, *, epochs: int, pause: float, rounds: int, deadline_s: float, failover: bool = False
) -> Outcome:
    """Run the system under the seed's schedule, wait for delivery, check everything. ``failover``: Redis
    is a primary, a replica and three Sentinels (TRAINBUS_REDIS_MIN_REPLICAS=1), and "primary-failover"
    joins the fault kinds."""
    faults = schedule(seed, rounds, (*FAULT_KINDS, FAILOVER_KIND) if failover else FAULT_KINDS)
    redis_kind = "a Sentinel cluster, MIN_REPLICAS=1" if failover else "one Redis"
    log = [f"{len(faults)} faults, {RUNS} producers x {epochs} epochs, {pause} s per epoch, {redis_kind}"]
    namespace = f"chaos-{seed}"
    cluster = Cluster(tmp, namespace, epochs, pause, failover=failover)
    started = time.monotonic()
    try:
        for fault in faults:
            time.sleep(fault.after)
            at = time.monotonic() - started
            log.append(f"{at:5.1f}s {fault.kind} {fault.args or ''} -> {cluster.apply(fault)}")
        while not delivered(cluster) and time.monotonic() - started < deadline_s:
            time.sleep(0.5)
        delivered_s = time.monotonic() - started
        time.sleep(max(RATES.values()) + 0.5)  # anything sent after the final would show up now
        problems = [
            f"producer {run} exited {p.returncode}"
            for run, p in zip(cluster.run_ids, cluster.producers, strict=True)
            if p.returncode
        ]
        if delivered_s >= deadline_s:
            problems.append(f"not delivered within {deadline_s:.0f} s")
        state, requests = cluster.clearml.state(), cluster.hub.requests(status=None)
        models, platform_requests = cluster.platform.models(), cluster.platform.requests()
        problems += platform_limit_problems(platform_requests)
        duplicates = 0
        for run, model in cluster.models.items():
            intents = cluster.intents(run)
            if not any(i["kind"] == "end" for i in intents):
                problems.append(f"{run}: the producer never handed over its end")
            hub, dup = hub_problems(run, model, [r for r in requests if r["model"] == model], intents)
            problems += hub + clearml_problems(state, run, intents, pause)
            platform, platform_dup = platform_problems(run, models, platform_requests, intents)
            problems += platform
            duplicates += dup + platform_dup
        problems += secret_problems(cluster)
        if problems:  # what HUB and ClearML saw, to look into
            dump = tmp / f"chaos-{seed}.json"
            seen = {"hub": requests, "clearml": state, "platform": models, "platform_requests": platform_requests}
            dump.write_bytes(orjson.dumps(seen, option=orjson.OPT_INDENT_2))
            log.append(f"HUB requests, ClearML state and Platform models: {dump}")
        return Outcome(seed, log, problems, delivered_s, duplicates)
    finally:
        cluster.stop()
