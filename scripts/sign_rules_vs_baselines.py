"""PowerSign and AddSign (with and without their sign decays) against tuned SGD, SGD + momentum and Adam.

Measures the test accuracy of 13 optimizers after a fixed budget of child training (Bello et al.
2017, arXiv 1709.07417, §5: the rules Neural Optimizer Search found, against the hand-designed
baselines), each at its own step size λ tuned on validation accuracy:

* optimizers: SGD, SGD momentum 0.9, Adam, the controls Momentum-cos and Adam-cos (their learning
  rate annealed to 0 by a cosine over the training: the decayed sign rules anneal their sign
  effect, so a schedule of the baselines' own is the fair comparison), PowerSign,
  PowerSign-ld/-cd/-rd, AddSign, AddSign-ld/-cd/-rd (:mod:`metaopt.algorithms.sign_rules`; the
  decays span the training, ``decay_steps`` = its steps; -rd with 2 periods, a real restart at T/2);
* task A: the paper's 2-layer ConvNet child on 14x14 Fashion-MNIST; task B (transfer, a different
  task): a one-hidden-layer MLP on 14x14 MNIST (:class:`metaopt.datasets.child_training.ChildTask`);
* λ tuning: one log grid for every optimizer of a task (half-decade steps 1e-4, 3e-4, ..., 3); λ
  maximises the mean validation accuracy (held-out part of the training file) over the tuning
  seeds; a grid is extended by a half-decade on a side while any optimizer's best λ lies on that
  edge (the extended grid is trained for every optimizer, so the grid stays shared);
* report: at the chosen λ, test accuracy (the test file) over fresh seeds, mean ± 95% interval, the
  validation accuracy, and the paired difference to tuned momentum over the same seeds (a seed
  fixes the initialisation and the minibatch order, so the pairing removes their shared noise).

Writes ``<out>.json`` (every training's numbers, written as it goes: a killed run resumes from it,
skipping the trainings already done, when started again with the same settings), ``<out>.md`` (one
table per task and the protocol) and ``<out>.png`` (test accuracy with 95% intervals, one panel per
task). The run of docs/results/sign-rules.md:

    METAOPT_DATA=/work/shared/data OMP_NUM_THREADS=1 taskset -c 0 python scripts/sign_rules_vs_baselines.py

(defaults: 300 steps of 64 images on both tasks, tuning seeds 0-2, test seeds 100-109); a smoke
test: ``... python scripts/sign_rules_vs_baselines.py --quick --out /tmp/sign-rules``.

Why 300 steps (0.38 epoch of the 50,000 training images): three times the search's 100-step reward
budget, so the rules are not only scored at the horizon they were searched for, while 13
optimizers x (10 λ x 3 tuning seeds + 10 test seeds) x 2 tasks = 1040 trainings (≈1.2 s a ConvNet,
≈0.4 s an MLP training on one free core) stay well under 35 minutes even on a core shared with
another process. With sign_rules' default periods (cosine n = 0.5, restart n = 1) and
``decay_steps`` = the training's steps, the -cd and -rd decays would be the same function for
t < T; -rd therefore takes n = 2 (two half-cosines, restarting at T/2).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

from metaopt.algorithms.sign_rules import AddSign, PowerSign
from metaopt.datasets.child_training import ChildData, ChildTask
from metaopt.evaluation.evaluate import confidence_interval

MakeOptimizer = Callable[[Iterable[torch.nn.Parameter], float], torch.optim.Optimizer]

GRID = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0, 3.0)
BASELINE = "Momentum"
DECAY_NAMES = {None: "", "linear": "-ld", "cosine": "-cd", "restart": "-rd"}
#: The number of periods of each decay (None: sign_rules' default).
PERIODS = {None: None, "linear": None, "cosine": None, "restart": 2.0}
OUT = Path("docs/results/sign-rules")


def optimizers(steps: int) -> dict[str, MakeOptimizer]:
    """The 13 optimizers, by name; the sign decays and the cosine learning rates span ``steps``."""
    def momentum(params: Iterable[torch.nn.Parameter], lr: float) -> torch.optim.Optimizer:
        return torch.optim.SGD(params, lr=lr, momentum=0.9)

    def adam(params: Iterable[torch.nn.Parameter], lr: float) -> torch.optim.Optimizer:
        return torch.optim.Adam(params, lr=lr)

    table: dict[str, MakeOptimizer] = {
        "SGD": lambda params, lr: torch.optim.SGD(params, lr=lr),
        BASELINE: momentum,
        "Adam": adam,
        "Momentum-cos": _cosine_lr(momentum, steps),
        "Adam-cos": _cosine_lr(adam, steps),
    }
    for rule in (PowerSign, AddSign):
        for decay, suffix in DECAY_NAMES.items():
            table[rule.__name__ + suffix] = _sign_rule(rule, decay, steps)
    return table


def _sign_rule(rule: type[PowerSign] | type[AddSign], decay: str | None, steps: int) -> MakeOptimizer:
    def make(params: Iterable[torch.nn.Parameter], lr: float) -> torch.optim.Optimizer:
        return rule(params, lr, sign_decay=decay, decay_steps=steps if decay else None, num_periods=PERIODS[decay])

    return make


def _cosine_lr(make: MakeOptimizer, steps: int) -> MakeOptimizer:
    """``make``'s optimizer with its learning rate annealed from λ to 0: λ · ½(1 + cos(π t / steps)) at step t."""
    def build(params: Iterable[torch.nn.Parameter], lr: float) -> torch.optim.Optimizer:
        optimizer = make(params, lr)
        step, done = optimizer.step, [0]

        def annealed(closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
            for group in optimizer.param_groups:
                group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * min(done[0], steps) / steps))
            done[0] += 1
            return step(closure)

        optimizer.step = annealed  # the child's loop calls step() only
        return optimizer

    return build


