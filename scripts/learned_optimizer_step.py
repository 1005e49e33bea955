"""The cost of one ``step()`` of every learned optimizer against ``torch.optim.Adam``'s, on a 1M-parameter model.

Issue 16's target 4: a learned optimizer's step on a 1M-parameter model at most 3x Adam's (foreach).
Every optimizer steps its own copy of the same model with the same fixed gradients; the figure is
the median of ``--steps`` timed steps after 3 warm-up ones, taken in rounds (one step of each
optimizer per round), on the threads given (``--threads``).

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
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from metaopt.algorithms import LSTMOptimizerRule, MLPLOptRule
from metaopt.algorithms.li_malik import LiMalikRule
from metaopt.algorithms.rnn_mlp_lopt import RNNMLPLOptRule
from metaopt.algorithms.rule_dsl import parse
from metaopt.algorithms.sign_rules import AddSign, PowerSign
from metaopt.engine.rule_optimizer import RuleOptimizer


def model_of_one_million(seed: int = 0) -> nn.Module:
    """An MLP 784-1000-216-10: 1,003,386 parameters in 6 tensors."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(784, 1000), nn.ReLU(), nn.Linear(1000, 216), nn.ReLU(), nn.Linear(216, 10))


def fixed_gradients(model: nn.Module, seed: int = 1) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(p.shape, generator=generator) * 1e-2 for p in model.parameters()]


def stepper(make: Callable[[list[nn.Parameter]], torch.optim.Optimizer]) -> Callable[[], object]:
    """One ``step()`` of ``make(params)`` on its own copy of the 1M-parameter model, with fixed gradients."""
    model = model_of_one_million()
    params = list(model.parameters())
    for p, g in zip(params, fixed_gradients(model)):
        p.grad = g
    optimizer = make(params)
    loss = torch.tensor(1.0)  # read by the rules that see the loss (Li & Malik's)
    return functools.partial(optimizer.step, loss=loss) if isinstance(optimizer, RuleOptimizer) else optimizer.step


def time_steps(makes: dict[str, Callable[[list[nn.Parameter]], torch.optim.Optimizer]],
               steps: int) -> dict[str, float]:
    """Median seconds of one ``step()`` of each optimizer, timed in rounds of one step each.

    Interleaving spreads the bursts of a shared machine over every optimizer alike, which
    timing one optimizer after another would charge to whichever ran during them.
    """
    steppers = {name: stepper(make) for name, make in makes.items()}
    for _ in range(3):
        for step in steppers.values():
            step()
    times: dict[str, list[float]] = {name: [] for name in steppers}
    for _ in range(steps):
        for name, step in steppers.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def optimizers() -> dict[str, Callable[[list[nn.Parameter]], torch.optim.Optimizer]]:
    return {
        "Adam (foreach)": lambda ps: torch.optim.Adam(ps, lr=1e-3, foreach=True),
        "Adam (for-loop)": lambda ps: torch.optim.Adam(ps, lr=1e-3, foreach=False),
        "PowerSign (DSLOptimizer, Bello et al.)": lambda ps: parse("mul(sign_g, sign_m); mul(exp(o1), g)").optimizer(
            ps, lr=1e-3),
        "AddSign (DSLOptimizer, Bello et al.)": lambda ps: parse(
            "mul(sign_g, sign_m); add(1, o1); mul(o2, g)").optimizer(ps, lr=1e-3),
        "PowerSign (torch.optim class)": lambda ps: PowerSign(ps, lr=1e-3),
        "AddSign (torch.optim class)": lambda ps: AddSign(ps, lr=1e-3),
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
    seconds = time_steps(chosen, args.steps)
    adam = seconds.get("Adam (foreach)")
    rows = [{"optimizer": name, "step_ms": 1e3 * s, "vs_adam": s / adam if adam else None}
            for name, s in seconds.items()]
    machine = (f"{platform.processor() or platform.machine()}, nproc {os.cpu_count()}, {args.threads} thread(s), "
               f"torch {torch.__version__}")
    command = " ".join(["python scripts/learned_optimizer_step.py", *(sys.argv[1:] if argv is None else argv)])
    lines = [f"# One optimizer step on a {numel:,}-parameter model (CPU)", "", f"Machine: {machine}.", "",
             f"Command: `{command}`", "",
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
