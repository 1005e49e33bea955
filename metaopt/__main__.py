"""``python -m metaopt ...`` is the ``metaopt`` command (for launchers that take a module, e.g. ``torchrun -m``)."""

import sys

from metaopt.cli import main

sys.exit(main())
