"""Evaluate a run's checkpoint: ``python scripts/evaluate.py`` is ``metaopt eval`` (options: ``--help``).

Prints the mean ± 95% confidence interval with its protocol and writes ``RUN_DIR/eval.json``.

Examples::

    python scripts/evaluate.py --run runs/short
    python scripts/evaluate.py --run runs/short --checkpoint last --episodes 600 --steps 10
"""

import sys

from metaopt.cli import main

if __name__ == "__main__":
    sys.exit(main(["eval", *sys.argv[1:]]))
