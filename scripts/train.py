"""Meta-train a run: ``python scripts/train.py`` is ``metaopt train`` (options: ``--help``).

Examples::

    python scripts/train.py --preset maml-sinusoid-10shot
    python scripts/train.py --preset maml-sinusoid-5shot --iterations 1000 --run-dir runs/short
    python scripts/train.py --resume runs/short
"""

import sys

from metaopt.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
