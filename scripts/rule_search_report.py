"""Neural Optimizer Search against random search with the same budget: reward curves, best rules, held-out re-scores.

Reads finished (or interrupted) search runs of ``metaopt train`` — PPO controllers and random
searches, e.g. of the presets ``neural-optimizer-search-ppo`` and ``neural-optimizer-search-random``
with several ``--seed`` s — and writes ``docs/results/neural-optimizer-search.{md,json,png}``:

* the reward curves (batch mean and best-so-far reward against rules sampled) from ``metrics.jsonl``;
* the top ``--top`` rules of each search by their search reward (one child seed), as canonical
  strings and formulas, **re-scored on ``--seeds`` held-out child seeds** (test-split seeds,
  never used by either search): best validation accuracy over the λ grid and the test accuracy at
  that λ, mean ± 95% interval — a single 100-step reward is noisy, and the top of a list of noisy
  scores is biased upwards (the winner's curse);
* reference rules re-scored the same way: SGD ``g``, momentum ``m``, ``adam``, PowerSign and AddSign;
* enrichment: the fraction of the top rules that read the sign agreement sign(g)·sign(m̂) (both
  operands) or an Adam-like term (``adam``, ``rmsprop``, or both m̂ and v̂), against the same
  fraction among every rule each search scored.

and a summary per run: its best search reward, the re-scored test accuracy of its top rule and the
mean over its top 5. Run (after the searches; a few minutes of one core, each distinct rule is
re-scored once)::

    OMP_NUM_THREADS=1 taskset -c 1 python scripts/rule_search_report.py --ppo runs/nos-ppo runs/nos-ppo-seed1 \
        --random runs/nos-random runs/nos-random-seed1
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from metaopt.algorithms.rule_dsl import Rule, parse  # noqa: E402
from metaopt.datasets.child_training import SPLIT_SEEDS, ChildTask  # noqa: E402
from metaopt.evaluation.evaluate import confidence_interval  # noqa: E402
from metaopt.training.checkpoint import load_checkpoint  # noqa: E402
from metaopt.training.legacy import read_run_config  # noqa: E402

REFERENCES = {"SGD": "g", "momentum (m̂)": "m", "Adam": "adam", "PowerSign": "mul(sign_g, sign_m); mul(exp(o1), g)",
              "AddSign": "mul(sign_g, sign_m); add(1, o1); mul(o2, g)"}


def sign_agreement(rule: Rule) -> bool:
    return rule.reads("sign_g", "sign_m")


def adam_like(rule: Rule) -> bool:
    return rule.reads("adam") or rule.reads("rmsprop") or rule.reads("m", "v")


def load_search(run_dir: Path) -> dict[str, Any]:
    """The memory of scored rules, the settings and the logged curves of a search run."""
    config = read_run_config(run_dir / "config.json")
    state = load_checkpoint(run_dir / "last.pt", required=("model",))
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rows = [r for r in records if "train/reward_mean" in r]
    epochs = state["estimator"]["settings"]["epochs"]
    batch = config.data.options.rules_per_batch
    scored: dict[str, float] = {}
    for key, reward in state["model"]["_extra_state"].items():  # merged under today's canonical form
        canonical = parse(key).key
        scored[canonical] = max(reward, scored.get(canonical, reward))
    return {"config": config, "scored": scored, "iteration": state["iteration"],
            "counts": state["estimator"]["state"]["counts"], "settings": state["estimator"]["settings"],
            "curve": [((r["iteration"] + epochs - 1) // epochs * batch, r["train/reward_mean"], r["train/best_reward"])
                      for r in rows], "time_s": state["time"]["train_s"]}


_RESCORED: dict[str, dict[str, Any]] = {}


def rescore(task: ChildTask, rule: Rule, seeds: list[int]) -> dict[str, Any]:
    """Best validation accuracy over the λ grid and the test accuracy at that λ, from each held-out seed."""
    if rule.key not in _RESCORED:
        _RESCORED[rule.key] = _rescore(task, rule, seeds)
    return _RESCORED[rule.key]


def _rescore(task: ChildTask, rule: Rule, seeds: list[int]) -> dict[str, Any]:
    scores = [task.rule_score(rule, seed, test=True) for seed in seeds]
    val = torch.tensor([s.accuracy for s in scores])
    test = torch.tensor([s.test_accuracy for s in scores])
    return {"val": val.mean().item(), "val_ci95": confidence_interval(val), "test": test.mean().item(),
            "test_ci95": confidence_interval(test), "lrs": [s.lr for s in scores]}


def enrichment(rules: list[Rule]) -> dict[str, float]:
    n = max(1, len(rules))
    return {"sign_agreement": sum(map(sign_agreement, rules)) / n, "adam_like": sum(map(adam_like, rules)) / n}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ppo", type=Path, nargs="+", required=True, help="run folders of PPO searches")
    parser.add_argument("--random", type=Path, nargs="+", required=True, help="run folders of random searches")
    parser.add_argument("--top", type=int, default=10)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("docs/results"))
    args = parser.parse_args()
    start = time.perf_counter()
    searches = {f"{kind} seed {run['config'].seed}": run for kind, folders in (("PPO", args.ppo),
                                                                               ("random", args.random))
                for run in map(load_search, folders)}
    data = next(iter(searches.values()))["config"].data.options
    task = ChildTask(data.images, data.network, data.steps, data.batch, data.lrs, data.val_images)
    seeds = [SPLIT_SEEDS["test"] + 7 * 10**6 + i for i in range(args.seeds)]
    results: dict[str, Any] = {"protocol": {**task.protocol(), "rescore_seeds": seeds, "top": args.top}, "searches": {},
                               "references": {}}
    for name, search in searches.items():
        ranked = sorted(search["scored"].items(), key=lambda item: -item[1])
        top = [(key, reward, parse(key)) for key, reward in ranked[:args.top]]
        results["searches"][name] = {
            "rules_scored": len(search["scored"]), "counts": search["counts"], "settings": search["settings"],
            "train_s": search["time_s"], "curve": search["curve"],
            "enrichment_top": enrichment([r for _, _, r in top]),
            "enrichment_all": enrichment([parse(key) for key, _ in ranked]),
            "top": [{"rule": key, "formula": rule.formula(), "search_reward": reward, **rescore(task, rule, seeds)}
                    for key, reward, rule in top]}
        print(name, "done", flush=True)
    for name, text in REFERENCES.items():
        results["references"][name] = {"rule": text, "formula": parse(text).formula(),
                                       **rescore(task, parse(text), seeds)}
    results["report_s"] = time.perf_counter() - start
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "neural-optimizer-search.json").write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n")
    plot(results, args.out / "neural-optimizer-search.png")
    (args.out / "neural-optimizer-search.md").write_text(markdown(results))
    print(markdown(results))


def colour(name: str) -> str:
    return "tab:blue" if name.startswith("PPO") else "tab:orange"


def plot(results: dict[str, Any], path: Path) -> None:
    fig, (curves, bars) = plt.subplots(1, 2, figsize=(13, 5))
    for k, (name, search) in enumerate(results["searches"].items()):
        rules, mean, best = zip(*search["curve"])
        style = ("-", "-.")[k % 2]
        curves.plot(rules, mean, color=colour(name), alpha=0.6, linestyle=style, label=f"{name}: batch mean")
        curves.plot(rules, best, color=colour(name), linestyle=":", label=f"{name}: best so far")
    curves.set(xlabel="rules sampled", ylabel="reward (best validation accuracy)", title="search rewards")
    curves.legend(fontsize=8)
    labels, means, cis, colours = [], [], [], []
    for name, search in results["searches"].items():
        for k, rule in enumerate(search["top"][:3]):
            labels.append(f"{name} #{k + 1}")
            means.append(rule["test"])
            cis.append(rule["test_ci95"])
            colours.append(colour(name))
    for name, ref in results["references"].items():
        labels.append(name)
        means.append(ref["test"])
        cis.append(ref["test_ci95"])
        colours.append("grey")
    bars.barh(range(len(labels)), means, xerr=cis, color=colours)
    bars.set_yticks(range(len(labels)), labels, fontsize=8)
    bars.invert_yaxis()
    low = min(means) - 0.05
    bars.set(xlim=(max(0.0, low), max(means) + 0.03), xlabel="test accuracy, held-out seeds (mean ± 95% CI)",
             title="top rules re-scored")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def markdown(results: dict[str, Any]) -> str:
    p = results["protocol"]
    lines = ["# Neural Optimizer Search vs random search (same budget)", "",
             f"Child: {p['child']} on {p['dataset']} 14x14, {p['steps']} steps of {p['batch']} images, λ over "
             f"{p['lrs']}, reward = best validation accuracy ({p['val_images']} validation images); batch norm: "
             f"{p['batch_norm']}. Re-scores: {len(p['rescore_seeds'])} held-out child seeds (test split), best "
             "validation accuracy over the λ grid and the test accuracy (10,000 test images) at that λ, mean ± 95% "
             "CI. 2-core AMD EPYC, one thread per run (`taskset`).", "",
             "| run | rules sampled | distinct scored | training min | batch mean reward, last 5 batches | best search "
             "reward | top-1 re-scored test | top-5 mean re-scored test | top-k sign agreement / Adam-like |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, search in results["searches"].items():
        counts, top = search["counts"], search["top"]
        last = [mean for _, mean, _ in search["curve"][-5:]]
        lines.append(f"| {name} | {counts['scored'] + counts['cached']} | {counts['scored']} | "
                     f"{search['train_s'] / 60:.1f} | {sum(last) / len(last):.3f} | {top[0]['search_reward']:.3f} | "
                     f"{top[0]['test']:.3f} ± {top[0]['test_ci95']:.3f} | "
                     f"{sum(r['test'] for r in top[:5]) / len(top[:5]):.3f} | "
                     f"{search['enrichment_top']['sign_agreement']:.0%} / "
                     f"{search['enrichment_top']['adam_like']:.0%} |")
    lines.append("")
    for name, search in results["searches"].items():
        counts = search["counts"]
        sampled = counts["scored"] + counts["cached"]
        lines += [f"## {name}", "",
                  f"{sampled} rules sampled, {counts['scored']} distinct scored ({counts['cached']} cache hits, "
                  f"{counts['invalid']} scored 0; {search['rules_scored']} distinct after canonical signs), "
                  f"settings {search['settings']}, {search['train_s'] / 60:.1f} min "
                  "of training time.", "",
                  f"Enrichment — top {p['top']}: sign agreement {search['enrichment_top']['sign_agreement']:.0%}, "
                  f"Adam-like {search['enrichment_top']['adam_like']:.0%}; all scored rules: sign agreement "
                  f"{search['enrichment_all']['sign_agreement']:.0%}, Adam-like "
                  f"{search['enrichment_all']['adam_like']:.0%}.", "",
                  "| # | rule | formula | search reward | re-scored val | re-scored test |",
                  "|---|---|---|---|---|---|"]
        for k, rule in enumerate(search["top"]):
            lines.append(f"| {k + 1} | `{rule['rule']}` | {rule['formula']} | {rule['search_reward']:.3f} | "
                         f"{rule['val']:.3f} ± {rule['val_ci95']:.3f} | {rule['test']:.3f} ± {rule['test_ci95']:.3f} |")
        lines.append("")
    lines += ["## Reference rules, re-scored the same way", "", "| rule | string | re-scored val | re-scored test |",
              "|---|---|---|---|"]
    for name, ref in results["references"].items():
        lines.append(f"| {name} | `{ref['rule']}` | {ref['val']:.3f} ± {ref['val_ci95']:.3f} | "
                     f"{ref['test']:.3f} ± {ref['test_ci95']:.3f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
