"""What ``strategy="auto"``'s timing probe chooses for presets on this machine, and what the probe costs.

For each preset the run is built as ``metaopt train --preset NAME --strategy auto`` would build
it, and :func:`metaopt.training.strategy_probe.probe_strategy` times its first batch under every
strategy, exactly as the trainer does at the start of a run (a time budget, ``--time-budget``,
shortens the expected run and so may leave compiling out). Prints one row per preset: seconds
per meta-gradient of each strategy, the choice, the compiled strategy's first call and the
probe's wall time.

The compiled strategy's first call is fast when torch's on-disk compile cache already holds the
graph; for cold figures point ``TORCHINDUCTOR_CACHE_DIR`` at a fresh folder. Run with the machine idle::

    TORCHINDUCTOR_CACHE_DIR=$(mktemp -d) python scripts/strategy_probe_report.py --threads 2 --time-budget 20 \
        --out docs/results/strategy-probe-20min
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from metaopt.bench.workloads import Workload
from metaopt.engine.meta_learner import MetaLearner
from metaopt.engine.rules import sgd
from metaopt.estimators import Backprop, Estimator
from metaopt.registry import load_plugins
from metaopt.training.config import load_preset
from metaopt.training.experiment import build_experiment
from metaopt.training.strategy_probe import expected_run_s, probe_strategy

PRESETS = ("maml-sinusoid-5shot", "maml-omniglot-5w1s", "maml-anil-omniglot-5w1s", "metasgd-omniglot-5w1s",
           "mamlpp-omniglot-5w1s")


def probe_preset(name: str, time_budget: float | None) -> dict:
    """The probe's choice and figures for preset ``name`` with ``strategy="auto"``."""
    config = load_preset(name).replace(algorithm={"strategy": "auto"})
    experiment = build_experiment(config)
    return timed_probe(name, experiment.learner, experiment.estimator, experiment.problems("train"),
                       expected_run_s(config.trainer.iterations, time_budget))


def timed_probe(label: str, learner: MetaLearner, estimator: Estimator, problems: Any,
                expected_s: Callable[[float], float]) -> dict:
    """One row: the probe's choice for ``learner`` on its first batch of ``problems``, and the probe's wall time."""
    start = time.perf_counter()
    choice = probe_strategy(learner, estimator, problems, 0, expected_s=expected_s)
    return {"preset": label, "probe_s": time.perf_counter() - start, **choice.to_dict()}


class _Repeated:
    """The problems of a benchmark workload: its one batch, at every iteration."""

    def __init__(self, workload: Workload) -> None:
        self.batch_size, self._batch = workload.tasks, workload.batch()

    def batch(self, index: int) -> object:
        return self._batch


def probe_bench(workload: Workload, time_budget: float) -> dict:
    """The probe's choice for a ``metaopt bench`` configuration, for a run of ``time_budget`` minutes."""
    learner = MetaLearner(workload.model(), sgd(workload.inner_lr), inner_steps=workload.inner_steps,
                          first_order=workload.first_order)
    return timed_probe(f"bench {workload.label}, {workload.order} order", learner, Backprop(), _Repeated(workload),
                       expected_run_s(math.inf, time_budget))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="*", default=list(PRESETS))
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--time-budget", type=float, help="minutes, as metaopt train --time-budget")
    parser.add_argument("--bench", action="store_true", help="also probe metaopt bench's 5-way 1-shot configuration "
                        "(second and first order) for a run of the time budget")
    parser.add_argument("--out", type=Path, help="write OUT.md and OUT.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    load_plugins()
    machine = (f"{platform.processor() or platform.machine()}, nproc {os.cpu_count()}, {args.threads} thread(s), "
               f"torch {torch.__version__}")
    budget = "none" if args.time_budget is None else f"{args.time_budget:g} min"
    lines = [f"# strategy auto's timing probe (machine: {machine}; time budget {budget})", "",
             "| preset | loop ms | vmap ms | compiled ms | chosen | compiled first call s | probe s | not used |",
             "|---|---:|---:|---:|---|---:|---:|---|"]
    if args.bench and args.time_budget is None:
        parser.error("--bench needs --time-budget: the benchmark's configuration has no run length of its own")
    probes = [functools.partial(probe_preset, name, args.time_budget) for name in args.presets]
    if args.bench:
        probes += [functools.partial(probe_bench, Workload(first_order=first_order), args.time_budget)
                   for first_order in (False, True)]
    rows = []
    for probe in probes:
        row = probe()
        name = row["preset"]
        rows.append(row)
        ms = [f"{1000 * row['seconds'][s]:.1f}" if s in row["seconds"] else "-" for s in ("loop", "vmap", "compiled")]
        first = "-" if row["compile_s"] is None else f"{row['compile_s']:.0f}"
        skipped = "; ".join(f"{k}: {v}" for k, v in row["skipped"].items()) or "-"
        lines.append(f"| {name} | {' | '.join(ms)} | {row['strategy']} | {first} | {row['probe_s']:.0f} | {skipped} |")
        print(lines[-1], flush=True)
    print("\n".join(lines))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
        args.out.with_suffix(".json").write_text(json.dumps({"machine": machine, "time_budget_min": args.time_budget,
                                                             "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
