"""Measure meta-training speed, memory and operator counts: ``python scripts/benchmark.py`` is ``metaopt bench``.

One run measures, with ratios taken within the run (see :mod:`metaopt.bench` for how):

1. tasks/s and peak memory of 5-way and 20-way 1-shot Omniglot-shaped MAML, second and first
   order: the metaopt loop, vmap and higher drivers and learn2learn, against a plain
   ``functional_call`` + ``autograd.grad`` loop, with the difference of their meta-gradients;
2. ATen operators dispatched per meta-iteration for 1, 8 and 32 tasks, loop versus vmap;
3. time and peak memory of second-order MAML with 5 to 50 inner steps, stored versus recomputed
   (``checkpoint_steps=True``).

Examples::

    python scripts/benchmark.py --quick                  # smoke run, a minute or two (one thread)
    python scripts/benchmark.py --threads 2 > bench.md   # the README figures
    python scripts/benchmark.py --tasks 32 --repeats 5
"""

import sys

from metaopt.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
