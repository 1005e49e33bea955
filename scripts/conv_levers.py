"""Two levers of issue 16 on the benchmark's max-pool Conv4, measured apart: channels-last and max-pooling by ``amax``.

The loop meta-gradient of ``metaopt bench``'s configuration (max-pool Conv4-64, 15 queries per
class, 16 tasks, one inner step) is timed with the network as it is (NCHW, ``max_pool2d``), with
its parameters in channels-last memory format (the convolutions then compute channels-last), and
with every 2x2 max-pooling computed as a reshape and ``amax`` (whose backward and double backward
are elementwise instead of index scatters). Prints seconds per meta-gradient (fastest of
``--repeats`` after one untimed), the speed-up over the network as it is, and the largest
difference of the meta-gradient from its own, relative to its largest entry.

Run with the machine idle::

    python scripts/conv_levers.py --threads 2
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
from torch import nn

from metaopt.bench.workloads import Workload, build_meta_loss


class AmaxPool2d(nn.Module):
    """2x2 max-pooling (floor mode) as a reshape and ``amax``: ties share the gradient instead of one taking it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        x = x[..., : h // 2 * 2, : w // 2 * 2]
        return x.reshape(n, c, h // 2, 2, w // 2, 2).amax(dim=(3, 5))


def amax_pooling(model: nn.Module) -> None:
    """Replace every ``nn.MaxPool2d(2)`` of ``model`` by :class:`AmaxPool2d`."""
    for name, child in model.named_children():
        if isinstance(child, nn.MaxPool2d):
            setattr(model, name, AmaxPool2d())
        else:
            amax_pooling(child)


def channels_last(model: nn.Module) -> None:
    model.to(memory_format=torch.channels_last)


LEVERS: dict[str, Callable[[nn.Module], None] | None] = {"as it is": None, "channels-last": channels_last,
                                                         "amax pooling": amax_pooling}


def measure(workload: Workload, lever: Callable[[nn.Module], None] | None,
            repeats: int) -> tuple[float, list[torch.Tensor]]:
    """Fastest seconds of one loop meta-gradient of ``workload`` with ``lever`` applied, and the meta-gradient."""
    model, meta_loss = build_meta_loss("loop", workload)
    if lever is not None:
        lever(model)
    params = list(model.parameters())
    times, grads = [], []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        grads = list(torch.autograd.grad(meta_loss(), params))
        times.append(time.perf_counter() - start)
    return min(times[1:]), grads


def compare(workload: Workload, repeats: int) -> list[dict]:
    """One row per lever: seconds, speed-up over the network as it is, relative meta-gradient difference."""
    rows, reference = [], None
    for name, lever in LEVERS.items():
        seconds, grads = measure(workload, lever, repeats)
        if reference is None:
            reference = (seconds, grads)
        scale = max(float(g.abs().max()) for g in reference[1])
        gap = max(float((g - r).abs().max()) for g, r in zip(grads, reference[1])) / scale
        rows.append({"lever": name, "order": workload.order, "seconds": seconds, "speedup": reference[0] / seconds,
                     "relative_gap": gap})
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--tasks", type=int, default=Workload.tasks)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"{args.tasks} tasks, {args.threads} thread(s)")
    print("| order | lever | s / meta-gradient | speed-up | gap (relative) |")
    print("|---|---|---:|---:|---:|")
    for first_order in (False, True):
        for row in compare(Workload(tasks=args.tasks, first_order=first_order), args.repeats):
            print(f"| {row['order']} | {row['lever']} | {row['seconds']:.3f} | {row['speedup']:.2f}x | "
                  f"{row['relative_gap']:.1e} |", flush=True)


if __name__ == "__main__":
    main()
