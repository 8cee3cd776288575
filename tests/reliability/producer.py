"""A training process for the chaos scenario: resumable after SIGKILL, exact about what it handed over.

    python -m tests.reliability.producer RUN_ID MODEL_ID WORKDIR EPOCHS PAUSE_S

Settings come from TRAINBUS_* variables (the run's spool is TRAINBUS_SPOOL_DIR). Before each
hook it appends its intent (seq, epoch, kind, values) to WORKDIR/intents.jsonl; after a
restart, an intent counts as accepted exactly when its seq is below the publisher's next
seq (the spool survived the kill), and the run resumes with the first event not accepted,
as a training resumed from its checkpoint would. So ``accepted()`` is what the hooks
really accepted, which the checker compares with what HUB and ClearML received.
"""

from __future__ import annotations

import hashlib
import os
import sys
import time
import zipfile
from pathlib import Path
from typing import Any

import orjson

from producers import Publisher

KINDS = ("train", "fit", "checkpoint")  # per epoch, in this order; then "final" and "end"


def values(run_id: str, epoch: int) -> dict[str, dict[str, float]]:
    """Deterministic metrics, so a resumed epoch publishes the same numbers."""
    h = int(hashlib.sha256(f"{run_id}/{epoch}".encode()).hexdigest()[:8], 16) / 2**32
    return {
        "train": {"train/loss": round(1.0 / (epoch + 1) + h, 6)},
        "lr": {"lr/pg0": round(0.01 * (1 - epoch / 100), 6)},
        "fit": {"metrics/mAP50-95(B)": round(epoch / 100 + h / 10, 6), "val/loss": round(2.0 - epoch / 50, 6)},
    }


def accepted(workdir: Path, next_seq: int) -> list[dict[str, Any]]:
    """The intents whose event the spool holds (seq below the next one); a torn last line is skipped."""
    path = workdir / "intents.jsonl"
    if not path.exists():
        return []
    found = []
    for line in path.read_bytes().splitlines():
        try:
            intent = orjson.loads(line)
        except orjson.JSONDecodeError:
            continue
        if intent["seq"] < next_seq:
            found.append(intent)
    return found


def save_checkpoint(path: Path, run_id: str, epoch: int) -> None:
    """A zip like torch.save writes, rewritten in place as Ultralytics does."""
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", f"{run_id} epoch {epoch} ".encode() * 2000)


def main() -> None:
    run_id, model_id, workdir, epochs, pause = sys.argv[1:6]
    workdir, epochs, pause = Path(workdir), int(epochs), float(pause)
    weights = workdir / "weights"
    weights.mkdir(parents=True, exist_ok=True)
    bus = Publisher(run_id=run_id, hub_model=model_id)
    kept = accepted(workdir, bus.next_seq)
    done = {(i["epoch"], i["kind"]) for i in kept}
    # Forget the intents a kill cut short: their seqs go to this life's events.
    (workdir / "intents.tmp").write_bytes(b"".join(orjson.dumps(i) + b"\n" for i in kept))
    os.replace(workdir / "intents.tmp", workdir / "intents.jsonl")
    intents = (workdir / "intents.jsonl").open("ab")

    def hand_over(kind: str, epoch: int, record: dict[str, Any], hook: Any, *args: Any, **kwargs: Any) -> None:
        """Note the intent, then call the hook (unless a previous life's hook already took it)."""
        if (epoch, kind) in done:
            return
        intents.write(orjson.dumps({"seq": bus.next_seq, "epoch": epoch, "kind": kind, **record}) + b"\n")
        intents.flush()
        if hook(*args, **kwargs) is None:
            raise SystemExit(f"{run_id}: the publisher refused a {kind} event")

    if (epochs - 1, "end") not in done:  # a resumed training announces itself again
        bus.session({"epochs": epochs, "model": "yolov8n.yaml", "imgsz": 64}, name=run_id, project="chaos")
    for epoch in range(epochs):
        if all((epoch, kind) in done for kind in KINDS):
            continue
        v = values(run_id, epoch)
        hand_over("train", epoch, v, bus.metrics, epoch, v["train"], stage="train", lr=v["lr"])
        hand_over("fit", epoch, v, bus.metrics, epoch, v["fit"], epoch_time=pause)
        if (epoch, "checkpoint") not in done:
            save_checkpoint(weights / "last.pt", run_id, epoch)
        hand_over("checkpoint", epoch, {}, bus.checkpoint, weights / "last.pt", epoch, is_best=True)
        print(f"epoch {epoch}", flush=True)
        time.sleep(pause)
    best = weights / "best.pt"
    if (epochs - 1, "final") not in done:
        best.write_bytes((weights / "last.pt").read_bytes())
    sha = hashlib.sha256(best.read_bytes()).hexdigest()
    last = values(run_id, epochs - 1)["fit"]
    hand_over(
        "final", epochs - 1, {"sha256": sha}, bus.final, best, epochs - 1, last, map50_95=last["metrics/mAP50-95(B)"]
    )
    hand_over("end", epochs - 1, {}, bus.end, "completed")
    bus.close(timeout=60)
    print("done", flush=True)


if __name__ == "__main__":
    main()
