"""``trainbus demo``: a small real training with the whole pipeline around it, on one machine.

A tiny CNN learns to tell two kinds of generated images apart on the CPU. A trainer that
behaves like Ultralytics' (same attributes, same callback order, real ``last.pt``/``best.pt``
rewritten in place, mosaics drawn late, a ``results.png``) drives the Ultralytics callbacks.
Around it: Redis (``TRAINBUS_REDIS_URL`` if it answers, else an embedded redis-server),
the local HUB server (unless ``TRAINBUS_HUB_API_URL``/``TRAINBUS_HUB_API_KEY`` are set),
ClearML in offline mode (unless ``CLEARML_API_ACCESS_KEY`` is set), a local ``mlflow server``
(unless ``MLFLOW_TRACKING_URI`` is set; needs ``mlflow`` installed), a dispatcher and one
``rq worker`` per queue as processes. Exit status 0 only when everything was delivered.

With ``--stack`` the demo only trains: the dispatcher and workers already running against
``TRAINBUS_REDIS_URL`` (the compose stack: ``docker compose --profile demo run --rm demo``)
deliver, to wherever they are configured to (``--profile devstack``: the local Platform).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import orjson
import redis

from producers.ultralytics import UltralyticsHooks
from shared.keys import Keys
from shared.redis_client import COMMAND, REDIS_UNAVAILABLE, Timeouts, connect
from shared.settings import Settings, WorkerSettings, redact_url
from shared.sinks import SINKS
from workers.devstack.embedded_redis import RedisServer
from workers.devstack.http_double import DoubleServer, Fault
from workers.devstack.local_hub import LocalHub
from workers.devstack.local_mlflow import MlflowServer
from workers.devstack.local_platform import LocalPlatform
from workers.pipeline.rq_worker import worker_command, worker_env
from workers.sinks.registry import sink_class

DEMO_API_KEY = "d" * 42
DEMO_PLATFORM_KEY = "ul_" + "d" * 40
DEFAULT_SINKS = ("platform", "clearml")
DEMO_MODEL = "DemoModel00000000000"  # 20 characters, as HUB model ids are


@dataclass
class Stack:
    """Everything the demo started, so that it can all be stopped."""

    workdir: Path
    redis_url: str = ""
    namespace: str = ""
    redis: RedisServer | None = None
    hub: LocalHub | None = None
    platform: LocalPlatform | None = None
    mlflow: MlflowServer | None = None
    procs: list[subprocess.Popen] = field(default_factory=list)
    sinks: tuple[str, ...] = ("hub", "clearml")
    env: dict[str, str] = field(default_factory=dict)

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
        for server in (self.hub, self.platform):
            if server is not None:
                server.shutdown()
        if self.mlflow is not None:
            self.mlflow.stop()
        if self.redis is not None:
            self.redis.stop()


def add_parser(commands: Any) -> None:
    demo = commands.add_parser(
        "demo",
        help="run a small real training with the whole pipeline around it",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    demo.add_argument(
        "--sink",
        action="append",
        choices=sorted(SINKS),
        help="deliver to this sink (repeatable; default: platform and clearml). Local servers stand in for "
        "HUB and the Platform unless their URL and key are set; ClearML runs offline unless its keys are set; "
        "a local mlflow server is started unless MLFLOW_TRACKING_URI is set",
    )
    demo.add_argument(
        "--stack",
        action="store_true",
        help="only train and publish: the dispatcher and workers already running against TRAINBUS_REDIS_URL "
        "deliver (sinks: TRAINBUS_SINKS, namespace: TRAINBUS_NAMESPACE); the compose stack's demo service",
    )
    demo.add_argument("--epochs", type=int, default=6, help="training epochs (default 6)")
    demo.add_argument("--rate-metrics", type=float, default=1.0, help="seconds between HUB metrics requests")
    demo.add_argument("--rate-ckpt", type=float, default=3.0, help="seconds between HUB checkpoint uploads")
    demo.add_argument("--rate-heartbeat", type=float, default=2.0, help="seconds between HUB heartbeats")
    demo.add_argument(
        "--hub-fault",
        action="append",
        default=[],
        metavar="FAULT",
        help="inject into the local HUB: 503x3, 429, hang, reset (repeatable)",
    )
    demo.add_argument("--workdir", type=Path, help="where run files go (default: a new temporary directory)")
    demo.add_argument("--timeout", type=float, default=180.0, help="give up waiting for delivery after S seconds")
    demo.add_argument("--summary-json", type=Path, help="also write the summary (and what HUB received) here")
    demo.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    workdir = (args.workdir or Path(tempfile.mkdtemp(prefix="trainbus-demo-"))).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    stack = Stack(workdir, sinks=tuple(dict.fromkeys(args.sink or DEFAULT_SINKS)))
    try:
        if args.stack:
            join_stack(stack, args)
        else:
            start_stack(stack, args)
        report = train(stack, args.epochs)
        delivered = wait_delivered(stack, report, args.timeout)
        summary = summarize(stack, report, delivered)
        print_summary(summary)
        if args.summary_json:
            args.summary_json.write_bytes(orjson.dumps(summary, option=orjson.OPT_INDENT_2))
        return 0 if delivered else 1
    finally:
        stack.stop()


# -- the stack -------------------------------------------------------------------------------


def start_stack(stack: Stack, args: argparse.Namespace) -> None:
    wanted = os.environ.get("TRAINBUS_REDIS_URL", "redis://127.0.0.1:6379/0")
    if answers(wanted):
        stack.redis_url = wanted
        print(f"redis:    {redact_url(wanted)} (answering)")
    else:
        stack.redis = RedisServer(stack.workdir / "redis").start()
        stack.redis_url = stack.redis.url
        print(f"redis:    nothing at {redact_url(wanted)}; started an embedded redis-server at {stack.redis_url}")
    stack.namespace = f"demo-{time.strftime('%H%M%S')}-{os.getpid()}"
    env = dict(
        os.environ,
        TRAINBUS_REDIS_URL=stack.redis_url,
        TRAINBUS_NAMESPACE=stack.namespace,
        TRAINBUS_SINKS=",".join(stack.sinks),
        TRAINBUS_SPOOL_DIR=str(stack.workdir / "spool"),
        TRAINBUS_FILE_ROOTS=str(stack.workdir),
        TRAINBUS_RATE_METRICS=str(args.rate_metrics),
        TRAINBUS_RATE_CKPT=str(args.rate_ckpt),
        TRAINBUS_RATE_HEARTBEAT=str(args.rate_heartbeat),
        TRAINBUS_HUB_TIMEOUT_S="5",
        TRAINBUS_CLEARML_TIMEOUT_S="10",
        TRAINBUS_EXIT_FLUSH_S="10",
    )
    faults = [parse_fault(f) for f in args.hub_fault]
    for sink in stack.sinks:
        STARTERS[sink](stack, env, faults)
    stack.env = env = worker_env(env, stack.redis_url)
    logs = stack.workdir / "logs"
    logs.mkdir(exist_ok=True)
    keys = Keys(stack.namespace)
    commands = {
        "dispatcher": [sys.executable, "-m", "workers.ops.cli", "dispatch"],
        **{f"worker-{sink}": worker_command(keys.queue(sink)) for sink in stack.sinks},
    }
    for name, command in commands.items():
        with open(logs / f"{name}.log", "wb") as log:
            stack.procs.append(subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT))
    queues = ", ".join(f"rq worker {keys.queue(sink)}" for sink in stack.sinks)
    print(f"workers:  dispatcher, {queues} (logs in {logs})")


def join_stack(stack: Stack, args: argparse.Namespace) -> None:
    """The running stack's Redis, namespace and sinks; nothing is started."""
    settings = WorkerSettings.from_env()
    stack.redis_url = settings.redis_url
    if not answers(stack.redis_url):
        raise SystemExit(f"--stack: no Redis answers at {redact_url(stack.redis_url)}; is the stack up?")
    stack.namespace = settings.namespace
    stack.sinks = tuple(dict.fromkeys(args.sink or settings.sinks))
    stack.env = dict(os.environ, TRAINBUS_SPOOL_DIR=os.environ.get("TRAINBUS_SPOOL_DIR", str(stack.workdir / "spool")))
    print(f"redis:    {redact_url(stack.redis_url)}, namespace {stack.namespace}")
    print(f"workers:  the stack's, for {', '.join(stack.sinks)}")


