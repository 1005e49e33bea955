"""Li & Malik's learned optimizer against tuned GD, momentum, conjugate gradient and L-BFGS, per problem family.

For every family, trains ``metaopt train --preset li-malik-FAMILY`` into ``RUNS/FAMILY`` (or loads the run when
its ``final.json`` is there), then runs the best checkpoint's policy and the four baselines (learning rates tuned
on validation problems, :mod:`metaopt.evaluation.iteration_baselines`) on the first ``--problems`` test problems
for twice the training horizon, counting iterations. Writes OUT.md (protocol and tables), OUT.json and OUT.png.

    METAOPT_DATA=../shared/data OMP_NUM_THREADS=1 taskset -c 0 python scripts/li_malik_vs_baselines.py \\
        --runs runs/li-malik --out docs/results/li-malik
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from metaopt.datasets.li_malik_problems import FAMILY_NAMES
from metaopt.evaluation.iteration_baselines import BASELINES, compare_in_iterations, plot_curves, tables
from metaopt.evaluation.tuned_baselines import GRID, LEARNED
from metaopt.problems.optimizees import TUNING_OFFSET
from metaopt.training.config import load_preset
from metaopt.training.experiment import load_run, train


def _losses(scored: dict, horizon: int) -> list[str]:
    """Where the learned policy is beaten: per family and horizon, the baselines below it in mean and in median."""
    lines = []
    for family, result in scored.items():
        for t in (horizon, 2 * horizon):
            for stat in ("mean", "median"):
                ours = result["results"][LEARNED][f"{stat}_f{t}"]
                better = [n for n, r in result["results"].items() if n != LEARNED and r[f"{stat}_f{t}"] < ours]
                lines.append(f"- {family}, {stat} f{t}: " + (f"beaten by {', '.join(better)}" if better else
                                                             "best of all optimizers"))
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=Path, default=Path("runs/li-malik"), help="folder of the runs, one per family")
    parser.add_argument("--families", nargs="+", default=list(FAMILY_NAMES), choices=FAMILY_NAMES)
    parser.add_argument("--problems", type=int, default=20, help="test problems per family (default: 20)")
    parser.add_argument("--tune-problems", type=int, default=8, help="validation problems the baselines tune on")
    parser.add_argument("--out", type=Path, default=Path("docs/results/li-malik"), help="prefix of .md/.json/.png")
    args = parser.parse_args()
    torch.set_num_threads(1)
    scored, protocol, horizon = {}, {}, None
    for family in args.families:
        config, run_dir = load_preset(f"li-malik-{family}"), args.runs / family
        final = json.loads((run_dir / "final.json").read_text()) if (run_dir / "final.json").exists() else \
            train(config, run_dir)
        start = time.process_time()
        options, data = config.algorithm.options, config.data
        horizon = options.horizon
        test, val = (data.entry.build(data.options, split, config.seed) for split in ("test", "val"))
        scored[family] = compare_in_iterations(
            load_run(run_dir), [test.batch(i) for i in range(args.problems)],
            [val.batch(TUNING_OFFSET + i) for i in range(args.tune_problems)], horizon, GRID)
        protocol[family] = {"estimator": options.estimator, "pairs": options.pairs, "tasks": options.tasks,
                            "sigma": options.sigma, "truncation": options.truncation, "meta_lr": config.trainer.meta_lr,
                            "iterations": final["train"]["iteration"], "best": final["train"]["best"],
                            "train_cpu_min": final["train"]["time"]["train_cpu_s"] / 60,
                            "compare_cpu_min": (time.process_time() - start) / 60}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"protocol": protocol, "scored": scored}, indent=1) + "\n")
    plot_curves(scored, args.out.with_suffix(".png"), horizon)
    runs = "\n".join(f"- {family}: {p['estimator']} ({p['pairs']} antithetic pairs x {p['tasks']} tasks, sigma "
                     f"{p['sigma']}, truncation {p['truncation']}, Adam {p['meta_lr']}), {p['iterations']} "
                     f"meta-updates in {p['train_cpu_min']:.1f} training CPU-min (best validation "
                     f"{p['best']['value']:.4g} at iteration {p['best']['iteration']}); this comparison "
                     f"{p['compare_cpu_min']:.1f} CPU-min" for family, p in protocol.items())
    text = [f"# Li & Malik's learned optimizer vs tuned baselines (`{Path(__file__).name}`)", "",
            f"Protocol: the policy (`li-malik` presets, `metaopt train --preset li-malik-FAMILY`) is meta-trained "
            f"on a fresh problem per run, horizon T = {horizon}; then it and {', '.join(BASELINES)} run "
            f"{2 * horizon} iterations (one `step`, whatever its function evaluations) on the first "
            f"{args.problems} test problems of each family (seeds 2e9 + i). Each baseline's learning rate (CG: its "
            f"first trial step; L-BFGS: its lr, strong-Wolfe line search, max_iter 1) is tuned over {GRID} on "
            f"{args.tune_problems} validation problems (seeds 1e9 + 1e6 + i) by the mean objective at T. Run seed 0, "
            "one CPU core. Means with 95% confidence intervals over the test problems, and medians.", "",
            "Problems (`datasets/li_malik_problems.py`; sizes recalled from the paper, not checked against it): "
            "logistic regression, d = 3, 100 points from two Gaussians, l2 5e-4; robust linear regression "
            "(Geman-McClure, c = 1), d = 3, 4 clusters of 25 points each on its own line; a 2-2-2 ReLU net, "
            "softmax, l2 5e-4, 4 clusters of 25 points labelled 0, 0, 1, 1; theta_0 ~ N(0, I).", "",
            "Meta-training:", "", runs, "", tables(scored, horizon), "Where the learned policy loses:", "",
            *_losses(scored, horizon), "", f"![mean objective per iteration]({args.out.with_suffix('.png').name})", ""]
    args.out.with_suffix(".md").write_text("\n".join(text))
    print("\n".join(text))


if __name__ == "__main__":
    main()
