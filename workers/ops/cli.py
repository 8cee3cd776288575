"""The ``trainbus`` command: operator tools around the pipeline (``trainbus --help``).

On the training machine: ``spool status|gc|replay``. On the worker side: ``dispatch``,
``status``, ``failed``, ``groups``, ``stop``, ``metrics``; and ``demo``. Settings come from
the environment; a bad setting or an unreachable Redis is one line on stderr, not a trace.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import time
from pathlib import Path

import orjson
import redis
from prometheus_client import REGISTRY, start_http_server

from producers.drain import drain, pending_runs
from producers.retention import collect
from producers.spool import run_dirs
from shared.errors import SettingsError
from shared.keys import RUN_STATE_TTL_S, Keys
from shared.redis_client import COMMAND, REDIS_UNAVAILABLE, WORKER, connect
from shared.settings import Settings, WorkerSettings, redact_url
from shared.sinks import SINKS
from workers.devstack import demo
from workers.ops.exporter import RedisCollector
from workers.ops.failed import failed_drains, requeue_failed
from workers.ops.health import dispatcher_problem, worker_problem
from workers.ops.status import format_status, pipeline_status
from workers.pipeline.dispatch import Dispatcher
from workers.pipeline.groups import drop, groups
from workers.pipeline.rq_worker import show_trainbus_logs, worker_command, worker_env


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "func"):
        parser.print_help()
        return 2
    logging.basicConfig(
        level=logging.WARNING if not args.verbose else logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    try:
        return args.func(args)
    except SettingsError as exc:
        print(f"trainbus: bad setting {exc}", file=sys.stderr)
        return 2
    except REDIS_UNAVAILABLE as exc:
        url = redact_url(Settings.from_env().redis_url)
        print(f"trainbus: cannot reach Redis at {url} ({exc}); is it running? (TRAINBUS_REDIS_URL)", file=sys.stderr)
        return 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="trainbus",
        description="Training telemetry off the training loop. Settings come from TRAINBUS_* "
        "environment variables (see the README).",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress at INFO level")
    commands = parser.add_subparsers(title="commands")

    spool = commands.add_parser("spool", help="inspect or push a training machine's local spool")
    spool_commands = spool.add_subparsers(title="spool commands")
    spool_dir_help = "spool directory (default: TRAINBUS_SPOOL_DIR or ~/.local/state/trainbus/spool)"

    status = spool_commands.add_parser("status", help="list runs with events not yet in Redis")
    status.add_argument("--spool-dir", type=Path, help=spool_dir_help)
    status.set_defaults(func=spool_status)

    gc = spool_commands.add_parser(
        "gc",
        help="remove checkpoint snapshots every sink is done with; say why the rest is kept",
        description="A run's snapshots are removed once every sink (consumer group) finished the run, or "
        "TRAINBUS_SNAPSHOT_RETENTION_H hours after its last file changed. The drainer does this on its own; "
        "this does it now.",
    )
    gc.add_argument("--spool-dir", type=Path, help=spool_dir_help)
    gc.set_defaults(func=spool_gc)

    replay = spool_commands.add_parser(
        "replay",
        help="push spooled events to Redis now (after a crash, or instead of the drainer)",
        description="Push every spooled event of runs whose training process is gone, in "
        "order. Events already in Redis are skipped, so replaying twice is harmless.",
    )
    replay.add_argument("run_ids", nargs="*", metavar="RUN", help="runs to push (default: all)")
    replay.add_argument("--spool-dir", type=Path, help=spool_dir_help)
    replay.add_argument(
        "--wait",
        type=float,
        default=10.0,
        metavar="S",
        help="keep retrying an unreachable Redis this many seconds (default 10)",
    )
    replay.set_defaults(func=spool_replay)

    dispatch = commands.add_parser(
        "dispatch",
        help="move stream entries into per-run work and RQ drain jobs (run one or more)",
        description="Reads the event stream through one consumer group per sink "
        "(TRAINBUS_SINKS), records each run's work in Redis, queues one drain job per "
        "(sink, run), enqueues jobs when they come due, and requeues runs whose worker died. "
        "Invalid entries go to the dead-letter stream <namespace>:dead.",
    )
    dispatch.add_argument("--burst", action="store_true", help="exit once the stream has nothing new")
    dispatch.add_argument(
        "--claim-idle",
        type=float,
        default=30.0,
        metavar="S",
        help="claim entries another dispatcher left unacknowledged this long (default 30)",
    )
    dispatch.add_argument(
        "--trim-every",
        type=float,
        default=30.0,
        metavar="S",
        help="trim what every group acknowledged from the stream this often (default 30)",
    )
    dispatch.set_defaults(func=run_dispatch)

    worker = commands.add_parser(
        "worker",
        help="run the RQ worker of a sink (`rq worker <its queue>` with trainbus's worker class)",
        description="The same as `RQ_WORKER_CLASS=workers.pipeline.rq_worker.SinkWorker rq worker QUEUE` "
        "with the sink's queue (in TRAINBUS_NAMESPACE) and Redis from TRAINBUS_REDIS_URL (RQ_REDIS_URL, or RQ_CONFIG "
        "for a Sentinel URL); "
        "further arguments go to `rq worker` (e.g. --burst).",
    )
    worker.add_argument("sink", choices=sorted(SINKS), help="the sink whose queue to serve")
    worker.add_argument("rq_args", nargs=argparse.REMAINDER, help="passed on to `rq worker`")
    worker.set_defaults(func=run_worker)

    health = commands.add_parser(
        "health",
        help="exit 0 when this host's dispatcher or worker of SINK is doing its job (a container healthcheck)",
        description="Healthy worker: an RQ worker started on this host (its hostname) serves the sink's queue and "
        "sent a heartbeat within the last --within seconds. Healthy dispatcher: its consumer on this host read "
        "every sink's consumer group within --within seconds. Exit 1, saying which, otherwise.",
    )
    health.add_argument("process", choices=["dispatcher", *sorted(SINKS)], help="dispatcher, or the sink's worker")
    health.add_argument("--within", type=float, default=45.0, metavar="S", help="age allowed (default 45)")
    health.set_defaults(func=check_health)

    demo.add_parser(commands)

    status = commands.add_parser("status", help="stream lag, pending work per run, queues, failures")
    status.add_argument("--json", action="store_true", help="print JSON instead of text")
    status.set_defaults(func=show_status)

    metrics = commands.add_parser(
        "metrics",
        help="serve Prometheus metrics of the whole pipeline on /metrics",
        description="Counters (events dispatched, uploads by sink/kind/outcome, retries, rate-limit waits, "
        "dead letters, hook-to-upload latency) are kept in Redis by every process; this serves them with "
        "the stream lag and queue depths read at scrape time. Run one per deployment.",
    )
    metrics.add_argument("--port", type=int, default=9108, help="port to listen on (default 9108)")
    metrics.add_argument("--host", default="0.0.0.0", help="address to listen on (default all)")
    metrics.set_defaults(func=serve_metrics)

    groups = commands.add_parser(
        "groups",
        help="the stream's consumer groups (one per sink): fed, abandoned; drop one",
        description="A group no dispatcher fed for TRAINBUS_GROUP_ABANDON_H hours is abandoned: the stream is "
        "trimmed without it. `trainbus groups drop NAME` removes a group (say, of a sink taken out of "
        "TRAINBUS_SINKS); what it had not read is gone for that sink.",
    )
    groups_commands = groups.add_subparsers(title="groups commands")
    groups.set_defaults(func=show_groups)
    drop = groups_commands.add_parser("drop", help="remove a consumer group")
    drop.add_argument("name", help="the group (sink) name, e.g. clearml")
    drop.set_defaults(func=drop_group)

    stop = commands.add_parser(
        "stop",
        help="tell a training run to stop at its next epoch boundary",
        description="Writes the run's stop order in Redis. The training process reads it within about a second; "
        "the Ultralytics callbacks set trainer.stop (the run then ends normally and its final is delivered), "
        "a plain loop sees Publisher.stop_requested. The Ultralytics Platform's cancel button does the same.",
    )
    stop.add_argument("run_id", metavar="RUN", help="the run id (TRAINBUS_RUN_ID)")
    stop.add_argument("--reason", default="stopped by an operator (trainbus stop)", help="what the run is told")
    stop.set_defaults(func=stop_run)

    failed = commands.add_parser("failed", help="list drain jobs that failed for good, with reasons")
    failed.add_argument("--requeue", action="store_true", help="unblock those runs and send their jobs again")
    failed.set_defaults(func=show_failed)
    return parser


def spool_status(args: argparse.Namespace) -> int:
    settings = Settings.from_env(spool_dir=args.spool_dir)
    rows = []
    for run in run_dirs(settings.spool_dir):
        segments = run.segments()
        snapshots = [p for p in run.checkpoint_dir.glob("*") if p.is_file()]
        if segments or snapshots:
            held = sum(p.stat().st_size for p in snapshots)
            rows.append((run, run.pending_bytes() if segments else 0, len(segments), len(snapshots), held))
    if not rows:
        print(f"spool {settings.spool_dir}: empty (everything is in Redis, no snapshot held)")
        return 0
    print(f"spool {settings.spool_dir}:")
    print(f"  {'run':<32} {'event bytes':>12} {'segments':>8} {'snapshots':>9} {'snapshot bytes':>14}  state")
    for run, size, segments, count, held in rows:
        if not run.writer_lock.is_free():
            state = "training process alive"
        elif segments:
            state = "orphaned: run `trainbus spool replay`"
        else:
            state = "snapshots kept until every sink finished the run (`trainbus spool gc` says which)"
        print(f"  {run.run_id:<32} {size:>12} {segments:>8} {count:>9} {held:>14}  {state}")
    return 0


def spool_gc(args: argparse.Namespace) -> int:
    settings = Settings.from_env(spool_dir=args.spool_dir)
    held = collect(
        settings.spool_dir,
        connect(settings.redis_url, COMMAND),
        Keys(settings.namespace),
        settings.snapshot_retention_s,
    )
    if not held:
        print(f"spool {settings.spool_dir}: no snapshot held")
        return 0
    for h in held:
        left = (h.until - time.time()) / 3600
        print(
            f"  {h.run_id}: {h.files} file(s), {h.bytes} bytes, waiting for {', '.join(h.waiting_for)} "
            f"(removed anyway in {left:.1f} h: TRAINBUS_SNAPSHOT_RETENTION_H)"
        )
    return 0


def spool_replay(args: argparse.Namespace) -> int:
    settings = Settings.from_env(spool_dir=args.spool_dir)
    runs = pending_runs(settings.spool_dir, args.run_ids or None)
    if not runs:
        print(f"nothing to replay in {settings.spool_dir}")
        return 0
    print(f"replaying {len(runs)} run(s) from {settings.spool_dir} to {redact_url(settings.redis_url)}")
    report = drain(
        settings.spool_dir,
        settings.redis_url,
        Keys(settings.namespace),
        run_ids=args.run_ids or None,
        give_up_after=args.wait,
        on_progress=lambda run_id, n: print(f"  {run_id}: {n} events pushed"),
        min_replicas=settings.redis_min_replicas,
    )
    if report.runs_left:
        reason = report.last_error or "another process (a drainer?) is pushing them"
        print(f"not done: {', '.join(report.runs_left)} still spooled: {reason}", file=sys.stderr)
        return 1
    print(f"done: {report.pushed} events pushed; {len(report.runs_done)} run(s) fully delivered")
    return 0


def stop_on_sigterm() -> None:
    """SIGTERM (``docker compose stop``) stops like Ctrl-C: the batch in hand finishes, exit status 0."""
    signal.signal(signal.SIGTERM, signal.default_int_handler)


def check_health(args: argparse.Namespace) -> int:
    _, client, keys = worker_side()
    if args.process == "dispatcher":
        problem = dispatcher_problem(client, keys, args.within)
    else:
        problem = worker_problem(client, keys, args.process, args.within)
    if problem:
        print(f"trainbus: {problem}", file=sys.stderr)
        return 1
    return 0


def run_worker(args: argparse.Namespace) -> int:
    """Replace this process with ``rq worker``: signals and exit status are RQ's own."""
    settings = WorkerSettings.from_env()
    command = [*worker_command(Keys(settings.namespace).queue(args.sink)), *args.rq_args]
    os.execve(sys.executable, command, worker_env(os.environ, os.environ.get("RQ_REDIS_URL", settings.redis_url)))
    return 1  # not reached


