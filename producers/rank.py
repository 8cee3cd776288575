"""Which process of a multi-process training publishes: global rank 0 only, as every tracker's integration.

Every rank of a DDP training runs the same hooks. With one run id the ranks would fight over
one spool; with one each, a training would be N runs at every sink. The rank comes from
``torch.distributed`` once it is initialised, else from the launchers' ``RANK`` (torchrun,
Ultralytics, Lightning, accelerate) or ``LOCAL_RANK``; no rank at all is a single process.
"""

from __future__ import annotations

import os
import sys


def global_rank() -> int:
    """This process's global rank; -1 outside distributed training."""
    dist = sys.modules.get("torch.distributed")  # never imported here: a training that uses it has
    if dist is not None and dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    for variable in ("RANK", "LOCAL_RANK"):
        value = os.environ.get(variable, "").strip()
        if value.lstrip("-").isdigit():
            return int(value)
    return -1


def publishes() -> bool:
    """True in the process that publishes: global rank 0, or a training that is not distributed."""
    return global_rank() in (-1, 0)
