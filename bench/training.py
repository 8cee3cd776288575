"""Training slowdown: what telemetry costs a real (small) PyTorch training, start to end.

    python bench/training.py                                # defaults: 8 epochs x 30 batches, 3 repeats (~4 min)
    python bench/training.py --epochs 20 --batches 60 --repeats 5              # bigger, steadier
    python bench/training.py --epochs 2 --batches 3 --repeats 1 --final-timeout 2    # smoke

One training, the same in every case and repeat: a small CNN (0.5 M parameters) on generated
32x32 images, batches of 64, SGD from seed 0; every epoch ends with a validation batch and a
checkpoint saved in place with torch.save (4 MB with the optimizer), the end with the final
weights. torch runs on one thread (torch.set_num_threads(1)) so that the second core is left
to Redis, the HUB server and the workers, as on a GPU machine where the CPU cores are not all
busy. Cases:

  no telemetry                    the floor
  trainbus, sinks healthy         Publisher: session, metrics and the checkpoint every epoch, the
                                  final, close(); a local HUB server, a dispatcher and an
                                  ``rq worker`` for hub-uploads as processes (bench/procs.py)
  trainbus, HUB slow (2 s)        the same, the HUB server answering every request after 2 s
  trainbus, HUB down              the same, the workers' HUB URL a closed port
  trainbus, Redis down            nothing at the Publisher's Redis URL: events stay in the spool;
                                  close() knows Redis is down and hands over to a drainer
                                  within 0.5 s (killed after the case)
  in-process HUB, healthy/slow (2 s)/down
                                  the Ultralytics HUB session's pattern (InProcessHub) against the
                                  same HUB servers: a thread per upload, the final on the training thread
  in-process MLflow, healthy/slow (2 s)/stopped
                                  Ultralytics' MLflow callback (InProcessMlflow) against a local
                                  ``mlflow server``, the same behind a proxy answering 2 s late, and a
                                  closed port; MLflow's client retries bounded by --mlflow-retries
                                  (skipped with a note when mlflow is not installed)

The in-process and the workers' rate limits are the same (RATES), so both send about the
same requests. Reported per case, medians over --repeats, cases interleaved (round-robin,
the start rotated each repeat) so that drift hits all of them alike: the training loop alone
(the epochs), end to end (until the training function returns: telemetry set-up, final
upload, exit flush), steps/s, and steps/s against no telemetry; the training process's own
CPU time (every thread of it) beyond no telemetry's, per epoch and against an epoch's CPU
time (``--ckpt-mb`` pads the checkpoint to a bigger model's size); "spread" is the range of
the loop times over the repeats against their median, to judge the noise. The goal: trainbus
at least 0.995x of no telemetry in every case (0.99x with a checkpoint past 4 MB); the
delivery process's own CPU time per epoch is shown beside.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import requests
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.procs import API_KEY, DEFAULT_REDIS_URL, Stack, exit_on_sigterm, model_id, table, wait_until
from producers import Publisher
from shared.settings import generate_run_id
from workers.devstack.http_double import Fault

BATCH = 64
SEED = 0
MODEL = model_id(0)
RATES = {"metrics": 0.5, "ckpt": 2.0, "heartbeat": 5.0}  # seconds between requests of a kind, both patterns
HUB_DOWN_URL = "http://127.0.0.1:1"  # nothing listens there
REDIS_DOWN_URL = "redis://127.0.0.1:1/0"

STACKS = ("healthy", "slow", "down")  # one local HUB, dispatcher and worker each
DELIVERY_TIMEOUT_S = 60.0
GOAL = 0.995  # trainbus within 0.5% of no telemetry (issue 14), with the 4 MB checkpoint
BIG_CHECKPOINT_GOAL = 0.99  # ... and within 1% with a 260 MB one
CKPT_MB = 4.0  # the small CNN's weights and SGD momentum, as torch.save writes them


@dataclass(frozen=True)
class Data:
    """Generated images labelled by a fixed linear rule, so the loss goes down as in a real training."""

    images: torch.Tensor
    labels: torch.Tensor
    val_images: torch.Tensor
    val_labels: torch.Tensor

    @classmethod
    def generate(cls, batches: int) -> Data:
        generator = torch.Generator().manual_seed(SEED)
        images = torch.randn(batches * BATCH + 256, 3, 32, 32, generator=generator)
        templates = torch.randn(10, 3 * 32 * 32, generator=generator)
        labels = (images.flatten(1) @ templates.T).argmax(1)
        n = batches * BATCH
        return cls(images[:n], labels[:n], images[n:], labels[n:])


def small_cnn() -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 16, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(16, 32, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.MaxPool2d(2),
        torch.nn.Flatten(),
        torch.nn.Linear(32 * 8 * 8, 256),
        torch.nn.ReLU(),
        torch.nn.Linear(256, 10),
    )


class Telemetry(Protocol):
    """What a training calls: after each epoch's checkpoint, and once at the end."""

    def epoch_end(self, epoch: int, metrics: dict[str, float], last: Path) -> None: ...

    def finish(self, best: Path, epoch: int, metrics: dict[str, float]) -> None: ...

    def cleanup(self) -> None:
        """Bench hygiene after the timing (never part of it): stop what the case left running."""


