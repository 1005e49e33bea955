"""Meta-training throughput on one process with 2 threads against 2 processes with 1 thread each (torchrun, gloo).

For every workload (MAML Omniglot 5-way 1-shot with the preset's strided Conv4-64 and 1 query per
class; the same with the max-pool Conv4-64 and 15 queries; ES on the Fashion-MNIST MLP learned
optimizer) it runs ``WARMUP`` meta-updates, then times ``ITERATIONS`` more of the trainer's loop
(training time only), on the same tasks in both layouts, and compares the meta-parameters the two
layouts end with. Then it writes the scaling model for N machines (per-step bytes against compute).
Writes OUT.md and OUT.json.

    METAOPT_DATA=../shared/data python scripts/distributed_throughput.py --out docs/results/distributed

Run it on an idle machine: each layout uses both cores.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from metaopt.training.config import load_preset
from metaopt.training.distributed import init_world
from metaopt.training.experiment import build_experiment, intra_op_threads, resolve_device
from metaopt.training.trainer import MetaTrainer

#: name -> (preset, config changes, timed iterations)
WORKLOADS: dict[str, tuple[str, dict[str, Any], int]] = {
    "MAML Omniglot 5w1s, strided Conv4-64 (preset), 1 query, 32 tasks": ("maml-omniglot-5w1s", {}, 100),
    "MAML Omniglot 5w1s, max-pool Conv4-64, 15 queries, 32 tasks": (
        "maml-omniglot-5w1s", {"model": {"strided": False}, "data": {"query": 15}}, 16),
    "ES, Fashion-MNIST MLP learned optimizer (4 pairs, truncation 50)": ("mlp-lopt-fashion-mnist8-50-es", {}, 40),
}
WARMUP = 2
LAYOUTS = {"1 process x 2 threads": (1, 2), "2 processes x 1 thread": (2, 1), "1 process x 1 thread": (1, 1)}
NETWORK_BYTES_S = 10e9 / 8  # 10 Gb/s
LATENCY_S = 50e-6  # one message between two machines


def measure(name: str) -> dict[str, Any]:
    """Time workload ``name`` in this process (one rank of a torchrun group, or alone)."""
    preset, changes, iterations = WORKLOADS[name]
    config = load_preset(preset).replace(**changes, device="cpu")
    world = init_world(resolve_device(config.device))
    torch.manual_seed(config.seed)
    with intra_op_threads(torch.get_num_threads()):
        experiment = build_experiment(config)
        quiet = dataclasses.replace(config.trainer, iterations=WARMUP, eval_every=10**9, log_every=10**9,
                                    checkpoint_every=10**9)
        trainer = MetaTrainer(experiment.learner, experiment.problems("train"), quiet, estimator=experiment.estimator,
                              world=world)
        trainer.fit()
        trainer.config = dataclasses.replace(quiet, iterations=WARMUP + iterations)
        summary = trainer.fit()
    params = torch.cat([p.detach().reshape(-1) for p in experiment.learner.parameters()])
    estimator = experiment.estimator
    optimizee = (sum(t.numel() for t in experiment.problems("train").batch(0).init_params().values())
                 if hasattr(estimator, "pairs") else 0)
    return {"optimizee_parameters": optimizee, "iterations": iterations, "train_s": summary["time"]["train_s"],
            "tasks": experiment.problems("train").batch_size,
            "pairs": getattr(estimator, "pairs", 0) * getattr(estimator, "tasks", 1),
            "parameters": params.numel(), "tensors": len(list(experiment.learner.parameters())),
            "final": params.tolist(), "world_size": world.size,
            "truncation": getattr(estimator, "truncation", 0)}


def run_layout(name: str, processes: int, threads: int) -> dict[str, Any]:
    """Workload ``name`` in a fresh process (or ``processes`` under torchrun) with ``threads`` threads each."""
    command = [sys.executable, __file__, "--measure", name]
    if processes > 1:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}",
                   *command[1:]]
    env = {"OMP_NUM_THREADS": str(threads)}
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, **env}, check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode or not lines:
        raise RuntimeError(f"{name} on {processes} processes failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    return json.loads(lines[0].removeprefix("RESULT "))


def ring_all_reduce_s(nbytes: float, machines: int) -> float:
    """Seconds of a ring all-reduce of ``nbytes`` over ``machines``: 2(N-1) messages of nbytes/N each."""
    if machines == 1:
        return 0.0
    return 2 * (machines - 1) * (LATENCY_S + nbytes / machines / NETWORK_BYTES_S)


def all_gather_s(nbytes_per_machine: float, machines: int) -> float:
    """Seconds of a ring all-gather where each machine contributes ``nbytes_per_machine``."""
    if machines == 1:
        return 0.0
    return (machines - 1) * (LATENCY_S + nbytes_per_machine / NETWORK_BYTES_S)


def scaling(name: str, result: dict[str, Any]) -> dict[str, Any]:
    """The per-step compute (one 2-core machine, best layout) and bytes, and where communication dominates."""
    step_s = result["train_s"] / result["iterations"]
    if result["pairs"]:  # ES: the gathered losses (2 branches x truncation steps a pair) and the carried branch
        loss_bytes = 2 * result["pairs"] * result["truncation"] * 4
        state_bytes = 4 * result.get("optimizee_parameters", 0)
        bytes_per_step = loss_bytes + state_bytes
        units, limit = 2 * result["pairs"], 2 * result["pairs"]

        def comm(n: int) -> float:
            return all_gather_s(loss_bytes / n, n) + all_gather_s(state_bytes, n) / n
    else:  # the flat meta-gradient bucket: float32 gradients, one flag a tensor, the metrics (loss, accuracy)
        bytes_per_step = 4 * (result["parameters"] + result["tensors"] + 2)
        units, limit = result["tasks"], result["tasks"]

        def comm(n: int) -> float:
            return ring_all_reduce_s(bytes_per_step, n)
    crossover = next((n for n in range(2, 4097) if step_s / n <= comm(n)), None)
    return {"workload": name, "step_s": step_s, "bytes_per_step": bytes_per_step, "units": units,
            "max_machines": limit, "comm_s_8": comm(8), "crossover": crossover}


def _drift(a: dict[str, Any], b: dict[str, Any]) -> str:
    """How far the final parameters of two layouts are apart: relative L2 and max. absolute difference."""
    x, y = (torch.tensor(r["final"], dtype=torch.float64) for r in (a, b))
    return f"{((x - y).norm() / x.norm()).item():.2g} ({(x - y).abs().max().item():.2g})"


def write(results: dict[str, dict[str, dict[str, Any]]], out: Path) -> None:
    lines = ["# Meta-training on 1 process x 2 threads against 2 processes x 1 thread", "",
             "Tasks (or ES antithetic pairs) per second of meta-training, same tasks in every layout.", "",
             "Machine: 2-core AMD EPYC VM (nproc 2), torch 2.14.1, CPU, gloo over loopback; the machine idle, each "
             f"layout using both cores. {WARMUP} warm-up meta-updates, then the timed ones (training time only); "
             "the same seed, so both layouts train on the same tasks.", "",
             "Command: `METAOPT_DATA=../shared/data python scripts/distributed_throughput.py --out "
             "docs/results/distributed`", "",
             "| workload | timed meta-updates | 1 x 1 thread | 1 x 2 threads | 2 x 1 thread | 2 x 1 vs 1 x 2 "
             "| parameters after, 2 x 1 vs 1 x 2: relative L2 (max abs.) | control, 1 x 1 vs 1 x 2 |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    models = []
    for name, layouts in results.items():
        single, one, two = (layouts[k] for k in ("1 process x 1 thread", "1 process x 2 threads",
                                                 "2 processes x 1 thread"))
        unit = "pairs" if one["pairs"] else "tasks"
        per = one["pairs"] or one["tasks"]
        rates = [per * r["iterations"] / r["train_s"] for r in (single, one, two)]
        lines.append(f"| {name} | {one['iterations']} | {rates[0]:.3g} {unit}/s | {rates[1]:.3g} {unit}/s | "
                     f"{rates[2]:.3g} {unit}/s | {rates[2] / rates[1]:.2f}x | {_drift(one, two)} | "
                     f"{_drift(one, single)} |")
        models.append(scaling(name, two if rates[2] > rates[1] else one))
    lines += ["", "The layouts sum the same tasks' gradients in another order (threads, then ranks), so the "
              "parameters drift apart by float rounding that Adam amplifies: coordinates whose gradients are "
              "rounding noise (the biases of the convolutions before batch norm, which batch norm cancels) take "
              "steps of Adam's learning rate in either direction. The control column is the same drift between "
              "one process on 1 and on 2 threads. The meta-gradients of one step agree to float32 rounding "
              "(tests/training/test_distributed.py).",
              "", "## Scaling model for N machines (on paper)", "",
              f"Per meta-update each machine computes its share of the step measured above (best layout of one "
              f"2-core machine: the step divides over N machines while each has at least one task or particle), "
              f"and the machines exchange the bytes below over a 10 Gb/s network with {LATENCY_S * 1e6:.0f} µs a "
              "message: a ring all-reduce of the flat meta-gradient (2(N-1) messages of bytes/N) for MAML, an "
              "all-gather of the particles' losses (and of the one carried branch's parameters) for ES. "
              "Communication dominates from the N where step/N <= communication time; "
              "before that N the work runs out: a meta-batch of 32 tasks (8 ES particles) shares over at most 32 "
              "(8) ranks.", "",
              "| workload | compute a step (1 machine) | bytes a step | communication at N=8 | N where it dominates "
              "| N at most (tasks or particles) |", "|---|---:|---:|---:|---:|---:|"]
    for m in models:
        crossover = "never below 4096" if m["crossover"] is None else str(m["crossover"])
        lines.append(f"| {m['workload']} | {m['step_s']:.3g} s | {m['bytes_per_step'] / 1e6:.3g} MB | "
                     f"{m['comm_s_8'] * 1e3:.3g} ms | {crossover} | {m['max_machines']} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(json.dumps({"results": {n: {k: {f: v for f, v in r.items() if f != "final"}
                                                                       for k, r in layouts.items()}
                                                                   for n, layouts in results.items()},
                                                    "scaling": models}, indent=2) + "\n")
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=Path("docs/results/distributed"))
    args = parser.parse_args()
    if args.measure:
        result = measure(args.measure)
        if result["world_size"] == 1 or int(os.environ.get("RANK", "0")) == 0:
            print("RESULT " + json.dumps(result), flush=True)
        return
    results: dict[str, dict[str, dict[str, Any]]] = {}
    for name in WORKLOADS:
        results[name] = {}
        for layout, (processes, threads) in LAYOUTS.items():
            results[name][layout] = run_layout(name, processes, threads)
            r = results[name][layout]
            print(f"{name}, {layout}: {r['iterations']} meta-updates in {r['train_s']:.1f} s", flush=True)
    write(results, args.out)


if __name__ == "__main__":
    main()
