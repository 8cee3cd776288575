"""A training process stand-in for kill tests: publishes, prints each accepted seq, waits.

    python -m tests.producer_child RUN_ID COUNT [--then-exit] [--more N]

Settings come from TRAINBUS_* variables. Each line on stdout is the seq a hook returned,
printed only after the hook returned, so the parent knows what was accepted. With
``--more N``, after "done" it waits for a line on stdin, then publishes N more metrics.
"""

from __future__ import annotations

import sys
import time

from producers import Publisher


def main() -> None:
    run_id, count = sys.argv[1], int(sys.argv[2])
    more = int(sys.argv[sys.argv.index("--more") + 1]) if "--more" in sys.argv else 0
    bus = Publisher(run_id=run_id)
    print(bus.session({"epochs": count + more}), flush=True)
    for i in range(count):
        print(bus.metrics(i, {"loss": 1.0 / (i + 1)}), flush=True)
    print("done", flush=True)
    if more:
        sys.stdin.readline()
        for i in range(count, count + more):
            print(bus.metrics(i, {"loss": 1.0 / (i + 1)}), flush=True)
        print("done", flush=True)
    if "--then-exit" in sys.argv:
        bus.close()
        return
    time.sleep(3600)  # waiting to be killed


if __name__ == "__main__":
    main()