class NoTelemetry:
    def epoch_end(self, epoch: int, metrics: dict[str, float], last: Path) -> None:
        pass

    def finish(self, best: Path, epoch: int, metrics: dict[str, float]) -> None:
        pass

    def cleanup(self) -> None:
        pass


class Trainbus:
    """trainbus as a training script uses it (README): events per epoch, close() at the end."""

    def __init__(self, bus: Publisher, epochs: int) -> None:
        self.bus = bus
        bus.session({"model": "small-cnn", "epochs": epochs, "batch": BATCH}, name="bench-training")

    def epoch_end(self, epoch: int, metrics: dict[str, float], last: Path) -> None:
        self.bus.metrics(epoch, metrics)
        self.bus.checkpoint(last, epoch)

    def finish(self, best: Path, epoch: int, metrics: dict[str, float]) -> None:
        self.bus.final(best, epoch, metrics, map50_95=metrics["val/acc"])
        self.bus.close()  # the exit flush: at most TRAINBUS_EXIT_FLUSH_S

    def cleanup(self) -> None:
        self.bus.close(timeout=0)  # when interrupted before finish()
        if self.bus.delivery is not None:  # Redis down: it would retry the closed port for a day
            self.bus.delivery.kill()
            self.bus.delivery.wait()

    def side_cpu_s(self) -> float:
        """The delivery process's user + system time (/proc), 0 if it is gone already."""
        delivery = self.bus.delivery
        try:
            fields = Path(f"/proc/{delivery.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, AttributeError):
            return 0.0
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class InProcessHub:
    """The Ultralytics HUB session's pattern (ultralytics/hub/session.py over hub-sdk), minimal.

    As there: metrics queued per epoch and each checkpoint uploaded by a new thread when the
    rate limit allows (timers started with the session); requests without a timeout, the
    checkpoint read whole into memory, every failure (connection error, any HTTP error)
    swallowed and retried after 2**i s: metrics 3 retries within 30 s, checkpoints 10 within
    3600 s. The final upload runs the same retry loop on the training thread, bounded here by
    ``final_timeout`` instead of the official 3600 s (with HUB down that holds a training
    ~34 min: sleeps of 1+2+...+1024 s). Left out: the model GET at session start (also on the
    training thread), heartbeats, the queue of failed metrics.
    """

    def __init__(self, hub_url: str, final_timeout: float) -> None:
        self.model_url = f"{hub_url}/v1/models/{MODEL}"
        self.final_timeout = final_timeout
        self.queue: dict[str, str] = {}
        self.timers = dict.fromkeys(("metrics", "ckpt"), time.time())
        self.stopped = threading.Event()

    def epoch_end(self, epoch: int, metrics: dict[str, float], last: Path) -> None:
        if self._due("ckpt"):  # on_model_save
            fields = {"epoch": epoch, "type": "epoch", "isBest": False}
            self._in_thread(lambda: self._upload(last, "last.pt", fields), retry=10, timeout=3600)
        self.queue[str(epoch)] = json.dumps(metrics)  # on_fit_epoch_end
        if self._due("metrics"):
            payload = {"metrics": self.queue, "type": "metrics"}
            self.queue = {}
            self._in_thread(lambda: self._post("", json=payload), retry=3, timeout=30)

    def finish(self, best: Path, epoch: int, metrics: dict[str, float]) -> None:
        fields = {"epoch": epoch, "type": "final", "map": metrics["val/acc"]}
        self._retry(lambda: self._upload(best, "best.pt", fields), retry=10, timeout=self.final_timeout)

    def cleanup(self) -> None:
        self.stopped.set()  # upload threads still retrying end here, not in the next case

    def _due(self, kind: str) -> bool:
        if time.time() - self.timers[kind] <= RATES[kind]:
            return False
        self.timers[kind] = time.time()
        return True

    def _in_thread(self, request: Callable[[], bool], retry: int, timeout: float) -> None:
        threading.Thread(target=self._retry, args=(request, retry, timeout), daemon=True).start()

    def _retry(self, request: Callable[[], bool], retry: int, timeout: float) -> None:
        started = time.time()
        for attempt in range(retry + 1):
            if time.time() - started > timeout or self.stopped.is_set():
                return
            if request():
                return
            self.stopped.wait(2**attempt)

    def _upload(self, path: Path, part: str, fields: dict[str, object]) -> bool:
        return self._post("/upload", data=fields, files={part: path.read_bytes()})

    def _post(self, path: str, **kwargs: object) -> bool:
        try:
            return requests.post(self.model_url + path, headers={"x-api-key": API_KEY}, **kwargs).ok
        except requests.RequestException:
            return False


class InProcessMlflow:
    """Ultralytics' MLflow callback (``ultralytics/utils/callbacks/mlflow.py``), minimal: the run
    started and the args logged at set-up, two ``log_metrics`` per epoch, the weights logged and
    the run ended at the end, all on the training thread; the first failure stops the tracking."""

    def __init__(self, uri: str, epochs: int) -> None:
        import mlflow

        self.mlflow = mlflow
        self.active = False
        try:
            mlflow.set_tracking_uri(uri)
            mlflow.set_experiment("trainbus-bench")
            mlflow.start_run(run_name="bench-training")
            mlflow.log_params({"model": "small-cnn", "epochs": epochs, "batch": BATCH})
            self.active = True
        except Exception:
            self._end("FAILED")

    def epoch_end(self, epoch: int, metrics: dict[str, float], last: Path) -> None:
        for part in ({"train/loss": metrics["train/loss"], "lr/pg0": 0.01}, metrics):
            if self.active:
                try:
                    self.mlflow.log_metrics(part, step=epoch)
                except Exception:
                    self.active = False

    def finish(self, best: Path, epoch: int, metrics: dict[str, float]) -> None:
        if self.active:
            with contextlib.suppress(Exception):
                self.mlflow.log_artifact(str(best.parent))
        self._end("FINISHED")

    def cleanup(self) -> None:
        self._end("KILLED")

    def _end(self, status: str) -> None:
        with contextlib.suppress(Exception):
            if self.mlflow.active_run() is not None:
                self.mlflow.end_run(status=status)


def train(
    data: Data, telemetry: Callable[[], Telemetry], epochs: int, weights: Path, pad: torch.Tensor
) -> tuple[float, float, float]:
    """(training loop seconds, end-to-end seconds, the process's CPU seconds end to end, every thread
    of it, the CPU seconds of the case's process beside it) of one training with ``telemetry``, from
    SEED. ``pad`` makes the checkpoint the size asked."""
    torch.manual_seed(SEED)
    model = small_cnn()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    last, best = weights / "last.pt", weights / "best.pt"
    batches = len(data.images) // BATCH
    started, cpu_started = time.perf_counter(), time.process_time()
    hooks = telemetry()
    try:
        loop_started = time.perf_counter()
        for epoch in range(epochs):
            model.train()
            total = 0.0
            for i in range(0, batches * BATCH, BATCH):
                loss = F.cross_entropy(model(data.images[i : i + BATCH]), data.labels[i : i + BATCH])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                total += loss.item()
            model.eval()
            with torch.no_grad():
                logits = model(data.val_images)
            metrics = {
                "train/loss": total / batches,
                "val/loss": F.cross_entropy(logits, data.val_labels).item(),
                "val/acc": (logits.argmax(1) == data.val_labels).float().mean().item(),
            }
            state = {"epoch": epoch, "model": model.state_dict(), "optimizer": optimizer.state_dict(), "pad": pad}
            torch.save(state, last)
            hooks.epoch_end(epoch, metrics, last)
        loop_s = time.perf_counter() - loop_started
        torch.save({"epoch": epochs - 1, "model": model.state_dict()}, best)  # final weights, no optimizer
        hooks.finish(best, epochs - 1, metrics)
        total_s, cpu_s = time.perf_counter() - started, time.process_time() - cpu_started
        return loop_s, total_s, cpu_s, hooks.side_cpu_s() if isinstance(hooks, Trainbus) else 0.0
    finally:
        hooks.cleanup()


@dataclass(frozen=True)
class Case:
    name: str
    telemetry: Callable[[], Telemetry]
    root: Path  # each run's checkpoints go to a new directory in it (for trainbus: the workers' file root)
    delivered: Callable[[], bool] | None = None  # waited for after each run (untimed), when given


def trainbus_case(name: str, stack: Stack, epochs: int, *, check_delivery: bool = False) -> Case:
    """Trainbus on ``stack``, a new run each time; with ``check_delivery``, ``delivered`` tells
    when HUB has the last run's final (the sink's ``final_done``)."""
    run_ids: list[str] = []

    def telemetry() -> Trainbus:
        run_ids.append(generate_run_id())
        return Trainbus(stack.publisher(run_ids[-1], MODEL), epochs)

    def delivered() -> bool:
        return bool(stack.client.hget(stack.keys.state("hub", run_ids[-1]), "final_done"))

    return Case(name, telemetry, stack.workdir, delivered if check_delivery else None)


def mlflow_cases(cleanup: contextlib.ExitStack, tmp: Path, epochs: int, slow_s: float, uri: str | None) -> list[Case]:
    """The in-process MLflow cases against ``uri`` or a local server started here (no mlflow: skipped, said)."""
    try:
        import mlflow.server  # noqa: F401 - the server, not only the client
    except ImportError:
        print("in-process MLflow: skipped, mlflow is not installed (pip install -e '.[test]')")
        return []
    from workers.devstack.local_mlflow import MlflowServer, ProxyServer

    if uri is None:
        (tmp / "mlflow").mkdir()
        server = MlflowServer(tmp / "mlflow", auth=False).start()
        cleanup.callback(server.stop)
        uri = server.url
    slow = ProxyServer(uri)
    cleanup.callback(slow.stop)
    slow.recorder.faults.append(Fault(endpoint="any", delay=slow_s, count=1_000_000))

    def in_process(url: str) -> Callable[[], Telemetry]:
        return lambda: InProcessMlflow(url, epochs)

    return [
        Case("in-process MLflow, healthy", in_process(uri), tmp),
        Case(f"in-process MLflow, slow ({slow_s:g} s)", in_process(slow.url), tmp),
        Case("in-process MLflow, stopped", in_process(HUB_DOWN_URL), tmp),
    ]


def cases(stacks: dict[str, Stack], tmp: Path, epochs: int, final_timeout: float, slow_s: float) -> list[Case]:
    def redis_down() -> Trainbus:
        spool = tempfile.mkdtemp(dir=tmp)  # a fresh spool: no earlier run's events to hand off
        return Trainbus(Publisher(redis_url=REDIS_DOWN_URL, spool_dir=spool, hub_model=MODEL), epochs)

    def in_process(url: str) -> Callable[[], Telemetry]:
        return lambda: InProcessHub(url, final_timeout)

    healthy, slow = stacks["healthy"].hub.url, stacks["slow"].hub.url
    return [
        Case("no telemetry", NoTelemetry, tmp),
        trainbus_case("trainbus, sinks healthy", stacks["healthy"], epochs, check_delivery=True),
        trainbus_case(f"trainbus, HUB slow ({slow_s:g} s)", stacks["slow"], epochs),
        trainbus_case("trainbus, HUB down", stacks["down"], epochs),
        Case("trainbus, Redis down", redis_down, tmp),
        Case("in-process HUB, healthy", in_process(healthy), tmp),
        Case(f"in-process HUB, slow ({slow_s:g} s)", in_process(slow), tmp),
        Case("in-process HUB, down", in_process(HUB_DOWN_URL), tmp),
    ]


def run(args: argparse.Namespace) -> dict[str, list[tuple[float, ...]]]:
    """(loop s, end-to-end s, CPU s, delivery CPU s) per case and repeat; every process, key and file removed after."""
    data = Data.generate(args.batches)
    pad = torch.zeros(max(0, int((args.ckpt_mb - CKPT_MB) * 1e6 / 4)))  # float32 beyond the 4 MB of weights
    with contextlib.ExitStack() as cleanup:
        tmp = Path(cleanup.enter_context(tempfile.TemporaryDirectory(prefix="bench-training-")))
        stacks = {name: cleanup.enter_context(Stack(args.redis_url, models=[MODEL], **RATES)) for name in STACKS}
        slow_fault = {"endpoint": "any", "delay": args.slow_s, "count": 100_000}
        requests.post(f"{stacks['slow'].hub.url}/_control/faults", json=slow_fault, timeout=5).raise_for_status()
        stacks["down"].env["TRAINBUS_HUB_API_URL"] = HUB_DOWN_URL
        for stack in stacks.values():
            stack.dispatcher()
            stack.worker()
        all_cases = cases(stacks, tmp, args.epochs, args.final_timeout, args.slow_s)
        all_cases += mlflow_cases(cleanup, tmp, args.epochs, args.slow_s, args.mlflow_uri)
        warm_up = next(case for case in all_cases if case.delivered)  # trainbus, sinks healthy
        train(data, warm_up.telemetry, 1, Path(tempfile.mkdtemp(dir=warm_up.root)), pad)  # torch warm, pipeline proven
        wait_until(warm_up.delivered, DELIVERY_TIMEOUT_S, "the healthy pipeline delivering the warm-up run")
        results: dict[str, list[tuple[float, ...]]] = {case.name: [] for case in all_cases}
        for repeat in range(args.repeats):
            shift = repeat % len(all_cases)
            for case in all_cases[shift:] + all_cases[:shift]:
                times = train(data, case.telemetry, args.epochs, Path(tempfile.mkdtemp(dir=case.root)), pad)
                results[case.name].append(times)
                print(
                    f"repeat {repeat + 1}/{args.repeats} {case.name}: "
                    f"loop {times[0]:.2f} s, end to end {times[1]:.2f} s",
                    file=sys.stderr,
                    flush=True,
                )
                if case.delivered:  # untimed: its uploads do not spill into the next case
                    wait_until(case.delivered, DELIVERY_TIMEOUT_S, f"{case.name}: delivery of repeat {repeat + 1}")
    return results


def report(results: dict[str, list[tuple[float, ...]]], steps: int, epochs: int, goal: float) -> str:
    """The table of medians, and whether trainbus met the goal. The CPU columns: the training
    process's CPU time (all its threads) beyond no telemetry's, per epoch, and against an epoch's;
    the delivery process's, per epoch (it runs beside the training, on another core if one is free)."""
    medians = {name: tuple(statistics.median(t[i] for t in times) for i in range(4)) for name, times in results.items()}
    base_loop, base_total, base_cpu, _ = medians["no telemetry"]
    rows = []
    missed = []
    for name, (loop_s, total_s, cpu_s, side_s) in medians.items():
        extra_ms = (cpu_s - base_cpu) / epochs * 1000
        loops = [t[0] for t in results[name]]
        ratios = (base_loop / loop_s, base_total / total_s)
        rows.append(
            (
                name,
                loop_s,
                steps / loop_s,
                f"{ratios[0]:.3f}x",
                f"{(max(loops) - min(loops)) / loop_s:.1%}",
                total_s,
                steps / total_s,
                f"{ratios[1]:.3f}x",
                f"{extra_ms:+.1f} ({extra_ms / (base_cpu / epochs * 1000):+.1%})",
                f"{side_s / epochs * 1000:.1f}" if side_s else "-",
            )
        )
        if name.startswith("trainbus") and min(ratios) < goal:
            missed.append(f"{name} (loop {ratios[0]:.3f}x, end to end {ratios[1]:.3f}x)")
    headers = (
        "case",
        "loop s",
        "loop steps/s",
        "vs none",
        "spread",
        "end-to-end s",
        "e2e steps/s",
        "vs none",
        "CPU ms/epoch vs none",
        "delivery CPU ms/epoch",
    )
    verdict = "met in every trainbus case" if not missed else "missed: " + "; ".join(missed)
    return table(headers, rows) + f"\n\ngoal, trainbus >= {goal}x of no telemetry: {verdict}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=8, help="epochs per training (default 8)")
    parser.add_argument("--batches", type=int, default=30, help=f"batches of {BATCH} per epoch (default 30)")
    parser.add_argument("--repeats", type=int, default=3, help="trainings per case, interleaved (default 3)")
    parser.add_argument(
        "--final-timeout",
        type=float,
        default=30.0,
        help="seconds the in-process final upload keeps retrying (default 30; the official client: 3600)",
    )
    parser.add_argument(
        "--mlflow-retries",
        type=int,
        default=2,
        help="MLflow client retries in the in-process MLflow cases (default 2; MLflow's own: 7, which holds "
        "a training about 4 min at a stopped server)",
    )
    parser.add_argument(
        "--ckpt-mb",
        type=float,
        default=CKPT_MB,
        help=f"checkpoint size in MB (default {CKPT_MB:g}: weights and optimizer)",
    )
    parser.add_argument("--slow-s", type=float, default=2.0, help="how late the slow servers answer (default 2)")
    parser.add_argument("--mlflow-uri", help="an mlflow server for the in-process MLflow cases (default: start one)")
    parser.add_argument("--redis-url", default=DEFAULT_REDIS_URL)
    args = parser.parse_args()
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = str(args.mlflow_retries)  # this process only: the in-process cases
    torch.set_num_threads(1)
    exit_on_sigterm()
    logging.getLogger("trainbus").setLevel(logging.ERROR)  # the down cases' expected warnings
    results = run(args)
    steps = args.epochs * args.batches
    print(
        f"small CNN, {args.epochs} epochs x {args.batches} batches of {BATCH} ({steps} steps), torch on 1 thread, "
        f"{max(args.ckpt_mb, CKPT_MB):g} MB checkpoints; "
        f"medians of {args.repeats} interleaved repeats; in-process final upload bounded at {args.final_timeout:g} s, "
        f"in-process MLflow client retries at {args.mlflow_retries}"
    )
    print(report(results, steps, args.epochs, GOAL if args.ckpt_mb <= CKPT_MB else BIG_CHECKPOINT_GOAL))


if __name__ == "__main__":
    main()
