"""The GPU check: tasks/s, peak memory and meta-gradient agreement of the task-batching strategies on one device.

Second-order MAML on Omniglot-shaped episodes (max-pool Conv4-64, 28x28, 1 shot, 15 queries per
class, one inner step of lr 0.4), 5-way with 32 tasks and 20-way with 16 tasks, each strategy
of :class:`metaopt.MetaLearner` on the same initial parameters and batch. A meta-iteration is
the meta-loss and its gradient; on CUDA the clock reads after ``torch.cuda.synchronize`` (only
here: the engine's inner loop never synchronises), and peak memory is
``torch.cuda.max_memory_allocated``; on the CPU, the peak of live tensor memory. The agreement
column is the largest absolute difference of each strategy's meta-gradient from the loop's.

``compiled`` compiles its graph in the first meta-iteration (the warm-up, reported apart as
"first iteration s"); where ``torch.compile`` fails it warns and runs ``vmap``, and the row says so.

    bash scripts/gpu_check.sh                                # a CUDA machine: under 5 minutes
    bash scripts/gpu_check.sh --device cpu --quick           # the same code on the CPU, a few seconds
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
import warnings
from pathlib import Path

import torch

from metaopt.bench.measure import peak_tensor_bytes
from metaopt.bench.workloads import Workload, build_meta_loss
from metaopt.engine.compiled import CompileFallbackWarning

STRATEGIES = ("loop", "vmap", "compiled")


def configurations(device: str, quick: bool) -> dict[str, Workload]:
    """The Omniglot 5-way and 20-way workloads (``quick``: 8 filters, 2 tasks, 2 queries: a smoke run)."""
    size = {"hidden": 8, "query": 2} if quick else {}
    return {"Omniglot 5-way 1-shot": Workload(ways=5, tasks=2 if quick else 32, device=device, **size),
            "Omniglot 20-way 1-shot": Workload(ways=20, tasks=2 if quick else 16, device=device, **size)}


def check(strategy: str, workload: Workload, repeats: int) -> dict[str, object]:
    """Median seconds of a meta-iteration, peak memory and the meta-gradient of ``strategy`` on ``workload``."""
    device = torch.device(workload.device)
    model, meta_loss = build_meta_loss(strategy, workload)
    params = list(model.parameters())

    def iteration() -> tuple[torch.Tensor, ...]:
        return torch.autograd.grad(meta_loss(), params)

    def synchronize() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    synchronize()
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", CompileFallbackWarning)
        grads = iteration()  # warm-up (compiles the compiled strategy's graph), and the meta-gradient compared
    synchronize()
    first = time.perf_counter() - start
    fallback = next((str(w.message) for w in caught if issubclass(w.category, CompileFallbackWarning)), None)
    seconds = []
    for _ in range(repeats):
        synchronize()
        start = time.perf_counter()
        iteration()
        synchronize()
        seconds.append(time.perf_counter() - start)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        iteration()
        peak = torch.cuda.max_memory_allocated(device)
    else:
        peak = peak_tensor_bytes(iteration)
    return {"seconds": statistics.median(seconds), "tasks_per_s": workload.tasks / statistics.median(seconds),
            "first_s": first, "peak_mib": peak / 2**20, "fallback": fallback,
            "grads": [g.detach().cpu() for g in grads]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda (default), cuda:N or cpu")
    parser.add_argument("--repeats", type=int, default=5, help="timed meta-iterations per strategy (after one warm-up)")
    parser.add_argument("--quick", action="store_true", help="tiny networks and batches: check the script runs")
    parser.add_argument("--out", type=Path, help="also write OUT.md and OUT.json")
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: torch {torch.__version__} sees no CUDA device here; run on a GPU "
                     "machine, or pass --device cpu to check the script on the CPU")
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    lines = [f"# Task-batching strategies on {name}", "",
             f"torch {torch.__version__}; second-order MAML, max-pool Conv4, 1 shot, one inner step; median of "
             f"{args.repeats} meta-iterations (meta-loss and its gradient).", "",
             "| configuration | strategy | tasks/s | first iteration s | peak memory (MiB) | max abs diff from loop |",
             "|---|---|---:|---:|---:|---:|"]
    workloads = configurations(args.device, args.quick)
    report = {"device": name, "torch": torch.__version__, "repeats": args.repeats, "rows": [],
              "workloads": {label: dataclasses.asdict(w) for label, w in workloads.items()}}
    for label, workload in workloads.items():
        results = {strategy: check(strategy, workload, args.repeats) for strategy in STRATEGIES}
        reference = results["loop"]["grads"]
        for strategy, result in results.items():
            diff = max((g - r).abs().max().item() for g, r in zip(result["grads"], reference))
            row = {"configuration": label, "strategy": strategy, "tasks": workload.tasks,
                   **{k: v for k, v in result.items() if k != "grads"}, "max_abs_diff": diff}
            report["rows"].append(row)
            name = strategy if result["fallback"] is None else f"{strategy} (fell back to vmap: {result['fallback']})"
            lines.append(f"| {label} | {name} | {row['tasks_per_s']:.1f} | {row['first_s']:.1f} "
                         f"| {row['peak_mib']:.0f} | {diff:.1e} |")
    print("\n".join(lines), flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
        args.out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
