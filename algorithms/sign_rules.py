"""PowerSign and AddSign, the rules Neural Optimizer Search found (Bello et al. 2017, §5), as torch.optim optimizers.

With the momentum ``m ← β m + (1 - β) g`` (β = 0.9, updated with the current gradient *before* its
sign is taken) and a sign-decay schedule ``f(t)`` (1 without decay):

    PowerSign:  θ ← θ - lr · α^{f(t) · sign(g) · sign(m)} · g        (α = e)
    AddSign:    θ ← θ - lr · (α + f(t) · sign(g) · sign(m)) · g      (α = 1)

so the step grows where the gradient agrees with its running average and shrinks (AddSign: stops)
where it does not; as ``f → 0`` both become SGD. ``t`` counts the parameter's earlier steps (0 at
the first), as TF-contrib and its PyTorch port pass ``step - 1``. The schedules (:func:`sign_decay`,
``T`` = ``decay_steps``, ``n`` = ``num_periods``, t clamped to T):

    linear  ("-ld"):  f = (T - t) / T
    cosine  ("-cd"):  f = 0.5 · (1 + cos(2π n t / T))                     (n = 0.5: one half cosine to 0)
    restart ("-rd"):  f = 0.5 · (1 + cos(π · ((n t) mod T) / T)),  and f = 0 from t = T on   (n = 1)

Two bugs of the reference decays are not copied: TF-contrib's restart decay clamps t to T *then*
wraps it, so f snaps back to 1 at t = T and stays there although its docstring says it ends at 0
(here it ends at 0 and stays there, like the other two); the old PyTorch port stored the decay as
a lambda in ``param_groups``, so ``torch.save(optimizer.state_dict())`` failed (here a group holds
the schedule's name and numbers only).

Reference:
    Bello, Zoph, Vasudevan, Le, 2017. Neural Optimizer Search with Reinforcement Learning. ICML.
    https://arxiv.org/abs/1709.07417 (§5, Appendix); TF-contrib ``opt/python/training/powersign.py``,
    ``addsign.py``, ``sign_decay.py``.

Not measured here yet (issue 14: against tuned SGD, momentum and Adam on a child ConvNet).

Example:
    >>> import io
    >>> w = torch.nn.Parameter(torch.tensor([1.0, -1.0]))
    >>> opt = AddSign([w], lr=0.1, sign_decay="linear", decay_steps=100)
    >>> w.grad = torch.tensor([1.0, 1.0]); opt.step()     # m agrees with g: step (1 + 1) · g
    >>> w.detach().tolist()
    [0.800000011920929, -1.2000000476837158]
    >>> torch.save(opt.state_dict(), io.BytesIO())         # the schedule is data, not a lambda
    >>> [round(sign_decay("restart", t, 100), 3) for t in (0, 50, 100, 200)]
    [1.0, 0.5, 0.0, 0.0]
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch

from metaopt.engine.rule_optimizer import closure_loss

__all__ = ["DECAYS", "AddSign", "PowerSign", "sign_decay"]

#: The sign-decay schedules and their default number of periods n.
DECAYS = {"linear": None, "cosine": 0.5, "restart": 1.0}


def sign_decay(name: str, t: int, decay_steps: int, num_periods: float | None = None) -> float:
    """The schedule ``name``'s value f(t) at step ``t`` (see the module docs); ``num_periods`` None: its default."""
    if name not in DECAYS:
        raise ValueError(f"unknown sign decay {name!r}; choose one of {tuple(DECAYS)}")
    t = min(t, decay_steps)
    n = DECAYS[name] if num_periods is None else num_periods
    if name == "linear":
        return (decay_steps - t) / decay_steps
    if name == "cosine":
        return 0.5 * (1 + math.cos(2 * math.pi * n * t / decay_steps))
    if t == decay_steps:  # the last decay step maps to 0, and it stays there
        return 0.0
    return 0.5 * (1 + math.cos(math.pi * ((n * t) % decay_steps) / decay_steps))


