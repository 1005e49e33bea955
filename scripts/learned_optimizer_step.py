"""The cost of one ``step()`` of every learned optimizer against ``torch.optim.Adam``'s, on a 1M-parameter model.

Issue 16's target 4: a learned optimizer's step on a 1M-parameter model at most 3x Adam's (foreach).
Every optimizer steps the same model with the same fixed gradients; the figure is the median of
``--steps`` timed steps after 3 warm-up ones, on the threads given (``--threads``).

Run with the machine idle (or pinned: ``taskset -c 1 ... --threads 1``)::

    python scripts/learned_optimizer_step.py --out docs/results/learned_optimizer_step
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from metaopt.algorithms import LSTMOptimizerRule, MLPLOptRule
from metaopt.algorithms.li_malik import LiMalikRule
from metaopt.algorithms.rnn_mlp_lopt import RNNMLPLOptRule
from metaopt.algorithms.rule_dsl import parse
from metaopt.engine.rule_optimizer import RuleOptimizer


def model_of_one_million(seed: int = 0) -> nn.Module:
    """An MLP 784-1000-216-10: 1,003,386 parameters in 6 tensors."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(784, 1000), nn.ReLU(), nn.Linear(1000, 216), nn.ReLU(), nn.Linear(216, 10))


def fixed_gradients(model: nn.Module, seed: int = 1) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(p.shape, generator=generator) * 1e-2 for p in model.parameters()]


def time_steps(make: Callable[[list[nn.Parameter]], torch.optim.Optimizer], steps: int) -> float:
    """Median seconds of one ``step()`` of ``make(params)`` on the 1M-parameter model, fixed gradients."""
    model = model_of_one_million()
    params = list(model.parameters())
    for p, g in zip(params, fixed_gradients(model)):
        p.grad = g
    optimizer = make(params)
    loss = torch.tensor(1.0)  # read by the rules that see the loss (Li & Malik's)
    step = functools.partial(optimizer.step, loss=loss) if isinstance(optimizer, RuleOptimizer) else optimizer.step
    times = []
    for k in range(3 + steps):
        start = time.perf_counter()
        step()
        if k >= 3:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def optimizers() -> dict[str, Callable[[list[nn.Parameter]], torch.optim.Optimizer]]:
    return {
        "Adam (foreach)": lambda ps: torch.optim.Adam(ps, lr=1e-3, foreach=True),
        "Adam (for-loop)": lambda ps: torch.optim.Adam(ps, lr=1e-3, foreach=False),
        "PowerSign (DSLOptimizer, Bello et al.)": lambda ps: parse("mul(sign_g, sign_m); mul(exp(o1), g)").optimizer(
            ps, lr=1e-3),
        "LearnedOptimizer (LSTM 2x20, Andrychowicz et al.)": lambda ps: LSTMOptimizerRule(
            preprocessing=True, output_scale=0.1).optimizer(ps),
        "MLPLOptimizer (MLP 2x32, Metz et al.)": lambda ps: MLPLOptRule().optimizer(ps),
        "RNNMLPOptimizer (hierarchical, Metz et al.)": lambda ps: RNNMLPLOptRule().optimizer(ps),
        "LiMalikOptimizer (Li & Malik)": lambda ps: LiMalikRule().optimizer(ps),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10, help="timed steps per optimizer (after 3 warm-up ones)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--only", nargs="*", help="optimizers whose name starts with one of these")
    parser.add_argument("--out", type=Path, help="write OUT.md and OUT.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    numel = sum(p.numel() for p in model_of_one_million().parameters())
    chosen = {name: make for name, make in optimizers().items()
              if not args.only or any(name.startswith(prefix) for prefix in args.only)}
    seconds = {name: time_steps(make, args.steps) for name, make in chosen.items()}
    adam = seconds.get("Adam (foreach)")
    rows = [{"optimizer": name, "step_ms": 1e3 * s, "vs_adam": s / adam if adam else None}
            for name, s in seconds.items()]
    machine = (f"{platform.processor() or platform.machine()}, nproc {os.cpu_count()}, {args.threads} thread(s), "
               f"torch {torch.__version__}")
    lines = [f"# One optimizer step on a {numel:,}-parameter model (CPU)", "", f"Machine: {machine}.", "",
             "Command: `python scripts/learned_optimizer_step.py --out docs/results/learned_optimizer_step`", "",
             "| optimizer | step (ms) | x Adam (foreach) |", "|---|---:|---:|"]
    for row in rows:
        ratio = f"{row['vs_adam']:.1f}x" if row["vs_adam"] else "-"
        lines.append(f"| {row['optimizer']} | {row['step_ms']:.2f} | {ratio} |")
    print("\n".join(lines))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
        args.out.with_suffix(".json").write_text(json.dumps({"machine": machine, "parameters": numel, "rows": rows},
                                                            indent=2) + "\n")


if __name__ == "__main__":
    main()
