"""Throughput of the ES and PES estimators (and truncated backprop) on the FashionMnist8 MLP task.

Meta-updates per second and particles (perturbed inner runs of one truncation) per second of
:class:`metaopt.estimators.TruncatedES` and :class:`metaopt.estimators.PES` training the
per-parameter MLP optimizer (``mlp-lopt``) on learned_optimization's ``ImageMLP_FashionMnist8_Relu32``,
for a grid of antithetic pairs and truncation lengths, with the particles run in a loop and batched
by :func:`torch.func.vmap` (``vmap=True``, the option ``vmap_particles``; ``--particles`` picks
either); truncated backpropagation for reference. The last column is vmap's speed-up over the loop
at the same grid point. Each figure is the median of ``--repeats`` timed meta-updates after one
warm-up, on one thread.

    METAOPT_DATA=../shared/data OMP_NUM_THREADS=1 taskset -c 0 python scripts/es_throughput.py
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from metaopt.algorithms.mlp_lopt import MLPLOptRule
from metaopt.datasets.fashion_mnist import FashionMNIST8MLP
from metaopt.engine.optimizer_learner import OptimizerLearner
from metaopt.estimators import PES, Estimator, TruncatedBackprop, TruncatedES
from metaopt.problems.optimizees import optimizee_stream

#: How each task's particles run (the estimators' ``vmap`` off and on).
PARTICLES = ("loop", "vmap")


def seconds_per_update(estimator: Estimator, learner: OptimizerLearner, stream, repeats: int) -> float:
    """Median wall seconds of one ``estimate`` call (after a warm-up call)."""
    times = []
    for i in range(repeats + 1):
        learner.zero_grad(set_to_none=True)
        start = time.perf_counter()
        estimator.estimate(learner, stream, i)
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, nargs="+", default=[2, 4, 8, 16])
    parser.add_argument("--truncations", type=int, nargs="+", default=[5, 10, 20])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--particles", nargs="+", choices=PARTICLES, default=list(PARTICLES),
                        help="how each task's particles run: in a loop, batched by torch.func.vmap, or both")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    stream = optimizee_stream(FashionMNIST8MLP(), "train", seed=0)
    learner = OptimizerLearner(MLPLOptRule(), horizon=1000)
    print(f"mlp-lopt on FashionMnist8 (64-32-10, batch 128), 1 thread, median of {args.repeats} meta-updates\n")
    print("| estimator | particles | pairs | truncation | meta-updates/s | particles/s | particles·steps/s | "
          "vmap / loop |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for truncation in args.truncations:
        s = seconds_per_update(TruncatedBackprop(truncation), learner, stream, args.repeats)
        print(f"| backprop | - | - | {truncation} | {1 / s:.2f} | - | {truncation / s:.0f} | - |")
        for pairs in args.pairs:
            for name, family in (("ES", TruncatedES), ("PES", PES)):
                loop = None
                for particles in args.particles:
                    estimator = family(pairs=pairs, truncation=truncation, vmap=particles == "vmap")
                    s = seconds_per_update(estimator, learner, stream, args.repeats)
                    loop = s if particles == "loop" else loop
                    ratio = f"{loop / s:.2f}x" if particles == "vmap" and loop is not None else "-"
                    print(f"| {name} | {particles} | {pairs} | {truncation} | {1 / s:.2f} | {2 * pairs / s:.1f} | "
                          f"{2 * pairs * truncation / s:.0f} | {ratio} |", flush=True)


if __name__ == "__main__":
    main()