def run_dispatch(args: argparse.Namespace) -> int:
    settings = WorkerSettings.from_env()
    client = connect(settings.redis_url, WORKER)  # a long-running process: the worker's patience
    dispatcher = Dispatcher(client, settings, claim_idle_s=args.claim_idle, trim_every_s=args.trim_every)
    show_trainbus_logs()
    print(
        f"dispatching {Keys(settings.namespace).events} on {redact_url(settings.redis_url)} "
        f"to {', '.join(settings.sinks)}",
        flush=True,
    )
    stop_on_sigterm()
    try:
        stats = dispatcher.run(burst=args.burst)
    except KeyboardInterrupt:
        stats = dispatcher.stats
    print(
        f"dispatched {stats.entries} entries, {stats.dead_letters} dead letters, "
        f"{stats.jobs_enqueued} drain jobs queued"
    )
    return 0


def serve_metrics(args: argparse.Namespace) -> int:
    settings, client, keys = worker_side()
    REGISTRY.register(RedisCollector(client, keys, settings.sinks))
    start_http_server(args.port, addr=args.host)
    print(f"serving trainbus metrics on http://{args.host}:{args.port}/metrics", flush=True)
    try:
        stop_on_sigterm()
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        return 0


def show_status(args: argparse.Namespace) -> int:
    settings, client, keys = worker_side()
    status = pipeline_status(client, keys, settings.sinks)
    if args.json:
        print(orjson.dumps(status, option=orjson.OPT_INDENT_2).decode())
    else:
        print(format_status(status))
    return 0


