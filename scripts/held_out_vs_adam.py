"""A trained learned optimizer against Adam tuned per task on held-out task-suite families.

Runs :func:`metaopt.evaluation.held_out.compare_with_tuned_adam` on the first ``--tasks`` problems
of the task suite's held-out families (:func:`metaopt.datasets.task_suite.held_out_tasks`) and
prints, at the training horizon T and at 4T, the fraction of tasks on which the learned
optimizer's train loss beats Adam tuned over 14 learning rates on that task, the median speed-up
and the mean train and validation losses; per-task rows follow. Writes the report as JSON and a
PNG chart (learned vs tuned-Adam train loss per task, at T and 4T).

    METAOPT_DATA=../shared/data OMP_NUM_THREADS=1 python scripts/held_out_vs_adam.py \\
        --checkpoint runs/rnn-mlp-lopt-suite/best.pt --horizon 200 --out docs/results/held-out
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from metaopt.datasets.task_suite import held_out_tasks
from metaopt.evaluation.held_out import compare_with_tuned_adam
from metaopt.training.experiment import load_rule


def _plot(report: dict, out: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    horizons = sorted(report["horizons"], key=int)
    figure = Figure(figsize=(5 * len(horizons), 4.5), layout="constrained")
    FigureCanvasAgg(figure)
    for axes, h in zip(figure.subplots(1, len(horizons)), horizons):
        rows = [row[h] for row in report["tasks"]]
        adam, learned = [r["adam_train"] for r in rows], [r["learned_train"] for r in rows]
        families = [row["description"].get("family", "?") for row in report["tasks"]]
        for family in sorted(set(families)):
            picked = [i for i, f in enumerate(families) if f == family]
            axes.scatter([adam[i] for i in picked], [learned[i] for i in picked], label=family)
        low, high = min(adam + learned), max(adam + learned)
        axes.plot([low, high], [low, high], "k--", linewidth=1)
        won = report["horizons"][h]["won"]
        axes.set(xlabel="tuned Adam train loss", ylabel="learned optimizer train loss",
                 title=f"step {h}: the learned optimizer wins {won:.0%}")
        axes.grid(alpha=0.3)
        axes.legend(fontsize="small")
    figure.savefig(out, format="png", dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", type=Path, required=True, help="best.pt or last.pt of a learned-optimizer run")
    parser.add_argument("--horizon", type=int, required=True, help="the training horizon T (the run's horizon)")
    parser.add_argument("--tasks", type=int, default=20, help="held-out tasks (default: 20)")
    parser.add_argument("--out", type=Path, default=Path("held-out"), help="prefix of the .json and .png written")
    args = parser.parse_args()
    torch.set_num_threads(1)
    start = time.process_time()
    rule = load_rule(args.checkpoint)
    report = compare_with_tuned_adam(rule, held_out_tasks(args.tasks), args.horizon)
    report["checkpoint"], report["cpu_s"] = str(args.checkpoint), time.process_time() - start
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
    _plot(report, args.out.with_suffix(".png"))
    print(f"{args.tasks} held-out tasks, Adam tuned per task over {len(report['protocol']['grid'])} learning rates; "
          f"train loss = mean of the last {report['protocol']['window']} minibatch losses; CPU {report['cpu_s']:.0f} s")
    print("| step | learned wins | median speed-up | Adam never reaches | learned train | Adam train "
          "| learned validation | Adam validation |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for h, s in sorted(report["horizons"].items(), key=lambda item: int(item[0])):
        cells = [f"{s[k][0]:.3f} ± {s[k][1]:.3f}" for k in ("learned_train", "adam_train", "learned_valid",
                                                            "adam_valid")]
        print(f"| {h} | {s['won']:.0%} | {s['median_speedup']:.2f} | {s['unreached']} | {' | '.join(cells)} |")
    print("\n| task | family | step | learned | Adam (lr) | speed-up |")
    print("| ---: | --- | ---: | ---: | ---: | ---: |")
    for row in report["tasks"]:
        for h in sorted((k for k in row if k.isdigit()), key=int):
            r = row[h]
            speedup = f"{r['speedup']:.2f}" if r["speedup"] is not None else f"> {r['speedup_bound']:.0f}"
            print(f"| {row['task']} | {row['description'].get('family', '?')} | {h} | {r['learned_train']:.3f} | "
                  f"{r['adam_train']:.3f} ({r['adam_lr']:.2g}) | {speedup} |")


if __name__ == "__main__":
    main()
