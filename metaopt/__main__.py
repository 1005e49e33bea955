"""``python -m metaopt ...`` is the ``metaopt`` command (for launchers that take a module, e.g. ``torchrun -m``)."""

import os
import sys

from metaopt.cli import main

status = main()
if int(os.environ.get("WORLD_SIZE", "1")) > 1:
    # a rank of torchrun: its results are written and its files closed. Skip the interpreter's teardown, in which
    # the process group's native threads can abort the process ("terminate called without an active exception").
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
sys.exit(status)