def show_groups(args: argparse.Namespace) -> int:
    _, client, keys = worker_side()
    found = groups(client, keys)
    if not found:
        print("no consumer groups (no dispatcher has read the stream yet)")
        return 0
    for g in found:
        fed = "never fed" if g.fed_s_ago is None else f"fed {g.fed_s_ago:.0f} s ago"
        state = " ABANDONED: not waited for when trimming" if g.abandoned else ""
        print(f"{g.name:<12} lag {g.lag}  pending {g.pending}  consumers {g.consumers}  {fed}{state}")
    return 0


def drop_group(args: argparse.Namespace) -> int:
    settings, client, keys = worker_side()
    if args.name in settings.sinks:
        print(f"trainbus: {args.name} is in TRAINBUS_SINKS here; a dispatcher would create it again", file=sys.stderr)
        return 2
    if not drop(client, keys, args.name):
        print(f"trainbus: no consumer group {args.name!r} on the stream", file=sys.stderr)
        return 1
    print(f"dropped consumer group {args.name}")
    return 0


def stop_run(args: argparse.Namespace) -> int:
    _, client, keys = worker_side()
    client.set(keys.stop(args.run_id), args.reason, ex=RUN_STATE_TTL_S)
    alive = client.exists(keys.alive(args.run_id))
    print(
        f"told run {args.run_id} to stop"
        + ("" if alive else " (its producer is not alive now: it will see the order if it comes back)")
    )
    return 0


def show_failed(args: argparse.Namespace) -> int:
    settings, client, keys = worker_side()
    if args.requeue:
        done = requeue_failed(client, keys, settings.sinks)
        print(f"requeued {len(done)} drain job(s)" + "".join(f"\n  {d.sink} {d.run_id}" for d in done))
        return 0
    drains = failed_drains(client, keys, settings.sinks)
    if not drains:
        print("no failed drain jobs")
        return 0
    for d in drains:
        when = d.ended_at.isoformat(timespec="seconds") if d.ended_at else "?"
        print(f"{d.sink:<8} run {d.run_id:<32} failed {when}  job {d.job_id}\n  {d.reason}")
    print("fix the cause, then: trainbus failed --requeue")
    return 1


def worker_side() -> tuple[WorkerSettings, redis.Redis, Keys]:
    """What a one-shot worker-side command needs: settings, a client that answers within
    seconds or fails (``main`` says Redis is not there), the namespace's keys."""
    settings = WorkerSettings.from_env()
    return settings, connect(settings.redis_url, COMMAND), Keys(settings.namespace)


if __name__ == "__main__":
    sys.exit(main())