def start_hub(stack: Stack, env: dict[str, str], faults: list[Fault]) -> None:
    """The local HUB server, unless TRAINBUS_HUB_API_URL and TRAINBUS_HUB_API_KEY are set."""
    if os.environ.get("TRAINBUS_HUB_API_URL") and os.environ.get("TRAINBUS_HUB_API_KEY"):
        print(f"hub:      {os.environ['TRAINBUS_HUB_API_URL']}")
        return
    stack.hub = serve(LocalHub(0, DEMO_API_KEY, (DEMO_MODEL,)), faults)
    env.update(TRAINBUS_HUB_API_URL=stack.hub.url, TRAINBUS_HUB_API_KEY=DEMO_API_KEY, TRAINBUS_HUB_MODEL=DEMO_MODEL)
    print(f"hub:      local HUB server at {stack.hub.url}" + (f", faults {faults}" if faults else ""))


def start_platform(stack: Stack, env: dict[str, str], faults: list[Fault]) -> None:
    """The local Platform server, unless TRAINBUS_PLATFORM_URL and TRAINBUS_PLATFORM_API_KEY are set."""
    if os.environ.get("TRAINBUS_PLATFORM_URL") and os.environ.get("TRAINBUS_PLATFORM_API_KEY"):
        print(f"platform: {os.environ['TRAINBUS_PLATFORM_URL']}")
        return
    stack.platform = serve(LocalPlatform(0, DEMO_PLATFORM_KEY), [platform_fault(f) for f in faults])
    env.update(
        TRAINBUS_PLATFORM_URL=stack.platform.url,
        TRAINBUS_PLATFORM_API_KEY=DEMO_PLATFORM_KEY,
        TRAINBUS_PLATFORM_PROJECT=os.environ.get("TRAINBUS_PLATFORM_PROJECT", "demo/trainbus-demo"),
    )
    print(f"platform: local Platform server at {stack.platform.url}" + (f", faults {faults}" if faults else ""))


