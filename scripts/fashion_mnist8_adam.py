"""Adam tuned over 14 log-spaced learning rates on ImageMLP_FashionMnist8_Relu32, against the reference's envelope.

The reference (google/learned_optimization ``baselines/normalizers.py``) averages the train loss
over 5 seeds per learning rate, smooths it with an EMA of 0.95 per evaluation (one every 10
steps), takes the minimum over learning rates (and over four Adam variants), resamples it at 512
points over [0, 100k] steps (one every 195.7) and keeps its running minimum; 1.790 / 1.057 /
0.551 at 100 / 300 / 1000 steps are read off that coarse curve by interpolation. This script
does the same with Adam alone (the train loss of every step, EMA 0.95 per 10 steps), and also
reports a single tuned Adam: for each horizon the learning rate with the lowest mean smoothed
loss there, with mean ± 95% CI over the seeds.

    METAOPT_DATA=../shared/data OMP_NUM_THREADS=1 taskset -c 1 python scripts/fashion_mnist8_adam.py
"""

from __future__ import annotations

import argparse
import functools
import time

import numpy as np
import torch

from metaopt.datasets.fashion_mnist import FashionMNIST8MLP
from metaopt.evaluation.evaluate import confidence_interval
from metaopt.evaluation.tuned_baselines import run_optimizer

REFERENCE = {100: 1.790, 300: 1.057, 1000: 0.551}
GRID_X = np.linspace(0, 100_000, 512)  # the reference's resampling of its envelope
ALPHA = 0.95 ** (1 / 10)  # the reference's EMA of 0.95 per evaluation, one evaluation every 10 steps


def ema(curves: np.ndarray) -> np.ndarray:
    """The reference's EMA along the last axis (started at the first value, not debiased)."""
    out = np.empty_like(curves)
    out[..., 0] = curves[..., 0]
    for t in range(1, curves.shape[-1]):
        out[..., t] = ALPHA * out[..., t - 1] + (1 - ALPHA) * curves[..., t]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=5, help="problems (init and batch order) per learning rate")
    parser.add_argument("--steps", type=int, default=1180, help="Adam steps (the envelope at 1000 needs 1174)")
    parser.add_argument("--lrs", type=float, nargs="+", default=np.logspace(-4, 0, 14).tolist())
    args = parser.parse_args()
    torch.set_num_threads(1)
    start = time.process_time()
    family = FashionMNIST8MLP()
    runs = np.stack([np.stack([run_optimizer(functools.partial(torch.optim.Adam, lr=lr), family.sample(seed),
                                             args.steps).numpy() for seed in range(args.seeds)]) for lr in args.lrs])
    smooth = ema(np.nan_to_num(runs, nan=np.inf))  # [lrs, seeds, steps + 1]
    envelope = smooth.mean(axis=1).min(axis=0)
    xs = GRID_X[: int(args.steps // GRID_X[1]) + 1]  # the resampling points up to the last step
    resampled = np.minimum.accumulate(np.interp(xs, np.arange(args.steps + 1), envelope))
    print(f"Adam on ImageMLP_FashionMnist8_Relu32, {args.seeds} seeds, {len(args.lrs)} learning rates "
          f"{args.lrs[0]:.3g}..{args.lrs[-1]:.3g}; CPU {time.process_time() - start:.0f} s")
    print("| step | reference envelope | ours, reference protocol | tuned lr | mean smoothed loss (95% CI) "
          "| mean raw loss over steps t-4..t+5 (95% CI) |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: |")
    for t, ref in REFERENCE.items():
        best = int(np.argmin(smooth[:, :, t].mean(axis=1)))
        at_t = torch.from_numpy(smooth[best, :, t])
        raw = torch.from_numpy(runs[best, :, t - 4 : t + 6].mean(axis=1))
        print(f"| {t} | {ref:.3f} | {np.interp(t, xs, resampled):.3f} | {args.lrs[best]:.3g} | "
              f"{at_t.mean():.3f} ± {confidence_interval(at_t):.3f} | "
              f"{raw.mean():.3f} ± {confidence_interval(raw):.3f} |")
    print("final mean raw loss per lr:", {f"{lr:.3g}": round(float(runs[i, :, -10:].mean()), 3)
                                          for i, lr in enumerate(args.lrs)})


if __name__ == "__main__":
    main()
