"""MAML vs. the pretrained baseline on sinusoid regression (Finn et al. 2017, §5.1, Figure 2).

    python scripts/sinusoid_figure2.py [--iterations 70000] [--episodes 600] [--out runs/figure2]

For K = 5 and 10: meta-train MAML with the paper's preset, pretrain one network on the same
tasks' pooled data (Adam 1e-3, same iterations and meta-batch), tune the baseline's fine-tuning
step size on validation tasks, then report the query MSE of 600 held-out tasks (100 query points
each) after 1 and 10 gradient steps, mean ± 95% interval. Prints a Markdown table and writes
``<out>/results.json``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from metaopt.algorithms import MAML
from metaopt.datasets import Sinusoid
from metaopt.evaluation import evaluate
from metaopt.evaluation.pretrained import pretrain
from metaopt.models import MLP
from metaopt.problems.sampling import split_seed
from metaopt.training.config import load_preset
from metaopt.training.experiment import build_experiment, train

FINE_TUNE_LRS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=70000)
    parser.add_argument("--episodes", type=int, default=600)
    parser.add_argument("--out", type=Path, default=Path("runs/figure2"))
    args = parser.parse_args()
    rows = []
    for shots in (5, 10):
        config = load_preset(f"maml-sinusoid-{shots}shot").replace(trainer={"iterations": args.iterations})
        run_dir = args.out / f"maml-{shots}shot"
        train(config, run_dir, resume=(run_dir / "last.pt").exists())
        maml = build_experiment(config).learner
        maml.load_state_dict(torch.load(run_dir / "best.pt", weights_only=True)["model"])
        torch.manual_seed(config.seed)
        baseline = MLP(1, 1, hidden=config.model.options.hidden)
        data = config.data.options
        pretrain(baseline, Sinusoid(shots, data.query, data.meta_batch, split_seed(config.seed, "train")),
                 args.iterations)
        tasks = {split: Sinusoid(shots, 100, 25, split_seed(config.seed, split)) for split in ("val", "test")}
        for steps in (1, 10):
            fine_tuned = {lr: MAML(baseline, inner_lr=lr, strategy="vmap") for lr in FINE_TUNE_LRS}
            tuned = min(FINE_TUNE_LRS, key=lambda lr: evaluate(fine_tuned[lr], tasks["val"], 100, steps).mean)
            for name, learner in (("MAML", maml), (f"pretrained (fine-tune lr {tuned})", fine_tuned[tuned])):
                result = evaluate(learner, tasks["test"], args.episodes, steps)
                rows.append({"method": name, "K": shots, "steps": steps, **result.to_dict()})
                print(f"{name}, K={shots}, {steps} step(s): {result}", flush=True)
    (args.out / "results.json").write_text(json.dumps(rows, indent=2) + "\n")
    print(f"\n| method | K | steps | query MSE (mean ± 95% CI, {args.episodes} tasks, 100 query points) |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['method']} | {r['K']} | {r['steps']} | {r['mean']:.3f} ± {r['ci95']:.3f} |")


if __name__ == "__main__":
    main()
