"""Multi-process (DDP) training: only global rank 0 publishes, and what trainbus hands a training
survives being pickled into its ranks. Real two-process trainings on the CPU (gloo)."""

from __future__ import annotations

import pickle
import sys
from collections import Counter
from pathlib import Path

import cloudpickle
import pytest

from producers import Publisher
from producers.rank import global_rank, publishes
from producers.ultralytics import make_callbacks
from tests.conftest import stream_events
from tests.helpers import producer_env, run_training, wait_for

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "ddp_training.py"
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def run_events(client, keys, run_id: str, types: set[str]) -> list[dict]:
    """The run's events once its run_end is on the stream."""
    wait_for(lambda: any(e["type"] == "run_end" for e in stream_events(client, keys) if e["run_id"] == run_id), 30)
    return [e for e in stream_events(client, keys) if e["run_id"] == run_id and e["type"] in types]


def assert_one_run_from_rank_zero(events: list[dict]) -> None:
    kinds = Counter(e["type"] for e in events)
    assert kinds["session"] == 1 and kinds["run_end"] == 1, kinds
    epochs = [e["payload"]["epoch"] for e in events if e["type"] == "fit_epoch"]
    assert epochs == [0, 1, 2], "every epoch once, from one rank"
    assert {e["payload"]["metrics"]["rank"] for e in events if e["type"] in ("fit_epoch", "final")} == {0}
    seqs = [e["seq"] for e in events]
    assert len(seqs) == len(set(seqs)), "no event twice"


@pytest.mark.parametrize("mode", ["torchrun", "spawn"])
def test_a_two_process_training_is_one_run_published_by_rank_zero(
    mode, redis_url, namespace, spool_dir, client, keys, tmp_path
):
    """torchrun: each rank makes its own Publisher; spawn: the parent's is pickled into both ranks."""
    run_id = f"ddp-{mode}"
    launcher = TORCHRUN if mode == "torchrun" else [sys.executable]
    run_training(
        [*launcher, str(SCRIPT), mode, run_id, str(tmp_path)], producer_env(redis_url, namespace, spool_dir), tmp_path
    )
    events = run_events(client, keys, run_id, {"session", "fit_epoch", "checkpoint", "final", "run_end"})
    assert_one_run_from_rank_zero(events)
    assert sum(e["type"] == "checkpoint" for e in events) == 3
    assert [d.name for d in spool_dir.iterdir() if d.is_dir()] == [run_id], "one spool: the ranks never shared one"


def test_ultralytics_callbacks_pickled_into_ranks_publish_once_from_rank_zero(
    redis_url, namespace, spool_dir, client, keys, tmp_path
):
    """Ultralytics >= 8.4 carries callbacks into its DDP ranks with cloudpickle (utils/dist.py)."""
    callbacks = make_callbacks(redis_url=redis_url, namespace=namespace, spool_dir=spool_dir, run_id="yolo-ddp")
    pickled = tmp_path / "callbacks.pt"
    pickled.write_bytes(cloudpickle.dumps(callbacks))
    command = [*TORCHRUN, str(SCRIPT), "ultralytics", str(pickled), str(tmp_path)]
    run_training(command, producer_env(redis_url, namespace, spool_dir), tmp_path)
    events = run_events(client, keys, "yolo-ddp", {"session", "fit_epoch", "checkpoint", "final", "run_end"})
    kinds = Counter(e["type"] for e in events)
    assert kinds["session"] == 1 and kinds["final"] == 1 and kinds["run_end"] == 1, kinds
    assert [e["payload"]["epoch"] for e in events if e["type"] == "fit_epoch"] == [None, 0, 1, 2, 3], (
        "each once, as one process"
    )
    assert all("rank1" not in str(e["payload"]) for e in events), "rank 1 (training in rank1/) published nothing"
    assert any("rank0" in str(e["payload"]) for e in events)


def test_callbacks_and_publishers_pickle_with_nothing_open_in_them(redis_url, namespace, spool_dir, client, keys):
    callbacks = make_callbacks(redis_url=redis_url, namespace=namespace, spool_dir=spool_dir, run_id="pickled")
    for dumps in (pickle.dumps, cloudpickle.dumps):
        copy = pickle.loads(dumps(callbacks))
        assert copy.keys() == callbacks.keys() and copy["on_train_start"].hooks.publisher is None
    bus = Publisher(redis_url=redis_url, namespace=namespace, spool_dir=spool_dir, run_id="handed")
    bus.session({"epochs": 1})
    child = pickle.loads(pickle.dumps(bus))  # as a spawned child gets it: the run moves there
    assert bus.metrics(0, {"loss": 1.0}) is None, "the original handed the run over"
    assert child.metrics(0, {"loss": 0.5}) is not None and child.close()
    events = [e for e in stream_events(client, keys) if e["run_id"] == "handed"]
    assert [e["type"] for e in events] == ["session", "fit_epoch", "run_end"], "one session, nothing lost or twice"


def test_the_rank_comes_from_torch_distributed_then_the_launchers_environment(monkeypatch):
    for variable in ("RANK", "LOCAL_RANK"):
        monkeypatch.delenv(variable, raising=False)
    assert global_rank() == -1 and publishes()
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert global_rank() == 1 and not publishes()
    monkeypatch.setenv("RANK", "0")  # node 2's first process is LOCAL_RANK 0 but RANK 2: RANK wins
    assert publishes()
    monkeypatch.setenv("RANK", "2")
    assert not publishes()


def test_another_ranks_publisher_opens_nothing_and_says_nothing(monkeypatch, spool_dir, caplog):
    monkeypatch.setenv("RANK", "1")
    with Publisher(spool_dir=spool_dir, run_id="rank1") as bus:
        assert bus.metrics(0, {"loss": 1.0}) is None and bus.delivery is None
    assert not spool_dir.exists() or not any(spool_dir.iterdir()), "no spool in another rank"
    assert not caplog.records
