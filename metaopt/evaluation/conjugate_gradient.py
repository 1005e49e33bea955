"""Nonlinear conjugate gradient (Polak–Ribière+) with a backtracking Armijo line search, as a ``torch.optim`` optimizer.

torch has no conjugate-gradient optimizer; this is the one the learned-optimizer baselines use
(Li & Malik 2016 compare their learned optimizer with gradient descent, momentum, conjugate
gradient and L-BFGS). Every :meth:`ConjugateGradient.step` is one iteration of Nocedal & Wright's
Algorithm 5.4 with the PR+ choice of β (their eq. 5.44):

    g_k = ∇f(x_k);   β_k = max(0, g_kᵀ(g_k − g_{k−1}) / ‖g_{k−1}‖²);   p_k = −g_k + β_k p_{k−1}
    (p_k = −g_k on the first iteration, and whenever p_k is not a descent direction: a restart)
    x_{k+1} = x_k + α_k p_k,   α_k from a backtracking line search satisfying Armijo's condition
    f(x_k + α p_k) ≤ f(x_k) + c₁ α g_kᵀp_k   (N&W eq. 3.4, c₁ = 10⁻⁴)

β < 0 is clipped to 0, which restarts along −g (PR+). The line search's first trial step is ``lr``
on the first iteration (the step gradient descent with learning rate ``lr`` would take) and
``α_{k−1} g_{k−1}ᵀp_{k−1} / g_kᵀp_k`` afterwards (N&W eq. 3.60: the same first-order change as
the last step). ``line_search="interpolation"`` (the default) then tries the minimiser of the
quadratic that matches the slopes along p_k at 0 and at the first trial (the closure gives the
gradient there; exact on quadratics), or, where that quadratic does not curve upward, of the one
through f(x_k), g_kᵀp_k and f at the trial (N&W eq. 3.58), at most 10 times the first trial (so
the steps can grow tenfold per iteration where f is about linear along p_k), and keeps the
better of the two trials; when that fails Armijo, it backtracks by interpolation again, each new step kept in
[0.1 α, 0.5 α] (N&W §3.5). ``line_search="backtracking"`` starts at twice the guess above
(halving alone could never let the steps grow again) and halves the step until Armijo holds
(N&W Algorithm 3.1). If no step satisfies Armijo within ``max_evals`` trials, the parameters
stay where they were and the next iteration restarts along −g.

``step(closure)`` needs the closure (it re-evaluates the loss at the trial points): it zeroes the
gradients, computes the loss, backpropagates and returns the loss, as for ``torch.optim.LBFGS``.
One call is one iteration whatever the number of closure calls; ``state["func_evals"]`` counts
those. As LBFGS, the optimizer takes one parameter group and treats all its parameters as one vector.

References:
    Nocedal & Wright, 2006. Numerical Optimization (2nd ed.), §5.2 (Algorithm 5.4, eq. 5.44), §3.1, §3.5.
    Polak & Ribière, 1969. Note sur la convergence de méthodes de directions conjuguées.

Example:
    >>> import torch
    >>> a = torch.tensor([[3.0, 1.0], [1.0, 2.0]], dtype=torch.float64)
    >>> x = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    >>> opt = ConjugateGradient([x])
    >>> def closure():
    ...     opt.zero_grad()
    ...     loss = 0.5 * x @ a @ x - x.sum()
    ...     loss.backward()
    ...     return loss
    >>> for _ in range(2):                             # n = 2 iterations solve a 2-d quadratic
    ...     _ = opt.step(closure)
    >>> torch.allclose(x.detach(), torch.linalg.solve(a, torch.ones(2, dtype=torch.float64)))
    True
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch

__all__ = ["EXTRAPOLATION", "LINE_SEARCHES", "ConjugateGradient"]

#: The line searches :class:`ConjugateGradient` offers.
LINE_SEARCHES = ("interpolation", "backtracking")
#: The interpolation's largest step, in multiples of the first trial.
EXTRAPOLATION = 10.0


class ConjugateGradient(torch.optim.Optimizer):
    """Polak–Ribière+ nonlinear conjugate gradient with a backtracking Armijo line search (see the module docs).

    Args:
        params: the parameters (one group).
        lr: the first trial step of the first iteration's line search (default: 1.0).
        line_search: ``"interpolation"`` (quadratic interpolation, then backtracking) or ``"backtracking"``
            (halving) (default: ``"interpolation"``).
        c1: Armijo's sufficient-decrease constant, in (0, 1) (default: 1e-4).
        max_evals: trial steps per iteration before the line search gives up (default: 30).
        tolerance_grad: no step once every entry of the gradient is at most this in magnitude (default: 0).

    Raises:
        ValueError: a bad argument (named), several parameter groups, or :meth:`step` without a closure.
    """

    def __init__(self, params: Iterable[torch.Tensor] | Iterable[dict[str, Any]], lr: float = 1.0,
                 line_search: str = "interpolation", c1: float = 1e-4, max_evals: int = 30,
                 tolerance_grad: float = 0.0) -> None:
        if not (math.isfinite(lr) and lr > 0):
            raise ValueError(f"ConjugateGradient's lr (the first trial step) must be a finite number > 0, got {lr}")
        if line_search not in LINE_SEARCHES:
            raise ValueError(f"unknown line_search {line_search!r}; choose one of {LINE_SEARCHES}")
        if not 0 < c1 < 1:
            raise ValueError(f"Armijo's constant c1 must be in (0, 1), got {c1}")
        if isinstance(max_evals, bool) or not isinstance(max_evals, int) or max_evals < 1:
            raise ValueError(f"max_evals must be an integer >= 1, got {max_evals!r}")
        if not tolerance_grad >= 0:
            raise ValueError(f"tolerance_grad must be >= 0, got {tolerance_grad}")
        super().__init__(params, {"lr": lr, "line_search": line_search, "c1": c1, "max_evals": max_evals,
                                  "tolerance_grad": tolerance_grad})
        if len(self.param_groups) != 1:
            raise ValueError("ConjugateGradient takes one parameter group (all parameters are one vector, as in "
                             "torch.optim.LBFGS); pass the parameters, not groups")
        self._params: list[torch.Tensor] = self.param_groups[0]["params"]

    def _gradient(self) -> torch.Tensor:
        return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in self._params])

    def _vector(self) -> torch.Tensor:
        return torch.cat([p.detach().reshape(-1) for p in self._params])

    def _set(self, vector: torch.Tensor) -> None:
        offset = 0
        for p in self._params:
            p.copy_(vector[offset:offset + p.numel()].view_as(p))
            offset += p.numel()

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor:
        """One iteration: a direction, a line search along it, the move; returns the loss before the move."""
        if closure is None:
            raise ValueError("ConjugateGradient needs a closure (its line search re-evaluates the loss): "
                             "opt.step(closure) with a closure that zeroes the gradients, computes the loss, calls "
                             "loss.backward() and returns the loss")
        group, state = self.param_groups[0], self.state[self._params[0]]
        state.setdefault("func_evals", 0)
        state.setdefault("n_iter", 0)

        def evaluate() -> float:
            state["func_evals"] += 1
            with torch.enable_grad():
                return float(closure().detach())

        with torch.enable_grad():
            loss = closure()
        state["func_evals"] += 1
        state["n_iter"] += 1
        f0, g, x0 = float(loss.detach()), self._gradient(), self._vector()
        if not math.isfinite(f0) or g.abs().max() <= group["tolerance_grad"]:
            return loss
        d = -g
        if "d" in state:  # PR+: β = max(0, gᵀ(g − g_prev) / ‖g_prev‖²); restart when it is not a descent direction
            previous = state["g"].square().sum().clamp(min=torch.finfo(g.dtype).tiny)
            beta = max(0.0, float(g @ (g - state["g"]) / previous))
            d = d + beta * state["d"]
            if float(g @ d) >= 0:
                d = -g
        slope = float(g @ d)
        alpha = group["lr"] if "alpha" not in state else state["alpha"] * state["slope"] / slope
        if "alpha" in state and group["line_search"] == "backtracking":
            alpha *= 2  # halving only shrinks: start twice as far, so that steps can grow back
        alpha = self._line_search(evaluate, x0, d, f0, slope, alpha, group)
        if alpha is None:  # no sufficient decrease: stay, and restart along -g next time
            self._set(x0)
            for key in ("d", "g", "alpha", "slope"):
                state.pop(key, None)
            return loss
        self._set(x0 + alpha * d)
        state.update(d=d, g=g, alpha=alpha, slope=slope)
        return loss

    def _line_search(self, evaluate: Callable[[], float], x0: torch.Tensor, d: torch.Tensor, f0: float, slope: float,
                     alpha: float, group: dict[str, Any]) -> float | None:
        """A step along ``d`` from ``x0`` satisfying Armijo's condition, or ``None`` after ``max_evals`` trials."""
        def at(step: float) -> tuple[float, float]:
            """f and its slope along ``d`` at ``x0 + step · d`` (the closure computes both)."""
            self._set(x0 + step * d)
            value = evaluate()
            return (value, float(self._gradient() @ d)) if math.isfinite(value) else (math.inf, math.nan)

        def armijo(step: float, value: float) -> bool:
            return value <= f0 + group["c1"] * step * slope

        def interpolated(step: float, value: float, derivative: float) -> float:
            """The minimiser of the quadratic that has f's slope at 0 and at ``step`` (N&W §3.5), else of the one
            through f0, the slope at 0 and ``value`` (N&W eq. 3.58), at most ``EXTRAPOLATION · step``."""
            if derivative > slope:  # the secant of the slopes: exact on quadratics, free of f0's cancellation
                return min(step * slope / (slope - derivative), EXTRAPOLATION * step)
            curvature = value - f0 - slope * step
            if curvature > 0 and math.isfinite(curvature):
                return min(-slope * step**2 / (2 * curvature), EXTRAPOLATION * step)
            return EXTRAPOLATION * step

        (value, derivative), evals = at(alpha), 1
        if group["line_search"] == "interpolation" and evals < group["max_evals"]:
            trial = interpolated(alpha, value, derivative)
            (trial_value, trial_derivative), evals = at(trial), evals + 1
            if trial_value < value:
                alpha, value, derivative = trial, trial_value, trial_derivative
        while not armijo(alpha, value):
            if evals >= group["max_evals"]:
                return None
            if group["line_search"] == "interpolation":
                alpha = min(max(interpolated(alpha, value, derivative), 0.1 * alpha), 0.5 * alpha)
            else:
                alpha = 0.5 * alpha
            (value, derivative), evals = at(alpha), evals + 1
        return alpha
