"""Nonlinear conjugate gradient (metaopt/evaluation/conjugate_gradient.py): n steps on an n-d quadratic with the
exact (interpolating) line search, convergence with plain backtracking, PR+ restarts, errors."""

from __future__ import annotations

import copy
import re

import numpy as np
import pytest
import torch

from metaopt.evaluation.conjugate_gradient import ConjugateGradient


def quadratic(n: int, condition: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """An SPD ``A`` (eigenvalues log-spaced in [1, condition], random rotation) and ``b``, float64."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    eigenvalues = torch.logspace(0, np.log10(condition), n, dtype=torch.float64)
    return (q * eigenvalues) @ q.T, torch.randn(n, generator=g, dtype=torch.float64)


def minimise(a: torch.Tensor, b: torch.Tensor, iterations: int, **kwargs: object) -> tuple[torch.Tensor, list[float]]:
    """``iterations`` CG steps on ½xᵀAx − bᵀx from 0; the final x and the loss before every step."""
    x = torch.zeros(len(b), dtype=torch.float64, requires_grad=True)
    opt = ConjugateGradient([x], **kwargs)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = 0.5 * x @ a @ x - b @ x
        loss.backward()
        return loss

    losses = [float(opt.step(closure).detach()) for _ in range(iterations)]
    return x.detach(), losses


@pytest.mark.parametrize("n", [2, 5, 12])
def test_the_exact_line_search_solves_an_n_dimensional_quadratic_in_n_steps(n: int) -> None:
    """Quadratic interpolation is the exact line search on a quadratic, and CG with exact line searches (PR = FR =
    linear CG there) reaches the minimiser in at most n iterations (Nocedal & Wright, Theorem 5.2)."""
    a, b = quadratic(n, condition=100.0, seed=n)
    solution = torch.linalg.solve(a, b)
    x, _ = minimise(a, b, n)
    torch.testing.assert_close(x, solution, rtol=0, atol=1e-6)  # to rounding (2e-8 at n = 12)
    x, _ = minimise(a, b, n - 1)  # and it does need them: one fewer leaves an error
    assert (x - solution).abs().max() > 1e-4


def test_backtracking_armijo_converges_to_the_minimiser() -> None:
    a, b = quadratic(10, condition=50.0, seed=0)
    solution = torch.linalg.solve(a, b)
    x, losses = minimise(a, b, 200, line_search="backtracking")
    torch.testing.assert_close(x, solution, rtol=0, atol=1e-6)
    assert all(later <= earlier + 1e-12 for earlier, later in zip(losses, losses[1:]))  # Armijo: never uphill


def test_it_descends_a_nonconvex_function_and_counts_iterations_and_evaluations() -> None:
    """Rosenbrock from (-1.2, 1) (N&W's test): no iteration goes uphill; one step() is one iteration."""
    x = torch.tensor([-1.2, 1.0], dtype=torch.float64, requires_grad=True)
    opt = ConjugateGradient([x])
    calls = 0

    def closure() -> torch.Tensor:
        nonlocal calls
        calls += 1
        opt.zero_grad()
        loss = 100 * (x[1] - x[0] ** 2) ** 2 + (1 - x[0]) ** 2
        loss.backward()
        return loss

    losses = [float(opt.step(closure).detach()) for _ in range(150)]
    assert all(later <= earlier for earlier, later in zip(losses, losses[1:]))
    assert losses[-1] < 1e-10  # the minimum is 0, at (1, 1)
    state = opt.state[x]
    assert state["n_iter"] == 150 and state["func_evals"] == calls > 150


def test_state_dict_round_trip_continues_identically() -> None:
    a, b = quadratic(6, condition=30.0, seed=3)

    def run(x: torch.Tensor, opt: ConjugateGradient, steps: int) -> None:
        def closure() -> torch.Tensor:
            opt.zero_grad()
            loss = 0.5 * x @ a @ x - b @ x
            loss.backward()
            return loss

        for _ in range(steps):
            opt.step(closure)

    x = torch.zeros(6, dtype=torch.float64, requires_grad=True)
    opt = ConjugateGradient([x], line_search="backtracking")
    run(x, opt, 2)
    saved, start = copy.deepcopy(opt.state_dict()), x.detach().clone()  # state_dict() holds the live state
    run(x, opt, 2)
    y = start.clone().requires_grad_()
    resumed = ConjugateGradient([y], line_search="backtracking")
    resumed.load_state_dict(saved)
    run(y, resumed, 2)
    assert torch.equal(x, y)


def test_step_without_a_closure_is_an_error_naming_the_fix() -> None:
    x = torch.zeros(2, requires_grad=True)
    x.sum().backward()
    with pytest.raises(ValueError, match=re.escape("ConjugateGradient needs a closure (its line search re-evaluates "
                                                   "the loss): opt.step(closure)")):
        ConjugateGradient([x]).step()


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"lr": 0.0}, "lr (the first trial step) must be a finite number > 0, got 0.0"),
    ({"lr": float("nan")}, "must be a finite number > 0, got nan"),
    ({"line_search": "wolfe"}, "unknown line_search 'wolfe'; choose one of ('interpolation', 'backtracking')"),
    ({"c1": 1.0}, "Armijo's constant c1 must be in (0, 1), got 1.0"),
    ({"max_evals": 0}, "max_evals must be an integer >= 1, got 0"),
    ({"tolerance_grad": -1.0}, "tolerance_grad must be >= 0, got -1.0"),
])
def test_bad_arguments_are_named(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        ConjugateGradient([torch.zeros(2, requires_grad=True)], **kwargs)


def test_several_parameter_groups_are_refused() -> None:
    with pytest.raises(ValueError, match="takes one parameter group"):
        ConjugateGradient([{"params": [torch.zeros(1, requires_grad=True)]},
                           {"params": [torch.zeros(1, requires_grad=True)]}])
