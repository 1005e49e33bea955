"""Omniglot at an equal CPU-time budget: MAML, each MAML++ technique alone, MAML++, Meta-SGD, T-net, MT-net, ARML.

    python scripts/omniglot_budget.py --ways 5 --group mamlpp [--budget 10] [--root runs/budget]
    python scripts/omniglot_budget.py --ways 5 --group relational
    python scripts/omniglot_budget.py --ways 5 --variants maml,msl        # any subset
    python scripts/omniglot_budget.py --ways 5 --group mamlpp --report   # table and chart of finished runs

Every run trains for ``--budget`` minutes of CPU time (``budget_clock="cpu"``, one thread, so
runs sharing the machine cannot take budget from each other), then its best validation checkpoint
is scored on 600 test tasks with 15 queries per class. Runs are resumable: an interrupted
variant continues from its ``last.pt``; a finished one (``final.json``) is skipped.

The setting is MAML++'s Omniglot recipe scaled to a CPU budget (Antoniou et al. 2019, §4-5): the
MAML Conv4-64 with strided convolutions, 3 inner steps at train and test of SGD with α = 0.4
(LSLR's initial rates), 16 tasks per meta-batch, 1 query per class in meta-training, Adam 1e-3,
batch-norm policy "batch". The epoch schedules are scaled to the budget: the nominal run is 50
epochs of about what the budget allows (5-way: 1000 iterations, epochs of 20; 20-way: 250,
epochs of 5), MSL anneals over the first 5 epochs, DA trains first-order for the first 10, CA
anneals the meta learning rate to 1e-5 over the 50 and ends the run there (its schedule needs an
end). Every other run trains until its CPU budget is spent. Meta-SGD takes one inner step (its paper's setting) with α
drawn uniformly from [0.005, 0.1]. T-net and MT-net (Lee & Choi 2018) and ARML (Yao et al. 2020)
use the same 3-step MAML inner loop around their own additions (ARML: 4 vertices, σ = 8,
reconstruction weight 0.01). The meta-learner LSTM (Ravi & Larochelle 2017) takes its paper's
12 first-order updates, one task per meta-update with 15 queries per class (as many query images
per meta-update as MAML's 16 tasks of 1), gradient-norm clipping 0.25 and the "support"
batch-norm policy.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from metaopt.evaluation.compare import plot_runs, read_run
from metaopt.training.config import RunConfig, load_preset
from metaopt.training.experiment import evaluate_run, train

#: The MAML++ switches, all off: MAML++ with one of them on is MAML plus that technique.
OFF = {"msl_epochs": None, "second_order_from_epoch": None, "per_step_bn_stats": False, "per_step_bn_weights": False,
       "per_step_lr": False}
COSINE = {"lr_schedule": "cosine", "min_meta_lr": 1e-5}
STEPS = {"inner_steps": 3, "eval_inner_steps": 3, "strategy": "loop"}
MAMLPP = {"name": "mamlpp", "inner_lr": 0.4, **STEPS, **OFF}  # MAML's base setting as MAML++ with every switch off
#: label and config changes per variant; an algorithm section with a name replaces the base's.
VARIANTS: dict[str, tuple[str, dict]] = {
    "maml": ("MAML", {}),
    "msl": ("+ MSL", {"algorithm": {**MAMLPP, "msl_epochs": 5}}),
    "lslr": ("+ LSLR", {"algorithm": {**MAMLPP, "per_step_lr": True}}),
    "bn": ("+ BNRS + BNWB", {"algorithm": {**MAMLPP, "per_step_bn_stats": True, "per_step_bn_weights": True}}),
    "da": ("+ DA", {"algorithm": {**MAMLPP, "second_order_from_epoch": 10}}),
    "ca": ("+ CA", {"trainer": COSINE}),
    "mamlpp": ("MAML++ (all)", {"algorithm": {**MAMLPP, "msl_epochs": 5, "second_order_from_epoch": 10,
                                              "per_step_bn_stats": True, "per_step_bn_weights": True,
                                              "per_step_lr": True}, "trainer": COSINE}),
    "metasgd": ("Meta-SGD", {"algorithm": {"name": "metasgd", "inner_steps": 1, "eval_inner_steps": 1,
                                           "strategy": "loop", "init": "uniform"}}),
    "tnet": ("T-net", {"algorithm": {"name": "tnet", "inner_lr": 0.4, **STEPS}}),
    "mtnet": ("MT-net", {"algorithm": {"name": "mtnet", "inner_lr": 0.4, "mask": "unit", **STEPS}}),
    "arml": ("ARML", {"algorithm": {"name": "arml", "inner_lr": 0.4, "vertices": 4, "sigma": 8.0,
                                    "loss_weight": 0.01, **STEPS}}),
    "metalstm": ("Meta-learner LSTM", {"algorithm": {"name": "metalstm", "inner_steps": 12, "eval_inner_steps": 12,
                                                     "bn_policy": "support", "strategy": "loop"},
                                       "data": {"meta_batch": 1, "query": 15}, "trainer": {"grad_clip": 0.25}}),
}
GROUPS = {
    ("mamlpp", 5): ["maml", "msl", "lslr", "bn", "da", "ca", "mamlpp", "metasgd"],
    ("mamlpp", 20): ["maml", "mamlpp", "metasgd"],
    ("relational", 5): ["maml", "tnet", "mtnet", "arml"],
    ("relational", 20): ["maml", "tnet", "mtnet", "arml"],
    ("lstm", 5): ["maml", "metalstm"],
}
TEST_EPISODES = 600
NOMINAL_ITERATIONS = {5: 1000, 20: 250}  # about what 10 CPU minutes allow; the epoch schedules span them


def variant_config(name: str, ways: int, budget: float) -> RunConfig:
    """The ablation's base setting with variant ``name``'s techniques switched on."""
    nominal = NOMINAL_ITERATIONS[ways]
    base = load_preset(f"maml-omniglot-{ways}w1s").replace(
        algorithm={"inner_lr": 0.4, **STEPS}, data={"meta_batch": 16},
        trainer={"iterations": nominal, "epoch_length": nominal // 50, "time_budget": budget, "budget_clock": "cpu",
                 "eval_every": nominal // 4, "eval_episodes": 100, "checkpoint_every": 50, "log_every": 25})
    raw = base.to_dict()
    for section, changes in VARIANTS[name][1].items():
        raw[section] = dict(changes) if "name" in changes else {**raw[section], **changes}
    config = RunConfig.from_dict(raw)
    cosine = config.trainer.lr_schedule == "cosine"
    return config if cosine else config.replace(trainer={"iterations": 100 * nominal})


def run_variant(name: str, ways: int, budget: float, root: Path) -> None:
    """Train (or resume) one variant, then score its best checkpoint on 600 test tasks (``eval.json``)."""
    run_dir = root / f"omniglot-{ways}w1s" / name
    if not (run_dir / "final.json").exists():
        train(variant_config(name, ways, budget), run_dir, resume=(run_dir / "last.pt").exists())
    if not (run_dir / "eval.json").exists():
        evaluate_run(run_dir, "best", episodes=TEST_EPISODES)
    print(f"{VARIANTS[name][0]}: {json.loads((run_dir / 'eval.json').read_text())['summary']}")


def report(ways: int, names: list[str], root: Path, title: str) -> str:
    """Write ``<title>.md`` (table) and ``<title>.png`` (validation curves) of the finished runs among ``names``."""
    folder = root / f"omniglot-{ways}w1s"
    runs = [read_run(folder / name) for name in names if (folder / name / "eval.json").exists()]
    lines = ["| variant | test accuracy (95% CI) | test steps | batch norm | iterations | CPU min | tasks / CPU s |",
             "| --- | ---: | ---: | --- | ---: | ---: | ---: |"]
    for run in runs:
        result = run.evaluation["result"]
        last = run.records[-1]
        cpu_s = last["time/train_cpu_s"]
        tasks = run.iterations * run.config.data.options.meta_batch
        lines.append(f"| {VARIANTS[run.name][0]} | {100 * result['mean']:.2f}% ± {100 * result['ci95']:.2f}% | "
                     f"{result['protocol']['inner_steps']} | {result['protocol']['bn_policy']} | {run.iterations} | "
                     f"{cpu_s / 60:.1f} | {tasks / cpu_s:.1f} |")
    per_run = ("inner_steps", "bn_policy")
    protocol = {k: v for k, v in runs[0].evaluation["result"]["protocol"].items() if k not in per_run} if runs else {}
    table = "\n".join(lines) + f"\n\nProtocol: {json.dumps(protocol)}; 1 thread per run.\n"
    if runs:
        plot_runs(runs, folder / f"{title}.png", clock="cpu")
    (folder / f"{title}.md").write_text(table)
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ways", type=int, choices=(5, 20), default=5)
    parser.add_argument("--budget", type=float, default=10.0, help="CPU minutes of meta-training per run")
    parser.add_argument("--group", choices=sorted({group for group, _ in GROUPS}), default="mamlpp")
    parser.add_argument("--variants", help=f"comma-separated subset of {list(VARIANTS)} (instead of --group)")
    parser.add_argument("--root", type=Path, default=Path("runs/budget"))
    parser.add_argument("--report", action="store_true", help="only write the table and chart of finished runs")
    args = parser.parse_args()
    if not args.variants and (args.group, args.ways) not in GROUPS:
        parser.error(f"group {args.group!r} has no {args.ways}-way runs; groups: {sorted(GROUPS)}")
    names = args.variants.split(",") if args.variants else GROUPS[args.group, args.ways]
    unknown = sorted(set(names) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
    if not args.report:
        torch.set_num_threads(1)
        for name in names:
            run_variant(name, args.ways, args.budget, args.root)
    print(report(args.ways, names, args.root, args.group if not args.variants else "selection"))


if __name__ == "__main__":
    main()
