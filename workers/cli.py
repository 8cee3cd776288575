"""``python -m workers.cli``, the old path of the ``trainbus`` command (``workers.ops.cli``)."""

import sys

from workers.ops.cli import main

if __name__ == "__main__":
    sys.exit(main())
