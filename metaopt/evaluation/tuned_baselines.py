"""Learned optimizer versus tuned baselines on held-out problems (Andrychowicz et al. 2016, §3).

``run_optimizer_benchmark(preset)`` meta-trains (or resumes) the preset's learned rule, tunes the
learning rate of every baseline (SGD, SGD with momentum 0.9, NAG, RMSprop, Adam; torch's other
defaults) on validation problems over a grid reaching 3, then runs every optimizer on the test
problems for twice the training horizon and reports the mean (with a 95% confidence interval
over test problems) and median loss at the horizon and at twice it. Quadratics are scored per
function (test problems of one function each). The families of ``transfer`` (the paper's
architecture transfer) are scored with the same rule, their baselines tuned on their own
validation problems.

Presets (``OPTIMIZER_PRESETS``; the paper's settings, the meta learning rate of the PyTorch
port that reproduced them):

* ``l2l-quadratics``: 10-d quadratics, Gaussian convention, 2000 training problems of 128 functions,
  raw gradients, output scale 1, 100 steps in truncations of 20, meta lr 3e-3;
* ``l2l-mnist``: the MNIST MLP 784-20-10 sigmoid, batch 128, 1000 training problems, log/sign
  preprocessing (p = 10), output scale 0.1, meta lr 1e-2; transfer to 40 hidden units, two hidden layers, and ReLU.

Usage::

    metaopt optbench --preset l2l-quadratics --out runs/l2l-quadratics
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from metaopt.checkpoint import write_json
from metaopt.evaluation import confidence_interval
from metaopt.learned_training import GRID, VAL_SEED, LearnedOptimizerTrainer, run_optimizer, tune_learning_rate
from metaopt.optimizees import OptimizeeFamily, Quadratics

__all__ = ["BASELINES", "OPTIMIZER_PRESETS", "TEST_SEED", "run_optimizer_benchmark"]

TEST_SEED = 2 * 10**9
BASELINES: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "SGD": torch.optim.SGD,
    "SGD momentum 0.9": functools.partial(torch.optim.SGD, momentum=0.9),
    "NAG": functools.partial(torch.optim.SGD, momentum=0.9, nesterov=True),
    "RMSprop": torch.optim.RMSprop,
    "Adam": torch.optim.Adam,
}


def _quadratics(batch: int) -> OptimizeeFamily:
    return Quadratics(dim=10, batch=batch, convention="gaussian")


def _mnist(part: str, **variant: Any) -> OptimizeeFamily:
    from metaopt.datasets.mnist import MNISTOptimizees

    return MNISTOptimizees(part=part, **variant)


OPTIMIZER_PRESETS: dict[str, dict[str, Any]] = {
    "l2l-quadratics": {
        "rule": {"preprocessing": False, "output_scale": 1.0},
        "train": {"epochs": 2000, "steps": 100, "unroll": 20, "meta_lr": 3e-3, "eval_every": 25, "val_problems": 4},
        "family": lambda part: _quadratics(128),
        "test_family": lambda: _quadratics(1),
        "test_problems": 1000,
        "tune_problems": 4,
        "transfer": {},
    },
    "l2l-mnist": {
        "rule": {"preprocessing": True, "output_scale": 0.1},
        "train": {"epochs": 1000, "steps": 100, "unroll": 20, "meta_lr": 1e-2, "eval_every": 20, "val_problems": 4},
        "family": lambda part: _mnist(part),
        "test_family": lambda: _mnist("meta-test"),
        "test_problems": 20,
        "tune_problems": 5,
        "transfer": {"40 hidden units": {"hidden": (40,)}, "2 hidden layers": {"hidden": (20, 20)},
                     "ReLU": {"activation": "relu"}},
    },
}


def _summary(runs: torch.Tensor, horizon: int) -> dict[str, float]:
    """Mean (with its 95% interval), median over problems of the loss after ``horizon`` and ``2 · horizon`` steps."""
    summary = {}
    for t in (horizon, 2 * horizon):
        final = runs[:, t]
        summary.update({f"mean_f{t}": float(final.mean()), f"ci95_f{t}": confidence_interval(final),
                        f"median_f{t}": float(final.median())})
    return summary


def _score(family: OptimizeeFamily, rule: torch.nn.Module, tune_family: OptimizeeFamily, tune_problems: int,
           test_problems: int, horizon: int) -> dict[str, Any]:
    """Tune the baselines on ``tune_family``, then run everything on the test problems of ``family``."""
    problems = [family.sample(TEST_SEED + i) for i in range(test_problems)]
    tune_seeds = [VAL_SEED + 10**6 + i for i in range(tune_problems)]
    results: dict[str, Any] = {}
    curves = {"LSTM (learned)": torch.stack([run_optimizer(rule, p, 2 * horizon) for p in problems])}
    results["LSTM (learned)"] = {"lr": None, **_summary(curves["LSTM (learned)"], horizon)}
    for name, factory in BASELINES.items():
        lr = tune_learning_rate(factory, tune_family, tune_seeds, horizon, GRID)
        curves[name] = torch.stack([run_optimizer(functools.partial(factory, lr=lr), p, 2 * horizon)
                                    for p in problems])
        results[name] = {"lr": lr, **_summary(curves[name], horizon)}
    return {"results": results, "mean_curves": {k: v.mean(0).tolist() for k, v in curves.items()}}


def _table(title: str, scored: Mapping[str, Any], horizon: int) -> str:
    late = 2 * horizon
    lines = [f"**{title}**", "", f"| optimizer | tuned lr | mean f{horizon} (95% CI) | median f{horizon} | "
             f"mean f{late} (95% CI) | median f{late} |", "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for name, r in scored["results"].items():
        cells = [f"{r[f'mean_f{t}']:.4g} ± {r[f'ci95_f{t}']:.2g} | {r[f'median_f{t}']:.4g}" for t in (horizon, late)]
        lines.append(f"| {name} | {r['lr'] if r['lr'] is not None else '-'} | {' | '.join(cells)} |")
    return "\n".join(lines)


def _plot(scored: Mapping[str, Mapping[str, Any]], out: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(5 * len(scored), 4))
    FigureCanvasAgg(figure)
    for i, (title, result) in enumerate(scored.items()):
        axes = figure.add_subplot(1, len(scored), i + 1)
        for name, curve in result["mean_curves"].items():
            axes.plot(curve, label=name, linewidth=2.5 if name.startswith("LSTM") else 1.2)
        axes.set_yscale("log")
        axes.set(title=title, xlabel="optimizer step", ylabel="mean loss over test problems")
        axes.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(out)


def run_optimizer_benchmark(preset: str, out: str | Path, epochs: int | None = None,
                            test_problems: int | None = None) -> str:
    """Train (or resume) the preset's learned optimizer in ``out/train`` and score it against tuned baselines.

    Writes ``out/results.json``, ``out/results.md`` and ``out/curves.png``; returns the Markdown.
    """
    if preset not in OPTIMIZER_PRESETS:
        raise ValueError(f"unknown optimizer preset {preset!r}; choose one of {sorted(OPTIMIZER_PRESETS)}")
    from metaopt.algorithms.lstm_optimizer import LSTMOptimizerRule

    spec = OPTIMIZER_PRESETS[preset]
    out = Path(out)
    settings = {**spec["train"], **({"epochs": epochs} if epochs is not None else {})}
    trainer = LearnedOptimizerTrainer(LSTMOptimizerRule(**spec["rule"]), spec["family"]("meta-train"),
                                      run_dir=out / "train", **settings)
    summary = trainer.fit(resume=(out / "train" / "last.pt").exists())
    rule = LSTMOptimizerRule.from_checkpoint(out / "train" / "best.pt")
    horizon = settings["steps"]
    count = test_problems or spec["test_problems"]
    scored = {preset: _score(spec["test_family"](), rule, spec["family"]("meta-train"), spec["tune_problems"], count,
                             horizon)}
    for name, variant in spec["transfer"].items():
        family = _mnist("meta-test", **variant)
        scored[f"transfer: {name}"] = _score(family, rule, _mnist("meta-train", **variant), spec["tune_problems"],
                                             count, horizon)
    markdown = "\n\n".join(_table(title, result, horizon) for title, result in scored.items())
    header = (f"Learned optimizer `{preset}`: best of {summary['epoch']} training epochs (validation loss "
              f"{summary['best']['value']:.4g} at epoch {summary['best']['epoch']}); {count} test problems, baselines' "
              f"learning rates tuned over {GRID} on {spec['tune_problems']} validation problems (final loss at step "
              f"{horizon}).")
    markdown = header + "\n\n" + markdown + "\n"
    write_json(out / "results.json", {"preset": preset, "train": summary, "scored": scored})
    (out / "results.md").write_text(markdown)
    _plot(scored, out / "curves.png")
    return markdown


def main(preset: str, out: str, epochs: int | None, test_problems: int | None) -> None:
    """The ``metaopt optbench`` command."""
    print(run_optimizer_benchmark(preset, out, epochs, test_problems))
    print(json.dumps({"written": [str(Path(out) / f) for f in ("results.json", "results.md", "curves.png")]}))
