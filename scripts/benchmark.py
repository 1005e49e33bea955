"""Measure meta-training speed, memory and operator counts; print Markdown tables for the README.

One run measures, with ratios taken within the run (see :mod:`metaopt.profiling` for how):

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

import argparse

from metaopt.profiling import run_benchmark


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", type=int, default=16,
                        help="tasks per meta-batch in section 1 (default: 16; 20-way second-order vmap then "
                             "needs about 10 GB)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="timed meta-iterations per measurement; the median is reported (default: 3)")
    parser.add_argument("--threads", type=int, default=None,
                        help="intra-op threads (default: torch's default; 1 with --quick)")
    parser.add_argument("--sweep-tasks", type=int, default=4,
                        help="tasks per meta-batch in the inner-steps sweep of section 3 (default: 4)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes and fewer rows: a smoke run")
    args = parser.parse_args()
    for name in ("tasks", "repeats", "threads", "sweep_tasks"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    run_benchmark(tasks=args.tasks, repeats=args.repeats, threads=args.threads, quick=args.quick,
                  sweep_tasks=args.sweep_tasks, write=lambda text: print(text, flush=True))


if __name__ == "__main__":
    main()