def start_clearml(stack: Stack, env: dict[str, str], faults: list[Fault]) -> None:
    """ClearML offline, unless CLEARML_API_ACCESS_KEY (and the other CLEARML_*) are set."""
    if os.environ.get("CLEARML_API_ACCESS_KEY"):
        print(f"clearml:  {os.environ.get('CLEARML_API_HOST', 'configured server')}")
        return
    env.update(CLEARML_OFFLINE_MODE="1", CLEARML_CACHE_DIR=str(stack.workdir / "clearml"))
    print(f"clearml:  offline mode, sessions under {stack.workdir / 'clearml' / 'offline'}")


def start_mlflow(stack: Stack, env: dict[str, str], faults: list[Fault]) -> None:
    """A local ``mlflow server`` (its UI at the URL printed), unless MLFLOW_TRACKING_URI is set."""
    if os.environ.get("MLFLOW_TRACKING_URI"):
        print(f"mlflow:   {redact_url(os.environ['MLFLOW_TRACKING_URI'])}")
        return
    try:
        import mlflow.server  # noqa: F401 - the server, not only the client
    except ImportError:
        raise SystemExit("--sink mlflow starts a local mlflow server, which needs mlflow: pip install mlflow") from None
    (stack.workdir / "mlflow").mkdir(exist_ok=True)
    print("mlflow:   starting a local mlflow server (about 10 s)...", flush=True)
    stack.mlflow = MlflowServer(stack.workdir / "mlflow", auth=False).start()
    env.update(MLFLOW_TRACKING_URI=stack.mlflow.url)
    print(f"mlflow:   local mlflow server at {stack.mlflow.url} (its UI there while the demo runs)")


STARTERS = {"hub": start_hub, "platform": start_platform, "clearml": start_clearml, "mlflow": start_mlflow}


def serve(server: DoubleServer, faults: list[Fault]) -> Any:
    """Run a local protocol server in a thread, with faults to inject."""
    server.recorder.faults.extend(faults)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def platform_fault(fault: Fault) -> Fault:
    """A HUB fault of the demo's --hub-fault, on the Platform's matching endpoint."""
    endpoint = {"metrics": "metrics", "upload": "upload_url"}.get(fault.endpoint, fault.endpoint)
    return dataclasses.replace(fault, endpoint=endpoint)