def _lr_key(lr: float) -> str:
    return f"{lr:g}"


def _neighbour(lr: float, up: bool) -> float:
    """The next value of the {1, 3} x 10^k grid above (``up``) or below ``lr``."""
    mantissa = lr / 10 ** math.floor(math.log10(lr) + 1e-9)
    factor = (3.0 if mantissa < 2 else 10 / 3) if up else (0.3 if mantissa < 2 else 1 / 3)
    return float(f"{lr * factor:.3g}")


def _task_key(task: ChildTask) -> str:
    """What a cached training depends on besides optimizer, λ and seed."""
    return (f"{task.dataset}/{task.network}/steps={task.steps}/batch={task.batch}/val={task.val_images}"
            f"/train={len(task.data.train[1])}")


class Cache:
    """Every training's (validation, test, seconds), kept in the JSON report and written after each training."""

    def __init__(self, path: Path, report: dict[str, Any]) -> None:
        self.path, self.report = path, report
        if path.is_file():
            old = json.loads(path.read_text())
            report["trainings"] = old.get("trainings", {})
        report.setdefault("trainings", {})
        self.reused = sum(len(v) for v in report["trainings"].values())

    def train(self, task: ChildTask, name: str, make: MakeOptimizer, lr: float, seed: int,
              test: bool) -> dict[str, float | None]:
        entries = self.report["trainings"].setdefault(_task_key(task), {})
        key = f"{name}|{_lr_key(lr)}|{seed}|{'test' if test else 'val'}"
        if key not in entries:
            start = time.perf_counter()
            val, test_acc = task.train(make, lr, seed, test=test)
            entries[key] = {"val": val, "test": test_acc, "seconds": round(time.perf_counter() - start, 3)}
            self.write()
        return entries[key]

    def write(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        partial = self.path.with_suffix(".json.tmp")
        partial.write_text(json.dumps(self.report, indent=1) + "\n")
        os.replace(partial, self.path)


def _stats(values: list[float]) -> dict[str, Any]:
    tensor = torch.tensor(values, dtype=torch.float64)
    return {"mean": tensor.mean().item(), "ci95": confidence_interval(tensor), "values": values}


def measure_task(label: str, task: ChildTask, cache: Cache, grid: tuple[float, ...], tuning_seeds: list[int],
                 test_seeds: list[int], max_extend: int = 3) -> dict[str, Any]:
    """Tune λ for every optimizer on ``task``'s validation accuracy, then score it on the test seeds."""
    table = optimizers(task.steps)
    grid = tuple(sorted(grid))
    extended = {"low": 0, "high": 0}
    while True:
        curves: dict[str, dict[str, float]] = {}
        for name, make in table.items():
            curves[name] = {}
            for lr in grid:
                vals = [cache.train(task, name, make, lr, seed, test=False)["val"] for seed in tuning_seeds]
                curves[name][_lr_key(lr)] = sum(vals) / len(vals)
            print(f"[{label}] tuned {name:13s} " + " ".join(f"{k}:{v:.3f}" for k, v in curves[name].items()),
                  flush=True)
        chosen = {name: max(grid, key=lambda lr, c=curve: c[_lr_key(lr)]) for name, curve in curves.items()}
        low = [n for n, lr in chosen.items() if lr == grid[0]]
        high = [n for n, lr in chosen.items() if lr == grid[-1]]
        grow = []
        if low and extended["low"] < max_extend:
            grow.append(_neighbour(grid[0], up=False))
            extended["low"] += 1
        if high and extended["high"] < max_extend:
            grow.append(_neighbour(grid[-1], up=True))
            extended["high"] += 1
        if not grow:
            break
        print(f"[{label}] best λ on an edge ({', '.join(low + high)}): grid extended by {grow}", flush=True)
        grid = tuple(sorted(grid + tuple(grow)))
    results: dict[str, Any] = {}
    for name, make in table.items():
        lr = chosen[name]
        runs = [cache.train(task, name, make, lr, seed, test=True) for seed in test_seeds]
        results[name] = {"lr": lr, "tuning_val": curves[name][_lr_key(lr)],
                         "val": _stats([r["val"] for r in runs]), "test": _stats([r["test"] for r in runs]),
                         "on_edge": lr in (grid[0], grid[-1])}
        print(f"[{label}] {name:13s} λ={lr:g} test {results[name]['test']['mean']:.4f} ± "
              f"{results[name]['test']['ci95']:.4f}", flush=True)
    base = results[BASELINE]["test"]["values"]
    for name, row in results.items():
        if name != BASELINE:
            row["vs_momentum"] = _stats([a - b for a, b in zip(row["test"]["values"], base)])
    seconds = sum(e["seconds"] for e in cache.report["trainings"][_task_key(task)].values())
    return {"protocol": {**task.protocol(), "lrs": list(grid), "grid_extended": extended,
                         "train_images": len(task.data.train[1]), "test_images": len(task.data.test[1]),
                         "tuning_seeds": tuning_seeds, "test_seeds": test_seeds},
            "curves": curves, "results": results, "training_seconds": seconds}


def _machine() -> str:
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    return (f"{os.cpu_count()}-core {model}, pinned to core(s) {cores}, torch threads {torch.get_num_threads()}, "
            f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}")


def _percent(x: float) -> str:
    return f"{100 * x:.2f}"


def _verdict(diff: dict[str, Any]) -> str:
    low, high = diff["mean"] - diff["ci95"], diff["mean"] + diff["ci95"]
    return "better" if low > 0 else "worse" if high < 0 else "tie (CI spans 0)"


def markdown(report: dict[str, Any], image: str = "sign-rules.png") -> str:
    """The tables of ``report`` (percent accuracies); ``image``: the chart's file name."""
    lines = ["# PowerSign and AddSign against tuned SGD, momentum and Adam", "",
             "Bello et al. 2017 (arXiv 1709.07417, §5) found PowerSign and AddSign with Neural Optimizer Search and "
             "reported them, with their sign decays, ahead of tuned SGD, momentum and Adam. Here every optimizer's "
             "λ is tuned on validation accuracy over the same log grid, then it is trained from fresh seeds and "
             "scored on the test file. Accuracies in %; ± is the 95% interval of the mean (1.96 · std / √n); "
             "\"Δ vs momentum\" is the mean over the test seeds of (optimizer − tuned momentum) test accuracy, "
             "paired by seed (same initialisation and minibatch order), ± its 95% interval.", "",
             f"Command: `{report['command']}`", "",
             f"Machine: {report['machine']}. Wall time {report['wall_seconds'] / 60:.1f} min "
             f"(process CPU {report['cpu_seconds'] / 60:.1f} min; trainings reused from an earlier partial run: "
             f"{report['reused_trainings']}).", ""]
    for label, task in report["tasks"].items():
        p = task["protocol"]
        grid = ", ".join(f"{lr:g}" for lr in p["lrs"])
        ext = p["grid_extended"]
        lines += [f"## {label}", "",
                  f"Protocol: dataset {p['dataset']} (2x2-average-pooled to 14x14), network {p['child']}, "
                  f"{p['steps']} steps of {p['batch']} images ({p['steps'] * p['batch'] / p['train_images']:.2f} "
                  "epoch), "
                  f"validation on {p['val_images']} held-out training images, test on the {p['test_images']:,} "
                  f"images of the test file; batch norm: "
                  + (p["batch_norm"] if p["child"] == "convnet" else "none (the MLP has no batch norm)")
                  + f"; λ grid "
                  f"({len(p['lrs'])} values) {grid}"
                  + (f" (extended by {ext['low']} below, {ext['high']} above, as a best λ lay on the edge)"
                     if ext["low"] or ext["high"] else " (no best λ on an edge)")
                  + f"; tuning seeds {p['tuning_seeds']} (λ = argmax of the mean validation accuracy); test seeds "
                  f"{p['test_seeds'][0]}–{p['test_seeds'][-1]} ({len(p['test_seeds'])}); sign decays over the "
                  f"{p['steps']} steps; {task['training_seconds'] / 60:.1f} min of trainings.", "",
                  "| optimizer | λ | val (tuning seeds) | val (test seeds) | test mean ± CI | Δ vs momentum ± CI "
                  "| vs momentum |",
                  "| --- | ---: | ---: | ---: | ---: | ---: | --- |"]
        for name, r in task["results"].items():
            diff = r.get("vs_momentum")
            cells = [name + (" (λ on the grid's edge)" if r["on_edge"] else ""), f"{r['lr']:g}",
                     _percent(r["tuning_val"]), _percent(r["val"]["mean"]),
                     f"{_percent(r['test']['mean'])} ± {_percent(r['test']['ci95'])}",
                     "—" if diff is None else f"{100 * diff['mean']:+.2f} ± {_percent(diff['ci95'])}",
                     "—" if diff is None else _verdict(diff)]
            lines.append("| " + " | ".join(cells) + " |")
        lines += ["", "Mean validation accuracy (%) over the tuning seeds, per λ:", "",
                  "| optimizer | " + " | ".join(task["curves"][BASELINE]) + " |",
                  "| --- |" + " ---: |" * len(task["curves"][BASELINE])]
        for name, curve in task["curves"].items():
            lines.append(f"| {name} | " + " | ".join(f"{100 * v:.1f}" for v in curve.values()) + " |")
        lines.append("")
    lines += [f"![test accuracy with 95% intervals]({image})", ""]
    return "\n".join(lines)


def plot(report: dict[str, Any], out: Path) -> None:
    """Test accuracy ± 95% interval of every optimizer, one panel per task."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    tasks = report["tasks"]
    figure = Figure(figsize=(7 * len(tasks), 4.8), layout="constrained")
    FigureCanvasAgg(figure)
    panels = figure.subplots(1, len(tasks), squeeze=False)[0]
    for axes, (label, task) in zip(panels, tasks.items()):
        names = list(task["results"])
        means = [100 * task["results"][n]["test"]["mean"] for n in names]
        cis = [100 * task["results"][n]["test"]["ci95"] for n in names]
        colors = ["tab:gray" if not n.startswith(("PowerSign", "AddSign")) else
                  "tab:blue" if n.startswith("PowerSign") else "tab:orange" for n in names]
        axes.bar(range(len(names)), means, yerr=cis, color=colors, capsize=3)
        axes.axhline(100 * task["results"][BASELINE]["test"]["mean"], color="k", linestyle="--", linewidth=1,
                     label="tuned momentum")
        low = min(m - c for m, c in zip(means, cis))
        high = max(m + c for m, c in zip(means, cis))
        axes.set_ylim(max(0.0, low - 0.3 * (high - low) - 0.5), min(100.0, high + 0.1 * (high - low) + 0.5))
        axes.set_xticks(range(len(names)), names, rotation=45, ha="right")
        p = task["protocol"]
        axes.set(ylabel="test accuracy (%), y axis cut", title=f"{label}: {p['steps']} steps, "
                 f"{len(p['test_seeds'])} seeds, 95% CI")
        axes.grid(axis="y", alpha=0.3)
        axes.legend(fontsize="small", loc="lower right")
    figure.savefig(out, format="png", dpi=100)


def measure(tasks: dict[str, ChildTask], out: Path = OUT, grid: tuple[float, ...] = GRID,
            tuning_seeds: Iterable[int] = range(3), test_seeds: Iterable[int] = range(100, 110),
            max_extend: int = 3, command: str = "") -> dict[str, Any]:
    """Tune and score the 13 optimizers on each task of ``tasks`` (label -> task); write out.json/.md/.png."""
    start, cpu = time.perf_counter(), time.process_time()
    report: dict[str, Any] = {"command": command, "machine": _machine(), "complete": False, "tasks": {}}
    cache = Cache(out.with_suffix(".json"), report)
    report["reused_trainings"] = cache.reused
    for label, task in tasks.items():
        report["tasks"][label] = measure_task(label, task, cache, grid, list(tuning_seeds), list(test_seeds),
                                              max_extend)
        cache.write()
    report["wall_seconds"], report["cpu_seconds"] = time.perf_counter() - start, time.process_time() - cpu
    report["complete"] = True
    cache.write()
    out.with_suffix(".md").write_text(markdown(report, out.with_suffix(".png").name))
    plot(report, out.with_suffix(".png"))
    return report


def main(argv: list[str] | None = None, data: ChildData | None = None) -> int:
    """Parse the options, build the two tasks (from ``data`` instead of the dataset files when given), measure."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=300, help="training steps of task A (default 300)")
    parser.add_argument("--transfer-steps", type=int, default=None, help="training steps of task B (default: --steps)")
    parser.add_argument("--seeds", type=int, default=10, help="fresh test seeds, from 100 (default 10)")
    parser.add_argument("--tuning-seeds", type=int, default=3, help="tuning seeds, from 0 (default 3)")
    parser.add_argument("--batch", type=int, default=64, help="images per minibatch (default 64)")
    parser.add_argument("--max-extend", type=int, default=3, help="grid extensions per side at most (default 3)")
    parser.add_argument("--quick", action="store_true", help="a tiny smoke run: 5 steps, 3 λ, 1+2 seeds")
    parser.add_argument("--out", type=Path, default=OUT, help=f"prefix of the .json/.md/.png (default {OUT})")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    grid, val_images = GRID, 2000
    if args.quick:
        args.steps, args.transfer_steps, args.seeds, args.tuning_seeds = 5, 5, 2, 1
        args.max_extend, grid, val_images = 1, (1e-2, 1e-1, 1.0), 256
    steps_b = args.transfer_steps or args.steps
    tasks = {"A: Fashion-MNIST ConvNet": ChildTask("fashion-mnist", "convnet", steps=args.steps, batch=args.batch,
                                                   lrs=grid, val_images=val_images, data=data),
             "B (transfer): MNIST MLP": ChildTask("mnist", "mlp", steps=steps_b, batch=args.batch, lrs=grid,
                                                  val_images=val_images, data=data)}
    command = ("OMP_NUM_THREADS=1 taskset -c 0 python scripts/sign_rules_vs_baselines.py"
               + "".join(f" {a}" for a in (argv if argv is not None else sys.argv[1:])))
    report = measure(tasks, args.out, grid, range(args.tuning_seeds), range(100, 100 + args.seeds), args.max_extend,
                     command)
    print(f"wrote {args.out.with_suffix('.json')}, .md, .png in {report['wall_seconds'] / 60:.1f} min")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
