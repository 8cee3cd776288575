"""A training process stand-in for kill tests: publishes, prints each accepted seq, waits.

    python -m tests.producer_child RUN_ID COUNT [--then-exit]

Settings come from TRAINBUS_* variables. Each line on stdout is the seq a hook returned,
printed only after the hook returned, so the parent knows what was accepted.
"""

from __future__ import annotations

import sys
import time

from producers import Publisher


def main() -> None:
    run_id, count = sys.argv[1], int(sys.argv[2])
    bus = Publisher(run_id=run_id)
    print(bus.session({"epochs": count}), flush=True)
    for i in range(count):
        seq = bus.metrics(i, {"loss": 1.0 / (i + 1)})
        print(seq, flush=True)
    print("done", flush=True)
    if "--then-exit" in sys.argv:
        bus.close()
        return
    time.sleep(3600)  # waiting to be killed


if __name__ == "__main__":
    main()
