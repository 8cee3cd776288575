"""The chaos checker catches what it is there to catch (negative controls on made-up records)."""

from __future__ import annotations

import copy

import pytest

from tests.reliability.chaos import (
    clearml_problems,
    expected_scalars,
    hub_problems,
    platform_limit_problems,
    platform_problems,
)

V = {"train": {"train/loss": 0.5}, "lr": {"lr/pg0": 0.01}, "fit": {"metrics/mAP50-95(B)": 0.3}}
INTENTS = [
    {"seq": 1, "epoch": 0, "kind": "train", **V},
    {"seq": 2, "epoch": 0, "kind": "fit", **V},
    {"seq": 3, "epoch": 0, "kind": "checkpoint"},
    {"seq": 4, "epoch": 0, "kind": "final", "sha256": "abc"},
    {"seq": 5, "epoch": 0, "kind": "end"},
]


def request(ts: float, endpoint: str, status: int | str = 200, **more) -> dict:
    return {"ts": ts, "endpoint": endpoint, "model": "M", "status": status, **more}


def good_requests() -> list[dict]:
    return [
        request(0.0, "heartbeat"),
        request(0.1, "metrics", metrics={"0": V["fit"]}),
        request(0.2, "upload", fields={"type": "epoch"}, files={"file": {"sha256": "x"}}),
        request(3.0, "upload", fields={"type": "final"}, files={"file": {"sha256": "abc"}}),
    ]


def test_a_correct_run_has_no_problems():
    assert hub_problems("r", "M", good_requests(), INTENTS) == ([], 0)


def metrics_after_a_failed_final(requests: list[dict]) -> None:
    requests[3:3] = [request(2.9, "upload", 503, fields={"type": "final"}), request(2.95, "metrics", metrics={})]


@pytest.mark.parametrize(
    ("spoil", "expected"),
    [
        (lambda rs: rs.pop(1), "HUB has epochs [0]"),
        (lambda rs: rs[1]["metrics"].update({"0": {"metrics/mAP50-95(B)": 0.9}}), "arrived as"),
        (lambda rs: rs.insert(2, request(0.5, "metrics", metrics={"0": V["fit"]})), "two metrics requests"),
        (lambda rs: rs.insert(1, request(0.05, "heartbeat")), "two heartbeat requests"),
        (lambda rs: rs.insert(3, request(1.0, "upload", fields={"type": "epoch"})), "two ckpt requests"),
        (lambda rs: rs.insert(1, request(0.05, "metrics", 429, retry_after=3)), "retried 0.05 s after a 429"),
        (lambda rs: rs.append(request(9.0, "heartbeat")), "requests after the final"),
        (lambda rs: rs[3]["files"]["file"].update(sha256="torn"), "no final upload"),
        (lambda rs: rs[3].update(status=503), "no final upload"),
        (
            metrics_after_a_failed_final,
            "metrics sent after the final",
        ),
    ],
)
def test_spoiled_hub_records_are_caught(spoil, expected):
    requests = good_requests()
    spoil(requests)
    problems, _ = hub_problems("r", "M", requests, INTENTS)
    assert any(expected in p for p in problems), problems


def test_a_failed_checkpoint_upload_is_retried_before_the_next_slot():
    requests = good_requests()
    requests.insert(2, request(0.15, "upload", 503, fields={"type": "epoch"}))
    assert hub_problems("r", "M", requests, INTENTS) == ([], 0)


def test_an_epoch_received_twice_is_counted_not_failed():
    requests = good_requests()
    requests.insert(2, request(1.5, "metrics", metrics={"0": V["fit"]}))
    assert hub_problems("r", "M", requests, INTENTS) == ([], 1)


def clearml_state() -> dict:
    events = [
        {"task": "t", "type": "training_stats_scalar", "metric": m, "variant": s, "iter": i, "value": v}
        for m, s, i, v in expected_scalars(INTENTS, 1.0).elements()
    ]
    task = {"id": "t", "name": "r", "status": "completed", "models": {"output": [{"model": "m"}]}}
    return {"tasks": {"t": task}, "events": events}


def test_clearml_scalars_once_each():
    assert clearml_problems(clearml_state(), "r", INTENTS, 1.0) == []
    twice = clearml_state()
    twice["events"].append(copy.deepcopy(twice["events"][0]))
    assert "extra" in clearml_problems(twice, "r", INTENTS, 1.0)[0]
    lost = clearml_state()
    lost["events"].pop()
    assert "missing" in clearml_problems(lost, "r", INTENTS, 1.0)[0]
    unfinished = clearml_state()
    unfinished["tasks"]["t"].update(status="in_progress", models={})
    assert len(clearml_problems(unfinished, "r", INTENTS, 1.0)) == 2


def platform_records() -> tuple[list[dict], list[dict]]:
    """One model with one run that got epoch 0 and completed with best.pt; and what the server logged."""
    run = {
        "epochs": [{"epoch": 0, "metrics": V["fit"]}],
        "checkpoints": [{"modelPath": "gs://m/best.pt", "sha256": "abc"}],
        "end": {"event": "training_complete", "results": {"modelPath": "gs://m/best.pt"}},
    }
    models = [{"id": "m1", "slug": "r", "runs": [run]}]
    requests = [
        {"ts": 0.0, "endpoint": "metrics", "status": 200, "event": "epoch_end", "json": {"modelId": "m1"}},
        {"ts": 1.0, "endpoint": "metrics", "status": 200, "event": "training_complete", "json": {"modelId": "m1"}},
    ]
    return models, requests


def test_a_correct_platform_run_has_no_problems():
    models, requests = platform_records()
    assert platform_problems("r", models, requests, INTENTS) == ([], 0)
    assert platform_limit_problems(requests) == []


@pytest.mark.parametrize(
    ("spoil", "expected"),
    [
        (lambda ms, rs: ms.append({**ms[0], "id": "m2"}), "2 Platform models"),
        (lambda ms, rs: ms[0]["runs"][0]["epochs"].clear(), "the Platform has epochs [0]"),
        (lambda ms, rs: ms[0]["runs"][0]["epochs"][0].update(metrics={"x": 1}), "arrived as"),
        (lambda ms, rs: ms[0]["runs"][0]["checkpoints"][0].update(sha256="torn"), "is not best.pt"),
        (lambda ms, rs: ms[0]["runs"][0].update(end={"event": "training_failed"}), "ended with training_failed"),
        (lambda ms, rs: rs.append({**rs[0], "ts": 2.0}), "events after training_complete"),
    ],
)
def test_spoiled_platform_records_are_caught(spoil, expected):
    models, requests = platform_records()
    spoil(models, requests)
    problems, _ = platform_problems("r", models, requests, INTENTS)
    assert any(expected in p for p in problems), problems


def test_a_key_over_its_limit_is_caught():
    many = [{"ts": i * 0.01, "endpoint": "metrics", "status": 200} for i in range(101)]
    assert "101 event requests" in platform_limit_problems(many)[0]
