"""The kernel levers of issue 16 on the benchmark's max-pool Conv4, measured apart, and the convolutions' floor.

The loop meta-gradient of ``metaopt bench``'s configuration (max-pool Conv4-64, 15 queries per
class, 16 tasks, one inner step) is timed

* with the network as it is (NCHW, ``max_pool2d``);
* with its parameters in channels-last memory format (the convolutions then compute channels-last);
* with every 2x2 max-pooling computed as a reshape and ``amax`` (whose backward and double
  backward are elementwise instead of index scatters);
* with each task's query pass compiled (``torch.compile`` of the loss of the adapted parameters on
  the query set: inductor fuses batch norm, ReLU and pooling around the convolutions in its forward
  and backward). The support pass stays eager: its second-order backward is a double backward,
  which compiled graphs do not support;
* and, as the bound of every lever that leaves the convolutions to the library, the convolution
  calls of one meta-gradient replayed alone (same shapes, same arguments, nothing else).

Prints seconds per meta-gradient (fastest of ``--repeats`` rounds, each timing every lever once, after
one untimed call of each), the speed-up over
the network as it is, and the largest difference of the meta-gradient from its own, relative to its
largest entry; for the convolutions alone, the largest speed-up a lever outside them can give, and their
rate of floating-point operations next to the machine's float32 matrix-multiply rate.

Run with the machine idle::

    python scripts/conv_levers.py --threads 2
"""

from __future__ import annotations

import argparse
import functools
import time
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map

from metaopt.bench.workloads import Workload, build_meta_loss, plain_meta_loss

MetaLoss = tuple[list[torch.Tensor], Callable[[], torch.Tensor]]


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


def network_lever(change: Callable[[nn.Module], None] | None) -> Callable[[Workload], MetaLoss]:
    """metaopt's loop meta-loss of ``workload`` on its network changed by ``change`` (as it is when ``None``)."""

    def build(workload: Workload) -> MetaLoss:
        model, meta_loss = build_meta_loss("loop", workload)
        if change is not None:
            change(model)
        return list(model.parameters()), meta_loss

    return build


def compiled_query_pass(workload: Workload) -> MetaLoss:
    """The bench's plain per-task loop whose query pass, the loss of the adapted parameters, is compiled.

    The compiled pass normalises with its batch's statistics without writing the running ones (it
    would otherwise update buffers that the eager support pass's graph has saved).
    """
    model, batch = workload.model(), workload.batch()
    buffers = dict(model.named_buffers())

    def loss(state: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        scratch = {name: b.clone() for name, b in buffers.items()}
        return F.cross_entropy(torch.func.functional_call(model, {**state, **scratch}, (x,)), y)

    # Tracing reads the adapted (non-leaf) parameters' .grad, which torch warns about; nothing here uses it.
    warnings.filterwarnings("ignore", "The .grad attribute of a Tensor that is not a leaf", UserWarning)
    meta_loss = plain_meta_loss(model, batch, workload, query_loss=torch.compile(loss, dynamic=False))
    return list(model.parameters()), meta_loss


LEVERS: dict[str, Callable[[Workload], MetaLoss]] = {
    "as it is": network_lever(None), "channels-last": network_lever(channels_last),
    "amax pooling": network_lever(amax_pooling), "query pass compiled": compiled_query_pass}

_CONVOLUTIONS = (torch.ops.aten.convolution.default, torch.ops.aten.convolution_backward.default)


class _ConvolutionRecorder(TorchDispatchMode):
    """Records every convolution (forward and backward) dispatched while active, with copies of its arguments,
    and counts their floating-point operations (a multiply-add is two)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[Callable, tuple, dict]] = []
        self.flops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204 - torch's protocol
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func in _CONVOLUTIONS:
            copy = tree_map(lambda a: a.detach().clone() if isinstance(a, torch.Tensor) else a, (args, kwargs))
            self.calls.append((func, *copy))
            if func is torch.ops.aten.convolution.default:
                outputs, weight, products = out, args[1], 1
            else:  # grad_output, input, weight, ..., output_mask: grad_input and grad_weight each cost a forward
                outputs, weight, products = args[0], args[2], int(args[-1][0]) + int(args[-1][1])
            self.flops += 2 * outputs.numel() * weight[0].numel() * products
        return out


def meta_gradient(params: list[torch.Tensor], meta_loss: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """The gradient of ``meta_loss()`` with respect to ``params``."""
    return torch.autograd.grad(meta_loss(), params)


def convolution_replay(workload: Workload) -> tuple[Callable[[], None], int, int]:
    """A call replaying the convolutions of one loop meta-gradient alone, their number and floating-point operations."""
    params, meta_loss = network_lever(None)(workload)
    recorder = _ConvolutionRecorder()
    with recorder:
        meta_gradient(params, meta_loss)

    def replay() -> None:
        with torch.no_grad():
            for func, args, kwargs in recorder.calls:
                func(*args, **kwargs)

    return replay, len(recorder.calls), recorder.flops


def in_rounds(runs: dict[str, Callable[[], object]], repeats: int) -> tuple[dict[str, float], dict[str, object]]:
    """Fastest seconds of each run and its result: one untimed call of each, then ``repeats`` rounds of one call each.

    Rounds spread a noisy machine's slow spells over every run instead of one.
    """
    results = {name: run() for name, run in runs.items()}
    seconds = {name: float("inf") for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            results[name] = run()
            seconds[name] = min(seconds[name], time.perf_counter() - start)
    return seconds, results


def compare(workload: Workload, repeats: int) -> list[dict]:
    """One row per lever, then the convolutions alone: seconds, speed-up over the network as it is, relative gap
    (and, for the convolutions, their rate in GFLOP/s)."""
    runs: dict[str, Callable[[], object]] = {
        name: functools.partial(meta_gradient, *build(workload)) for name, build in LEVERS.items()}
    replay, calls, flops = convolution_replay(workload)
    alone = f"its {calls} convolution calls alone"
    runs[alone] = replay
    seconds, grads = in_rounds(runs, repeats)
    base, reference = seconds["as it is"], grads["as it is"]
    scale = max(float(g.abs().max()) for g in reference)
    rows = []
    for name in runs:
        gap = None if name == alone else max(float((g - r).abs().max()) for g, r in zip(grads[name], reference)) / scale
        rows.append({"lever": name, "order": workload.order, "seconds": seconds[name], "speedup": base / seconds[name],
                     "relative_gap": gap})
    rows[-1]["gflops"] = flops / seconds[alone] / 1e9
    return rows


def matrix_product_gflops(size: int = 2048, repeats: int = 5) -> float:
    """The machine's float32 matrix-multiply rate (GFLOP/s): the fastest of ``repeats`` ``size``-square products."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    seconds, _ = in_rounds({"product": lambda: a @ b}, repeats)
    return 2 * size**3 / seconds["product"] / 1e9


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
            gap = "" if row["relative_gap"] is None else f"{row['relative_gap']:.1e}"
            rate = f" ({row['gflops']:.0f} GFLOP/s)" if "gflops" in row else ""
            print(f"| {row['order']} | {row['lever']}{rate} | {row['seconds']:.3f} | {row['speedup']:.2f}x | {gap} |",
                  flush=True)
    print(f"a 2048x2048 float32 matrix product: {matrix_product_gflops():.0f} GFLOP/s")


if __name__ == "__main__":
    main()