def answers(url: str) -> bool:
    try:
        return bool(connect(url, Timeouts(connect=1, socket=1)).ping())
    except (redis.RedisError, OSError, ValueError):
        return False


def parse_fault(text: str) -> Fault:
    """``503x3`` -> three 503s on metrics; ``429`` (Retry-After 2) / ``hang`` / ``reset`` on uploads."""
    if text == "hang":
        return Fault(endpoint="metrics", hang=8.0)
    if text == "reset":
        return Fault(endpoint="upload", reset=True)
    status, _, count = text.partition("x")
    if not status.isdigit():
        raise SystemExit(f"--hub-fault {text!r}: use 503x3, 429, hang or reset")
    if status == "429":
        return Fault(endpoint="upload", status=429, retry_after=2.0, count=int(count or 1))
    return Fault(endpoint="metrics", status=int(status), count=int(count or 1))


# -- the training ----------------------------------------------------------------------------


@dataclass
class TrainReport:
    run_id: str
    epochs: int
    events: int
    hook_us: list[float]
    last_event_at: float
    save_dir: Path


class DemoTrainer:
    """Behaves like an Ultralytics trainer towards its callbacks (attributes, order, files)."""

    def __init__(self, save_dir: Path, epochs: int) -> None:
        import torch

        self.torch = torch
        self.args = SimpleNamespace(
            model="tinycnn.yaml",
            data="generated-squares",
            epochs=epochs,
            imgsz=16,
            batch=16,
            name="demo",
            project="trainbus-demo",
            task="classify",
        )
        self.save_dir, self.epochs = save_dir, epochs
        (save_dir / "weights").mkdir(parents=True, exist_ok=True)
        self.last, self.best = save_dir / "weights" / "last.pt", save_dir / "weights" / "best.pt"
        self.fitness = self.best_fitness = None
        self.metrics: dict[str, float] = {}
        self.validator = SimpleNamespace(save_dir=save_dir, metrics=SimpleNamespace(results_dict={}))
        (save_dir / "args.yaml").write_text("".join(f"{k}: {v}\n" for k, v in vars(self.args).items()))
        torch.manual_seed(0)
        self.model = torch.nn.Sequential(
            torch.nn.Conv2d(1, 8, 3, padding=1),
            torch.nn.ReLU(),
            torch.nn.AdaptiveAvgPool2d(4),
            torch.nn.Flatten(),
            torch.nn.Linear(128, 2),
        )
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.1, momentum=0.9)
        self.images, self.labels = generated_images(torch, 4096)
        self.history: list[float] = []

    def label_loss_items(self, loss_items: Any = None, prefix: str = "train") -> Any:
        keys = [f"{prefix}/cls_loss"]
        if loss_items is None:
            return keys
        return {keys[0]: round(float(loss_items["cls"]), 5)}

    def train_epoch(self, epoch: int) -> None:
        torch = self.torch
        self.model.train()
        total = 0.0
        for i in range(0, len(self.images), 16):
            x, y = self.images[i : i + 16], self.labels[i : i + 16]
            loss = torch.nn.functional.cross_entropy(self.model(x), y)
            self.optimizer.zero_grad()
            loss.backward()
            self.optimizer.step()
            total += loss.item() * len(x)
            if epoch == 0 and i // 16 < 3:  # drawn in a thread, like Ultralytics' mosaics: they appear late
                threading.Thread(target=save_grid, args=(x, self.save_dir / f"train_batch{i // 16}.jpg", 0.5)).start()
        self.tloss = {"cls": torch.tensor(total / len(self.images))}
        self.lr = {"lr/pg0": self.optimizer.param_groups[0]["lr"]}

    def validate(self) -> None:
        torch = self.torch
        self.model.eval()
        with torch.no_grad():
            logits = self.model(self.images[:128])
            accuracy = float((logits.argmax(1) == self.labels[:128]).float().mean())
            val_loss = float(torch.nn.functional.cross_entropy(logits, self.labels[:128]))
        self.metrics = {"metrics/accuracy_top1": accuracy, "val/loss": val_loss}
        self.fitness = accuracy
        self.best_fitness = max(self.best_fitness or 0.0, accuracy)
        self.history.append(val_loss)
        save_grid(self.images[:16], self.save_dir / "val_batch0_pred.jpg")
        with open(self.save_dir / "results.csv", "a") as results:  # a row per validation, as Ultralytics writes
            results.write(f"{len(self.history)},{val_loss:.5g},{accuracy:.5g}\n")

    def save_model(self) -> None:
        """In place, as Ultralytics does: last.pt always, best.pt when fitness is the best."""
        state = {"epoch": self.epoch, "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()}
        self.torch.save(state, self.last)
        if self.fitness == self.best_fitness:
            self.best.write_bytes(self.last.read_bytes())


def generated_images(torch: Any, n: int) -> tuple[Any, Any]:
    """16x16 grey images: class 1 has a bright square, class 0 only noise."""
    labels = torch.randint(0, 2, (n,))
    images = torch.rand(n, 1, 16, 16) * 0.5
    for i in torch.nonzero(labels).flatten().tolist():
        x, y = torch.randint(0, 10, (2,)).tolist()
        images[i, 0, y : y + 6, x : x + 6] += 0.5
    return images, labels


def save_grid(images: Any, path: Path, delay: float = 0.0) -> None:
    from PIL import Image

    time.sleep(delay)
    tiles = [Image.fromarray((img[0].clamp(0, 1) * 255).byte().numpy()).resize((64, 64)) for img in images[:16]]
    grid = Image.new("L", (256, 256))
    for k, tile in enumerate(tiles):
        grid.paste(tile, ((k % 4) * 64, (k // 4) * 64))
    grid.save(path)


def save_results_plot(values: list[float], path: Path) -> None:
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (320, 200), "white")
    draw = ImageDraw.Draw(img)
    top, bottom = max(values), min(values)
    span = (top - bottom) or 1.0
    points = [(20 + i * 280 / max(1, len(values) - 1), 180 - (v - bottom) / span * 160) for i, v in enumerate(values)]
    draw.line(points, fill="blue", width=3)
    draw.text((20, 5), "val/loss per epoch", fill="black")
    img.save(path)


def train(stack: Stack, epochs: int) -> TrainReport:
    """Run the training in this process, with the callbacks timed on every call."""

    hooks = UltralyticsHooks(Settings.from_env(stack.env), fixed_run_id=False)
    callbacks = hooks.callbacks()
    hook_us: list[float] = []

    def call(name: str, obj: Any) -> None:
        t0 = time.perf_counter_ns()
        callbacks[name](obj)
        if name != "on_pretrain_routine_start":  # opening the spool once is start-up, not a hook
            hook_us.append((time.perf_counter_ns() - t0) / 1000)

    save_dir = unused_dir(stack.workdir / "runs" / "demo")
    t = DemoTrainer(save_dir, epochs)
    call("on_pretrain_routine_start", t)
    call("on_pretrain_routine_end", t)
    call("on_train_start", t)
    for epoch in range(epochs):
        t.epoch = epoch
        started = time.monotonic()
        t.train_epoch(epoch)
        call("on_train_epoch_end", t)
        call("on_val_start", t.validator)
        t.validate()
        call("on_val_end", t.validator)
        t.save_model()
        call("on_model_save", t)
        t.epoch_time = round(time.monotonic() - started, 3)
        call("on_fit_epoch_end", t)
        servers = [s for s in (stack.hub, stack.platform) if s is not None]
        received = sum(len(s.recorder.requests) for s in servers)
        received_text = f"  requests at the local servers {received}" if servers else ""
        events = hooks.publisher.next_seq if hooks.publisher else 0
        print(
            f"epoch {epoch + 1}/{epochs}: loss {float(t.tloss['cls']):.3f} acc {t.metrics['metrics/accuracy_top1']:.2f}"
            f"  events {events}{received_text}  queues {queue_depths(stack)}",
            flush=True,
        )
    t.epoch = epochs  # the final validation's extra on_fit_epoch_end, as in Ultralytics
    t.validate()
    call("on_fit_epoch_end", t)
    t.epoch = epochs - 1
    for weights in (t.last, t.best):  # stripped of the optimizer in place
        t.torch.save({"epoch": epochs - 1, "model": t.model.state_dict()}, weights)
    save_results_plot(t.history, save_dir / "results.png")
    t.validator.metrics.results_dict = dict(t.metrics)
    call("on_train_end", t)
    bus = hooks.publisher
    assert bus is not None
    events = bus.next_seq
    last_event_at = time.time()
    bus.close()
    return TrainReport(bus.run_id, epochs, events, hook_us, last_event_at, save_dir)


def unused_dir(path: Path) -> Path:
    """``demo``, else ``demo2``, ``demo3``... as Ultralytics names runs: a second demo keeps the first's files."""
    n = 1
    while (candidate := path.with_name(f"{path.name}{n if n > 1 else ''}")).exists():
        n += 1
    return candidate


def queue_depths(stack: Stack) -> str:
    client = connect(stack.redis_url, COMMAND)
    keys = Keys(stack.namespace)
    try:
        return " ".join(f"{sink}={client.llen('rq:queue:' + keys.queue(sink))}" for sink in stack.sinks)
    except REDIS_UNAVAILABLE:  # the training goes on; its events wait in the spool
        return "(Redis not answering)"


# -- delivery and the summary ------------------------------------------------------------


def wait_delivered(stack: Stack, report: TrainReport, timeout: float) -> bool:
    client = connect(stack.redis_url, COMMAND)
    keys = Keys(stack.namespace)
    deadline = time.monotonic() + timeout
    print(f"training done; waiting for {', '.join(stack.sinks)} to receive everything ...", flush=True)
    while time.monotonic() < deadline:
        try:
            if all(sink_class(sink).delivered(client, keys, report.run_id) for sink in stack.sinks):
                print(f"delivered {time.time() - report.last_event_at:.1f} s after the last event", flush=True)
                return True
        except REDIS_UNAVAILABLE as exc:  # restarted under us: ask again
            print(f"Redis not answering ({exc}); waiting", flush=True)
            time.sleep(1)
        time.sleep(0.2)
    print(f"not everything was delivered within {timeout:.0f} s; see the logs in {stack.workdir / 'logs'}")
    return False


def summarize(stack: Stack, report: TrainReport, delivered: bool) -> dict[str, Any]:
    client = connect(stack.redis_url, COMMAND)
    keys = Keys(stack.namespace)
    hooks = sorted(report.hook_us)
    summary: dict[str, Any] = {
        "delivered": delivered,
        "run_id": report.run_id,
        "namespace": stack.namespace,
        "sinks": list(stack.sinks),
        "epochs": report.epochs,
        "events": report.events,
        "hook_us_p50": statistics.median(hooks) if hooks else None,
        "hook_us_p99": hooks[min(len(hooks) - 1, int(len(hooks) * 0.99))] if hooks else None,
        "workdir": str(stack.workdir),
        "workdir_dirs": sorted(f"{d.name}/" for d in stack.workdir.iterdir() if d.is_dir()),
    }
    last_upload = report.last_event_at
    for sink in stack.sinks:
        state = {k.decode(): v.decode() for k, v in client.hgetall(keys.state(sink, report.run_id)).items()}
        summary[sink] = SUMMARIES[sink](stack, state)
        last_upload = max(last_upload, summary[sink].get("last_request_at") or last_upload)
    summary["last_event_to_last_upload_s"] = round(max(0.0, last_upload - report.last_event_at), 2)
    return summary


def hub_summary(stack: Stack, state: dict[str, str]) -> dict[str, Any]:
    requests = list(stack.hub.recorder.requests) if stack.hub else []
    by_type: dict[str, int] = {}
    for r in requests:
        if r.get("status") == 200:
            kind = r["endpoint"] if r["endpoint"] != "upload" else f"upload-{r['fields'].get('type')}"
            by_type[kind] = by_type.get(kind, 0) + 1
    return {
        "requests": by_type,
        "failed_requests": sum(1 for r in requests if r.get("status") not in (200, "pending")),
        "metrics_epochs_sent": int(state.get("metrics_epochs", 0)),
        "metrics_requests": int(state.get("metrics_requests", 0)),
        "checkpoints_uploaded": int(state.get("ckpt_uploads", 0)),
        "checkpoints_superseded": int(state.get("ckpt_superseded", 0)),
        "retries": int(state.get("retries", 0)),
        "last_request_at": max((r["ts"] for r in requests if r.get("status") == 200), default=None),
        "received": requests,
    }


def platform_summary(stack: Stack, state: dict[str, str]) -> dict[str, Any]:
    requests = list(stack.platform.recorder.requests) if stack.platform else []
    by_event: dict[str, int] = {}
    for r in requests:
        if r.get("status") == 200:
            kind = r.get("event") or r["endpoint"]
            by_event[kind] = by_event.get(kind, 0) + 1
    return {
        "requests": by_event,
        "failed_requests": sum(1 for r in requests if r.get("status") not in (200, "pending")),
        "model_url": state.get("model_url"),
        "epochs_sent": int(state.get("epochs_sent", 0)),
        "checkpoints_uploaded": int(state.get("ckpt_uploads", 0)),
        "retries": int(state.get("retries", 0)),
        "last_request_at": max((r["ts"] for r in requests if r.get("status") == 200), default=None),
        "received": requests,
    }


def clearml_summary(stack: Stack, state: dict[str, str]) -> dict[str, Any]:
    session = next((p.parent for p in (stack.workdir / "clearml" / "offline").glob("*/task.json")), None)
    return {
        "task": state.get("task_id"),
        "events_reported": int(state.get("reported", 0)),
        "session": str(session) if session else None,
    }


def mlflow_summary(stack: Stack, state: dict[str, str]) -> dict[str, Any]:
    return {
        "run": state.get("mlflow_run"),
        "experiment": state.get("experiment"),
        "points_logged": int(state.get("points_sent", 0)),
        "artifacts": sorted(
            k.removeprefix("artifact:") for k, v in state.items() if k.startswith("artifact:") and v == "ok"
        ),
        "status": state.get("status"),
        "url": stack.mlflow.url if stack.mlflow else os.environ.get("MLFLOW_TRACKING_URI"),
    }


SUMMARIES = {
    "hub": hub_summary,
    "platform": platform_summary,
    "clearml": clearml_summary,
    "mlflow": mlflow_summary,
}


def print_summary(s: dict[str, Any]) -> None:
    lines = [
        f"== trainbus demo: {'everything delivered' if s['delivered'] else 'NOT everything delivered'} ==",
        f"run              {s['run_id']}: {s['epochs']} epochs, {s['events']} events",
    ]
    if hub := s.get("hub"):
        types = ", ".join(f"{k} {v}" for k, v in sorted(hub["requests"].items()))
        per = hub["metrics_epochs_sent"] / hub["metrics_requests"] if hub["metrics_requests"] else 0
        lines += [
            f"HUB requests     {types or 'none'} "
            f"({hub['failed_requests']} failed and retried: {hub['retries']} retries)",
            f"HUB metrics      {hub['metrics_epochs_sent']} epochs in {hub['metrics_requests']} requests "
            f"({per:.1f} epochs/request)",
            f"HUB checkpoints  {hub['checkpoints_uploaded']} uploaded, {hub['checkpoints_superseded']} superseded",
        ]
    if platform := s.get("platform"):
        if platform["received"]:  # the demo's own local server (--stack: the stack's, not seen from here)
            events = ", ".join(f"{k} {v}" for k, v in sorted(platform["requests"].items()))
            lines.append(f"Platform         {events} ({platform['failed_requests']} failed and retried)")
        lines.append(
            f"Platform model   {platform['model_url']}: {platform['epochs_sent']} epochs, "
            f"{platform['checkpoints_uploaded']} checkpoints and the final"
        )
    if clearml := s.get("clearml"):
        lines += [
            f"ClearML          task {clearml['task']}, {clearml['events_reported']} events reported",
            f"ClearML session  {clearml['session'] or 'none in the work directory (online, or the worker has it)'}",
        ]
    if ml := s.get("mlflow"):
        lines += [
            f"MLflow run       {ml['run']} in experiment {ml['experiment']!r}: {ml['status']}, "
            f"{ml['points_logged']} metric points",
            f"MLflow artifacts {', '.join(ml['artifacts']) or 'none'} ({ml['url']})",
        ]
    lines += [
        f"hook overhead    p50 {s['hook_us_p50']:.1f} µs, p99 {s['hook_us_p99']:.1f} µs per callback (after start-up)",
        f"last event -> last upload  {s['last_event_to_last_upload_s']} s",
        f"files            {s['workdir']} ({', '.join(s['workdir_dirs'])})",
    ]
    print("\n" + "\n".join(lines), flush=True)