class _SignRule(torch.optim.Optimizer):
    """What PowerSign and AddSign share: checked settings, the momentum, the agreement sign(g)·sign(m)·f(t)."""

    def __init__(self, params: Iterable[torch.Tensor] | Iterable[dict[str, Any]], lr: float, alpha: float,
                 beta: float, sign_decay: str | None, decay_steps: int | None, num_periods: float | None) -> None:
        name = type(self).__name__
        if not (math.isfinite(lr) and lr >= 0):
            raise ValueError(f"{name}: lr must be a finite number >= 0, got {lr}")
        if not 0 <= beta < 1:
            raise ValueError(f"{name}: beta must be in [0, 1), got {beta}")
        if sign_decay is None:
            if decay_steps is not None or num_periods is not None:
                raise ValueError(f"{name}: decay_steps and num_periods shape a sign decay and do nothing without "
                                 "one: pass sign_decay='linear', 'cosine' or 'restart', or drop them")
        else:
            if sign_decay not in DECAYS:
                raise ValueError(f"{name}: unknown sign_decay {sign_decay!r}; choose one of {tuple(DECAYS)}")
            if decay_steps is None or decay_steps < 1:
                raise ValueError(f"{name}: sign_decay={sign_decay!r} needs decay_steps >= 1 (its T), got "
                                 f"{decay_steps}")
            if sign_decay == "linear" and num_periods is not None:
                raise ValueError(f"{name}: num_periods does nothing for the linear decay; drop it")
        super().__init__(params, {"lr": lr, "alpha": alpha, "beta": beta, "sign_decay": sign_decay,
                                  "decay_steps": decay_steps, "num_periods": num_periods})

    @staticmethod
    def combine_(agreements: list[torch.Tensor], alpha: float, grads: list[torch.Tensor]) -> None:
        """Turn each ``agreement`` = f(t) · sign(g) · sign(m) into the update of its gradient, in place."""
        raise NotImplementedError

    @torch.no_grad()
    def step(self, closure: Any = None) -> torch.Tensor | None:
        """One update of every parameter with a gradient; ``closure`` re-evaluates the loss (returned).

        The parameters of a group that share a step count (all of them, unless some went without a
        gradient) are updated together by ``torch._foreach_*`` operations, in place but for the
        agreement: the same arithmetic as one tensor at a time, without a Python loop over tensors.
        """
        loss = closure_loss(closure)
        for group in self.param_groups:
            by_step: dict[int, list[torch.Tensor]] = {}
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"], state["momentum"] = 0, torch.zeros_like(p)
                by_step.setdefault(state["step"], []).append(p)
            for t, params in by_step.items():
                self._update(group, t, params)
        return loss

    def _update(self, group: dict[str, Any], t: int, params: list[torch.Tensor]) -> None:
        """Step ``params`` of ``group``, all at step count ``t``."""
        grads = [p.grad for p in params]
        momenta = [self.state[p]["momentum"] for p in params]
        torch._foreach_mul_(momenta, group["beta"])
        torch._foreach_add_(momenta, grads, alpha=1 - group["beta"])
        agreements = torch._foreach_sign(grads)
        torch._foreach_mul_(agreements, torch._foreach_sign(momenta))
        if group["sign_decay"] is not None:
            torch._foreach_mul_(agreements, sign_decay(group["sign_decay"], t, group["decay_steps"],
                                                       group["num_periods"]))
        self.combine_(agreements, group["alpha"], grads)
        torch._foreach_add_(params, agreements, alpha=-group["lr"])
        for p in params:
            self.state[p]["step"] = t + 1


class PowerSign(_SignRule):
    """PowerSign: ``θ ← θ - lr · α^{f(t) sign(g) sign(m)} · g`` (Bello et al. 2017; module docs).

    Args:
        params: parameters or parameter groups.
        lr: learning rate (TF-contrib's default 0.1; tune it).
        base: α (e).
        beta: momentum decay β (0.9).
        sign_decay: None, "linear", "cosine" or "restart".
        decay_steps: T of the decay (needed with one, refused without).
        num_periods: n of the cosine (0.5) and restart (1) decays.
    """

    def __init__(self, params: Iterable[torch.Tensor] | Iterable[dict[str, Any]], lr: float = 0.1,
                 base: float = math.e, beta: float = 0.9, sign_decay: str | None = None, decay_steps: int | None = None,
                 num_periods: float | None = None) -> None:
        if not (math.isfinite(base) and base > 0):
            raise ValueError(f"PowerSign: base must be a finite number > 0, got {base}")
        super().__init__(params, lr, base, beta, sign_decay, decay_steps, num_periods)

    @staticmethod
    def combine_(agreements: list[torch.Tensor], alpha: float, grads: list[torch.Tensor]) -> None:
        torch._foreach_mul_(agreements, math.log(alpha))
        torch._foreach_exp_(agreements)
        torch._foreach_mul_(agreements, grads)


class AddSign(_SignRule):
    """AddSign: ``θ ← θ - lr · (α + f(t) sign(g) sign(m)) · g`` (Bello et al. 2017; module docs).

    Args:
        params: parameters or parameter groups.
        lr: learning rate (TF-contrib's default 0.1; tune it).
        alpha: α (1).
        beta: momentum decay β (0.9).
        sign_decay: None, "linear", "cosine" or "restart".
        decay_steps: T of the decay (needed with one, refused without).
        num_periods: n of the cosine (0.5) and restart (1) decays.
    """

    def __init__(self, params: Iterable[torch.Tensor] | Iterable[dict[str, Any]], lr: float = 0.1,
                 alpha: float = 1.0, beta: float = 0.9, sign_decay: str | None = None, decay_steps: int | None = None,
                 num_periods: float | None = None) -> None:
        if not math.isfinite(alpha):
            raise ValueError(f"AddSign: alpha must be a finite number, got {alpha}")
        super().__init__(params, lr, alpha, beta, sign_decay, decay_steps, num_periods)

    @staticmethod
    def combine_(agreements: list[torch.Tensor], alpha: float, grads: list[torch.Tensor]) -> None:
        torch._foreach_add_(agreements, alpha)
        torch._foreach_mul_(agreements, grads)
