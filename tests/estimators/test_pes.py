"""PES (metaopt/estimators/pes.py) against the truth: unbiased for the whole unroll's gradient where truncated ES
and truncated backpropagation are biased, the accumulator ξ across truncations and resets (hand-written), exact
resume, the guards and meta-training under the one trainer."""

from __future__ import annotations

import math

import torch

from metaopt.datasets.quadratics import Quadratic, Quadratics
from metaopt.engine.optimizer_learner import OptimizerLearner
from metaopt.engine.rules import LearnedRates
from metaopt.estimators import PES, Backprop, TruncatedBackprop, TruncatedES, perturbation
from metaopt.problems.optimizees import Optimizee, OptimizeeStream
from tests.estimators.trainer_checks import assert_trains_and_resumes_exactly

RATE = 0.005  # the learned scalar step size of the unbiasedness test


def rate_learner(horizon: int, rate: float = RATE) -> OptimizerLearner:
    """SGD with one learned scalar step size, second order: its meta-gradient is the total derivative."""
    rule = LearnedRates({"theta": torch.tensor(rate, dtype=torch.float64)}, per_step=False)
    return OptimizerLearner(rule, horizon=horizon, first_order=False)


def grad_of(learner: OptimizerLearner) -> float:
    return next(learner.parameters()).grad.item()


def test_pes_is_unbiased_where_truncated_es_and_truncated_backprop_are_not() -> None:
    """SGD's step size on a 1-d quadratic, T = 8 steps in truncations of K = 2 (float64, σ = 10⁻³).

    The truth is ∇(1/T) Σ_{t=1..T} f(θ_t) by backpropagation through the whole run. One run of an
    estimator gives the mean of its T/K per-truncation estimates (the mean per-step loss of each
    truncation); truncated backpropagation's per-truncation sums are divided by T. PES over 64 seeds
    (4 pairs each) lies within its 95% interval of the truth; truncated ES (24 seeds) and truncated
    backpropagation lie far outside it, and truncated ES estimates truncated backpropagation's gradient.
    """
    horizon, truncation = 8, 2
    stream = OptimizeeStream(Quadratics(dim=1, batch=1, dtype=torch.float64), first=0)
    learner = rate_learner(horizon)
    Backprop().estimate(learner, stream, 0)
    truth = grad_of(learner) / horizon
    learner = rate_learner(horizon)
    tbptt = TruncatedBackprop(truncation)
    for i in range(horizon // truncation):
        tbptt.estimate(learner, stream, i)
    truncated = grad_of(learner) / horizon

    def runs(estimator, seeds: int) -> tuple[float, float]:
        values = []
        for seed in range(seeds):
            learner = rate_learner(horizon)
            es = estimator(sigma=1e-3, pairs=4, truncation=truncation, seed=seed)
            for i in range(horizon // truncation):
                es.estimate(learner, stream, i)
            values.append(grad_of(learner) / (horizon // truncation))
        v = torch.tensor(values, dtype=torch.float64)
        return v.mean().item(), v.std().item() / math.sqrt(seeds)

    pes, pes_se = runs(PES, 64)
    es, es_se = runs(TruncatedES, 24)
    assert abs(pes - truth) < 1.96 * pes_se, (pes, pes_se, truth)  # measured: -307 ± 21 against -314
    assert abs(es - truth) > 10 * es_se and abs(es - truth) > 0.5 * abs(truth), (es, es_se, truth)  # -105 ± 6
    assert abs(truncated - truth) > 5 * pes_se and abs(truncated - truth) > 0.5 * abs(truth)  # -110: 9.7 se
    assert abs(es - truncated) < 3 * es_se, (es, truncated)


def hand_run(problem: Optimizee, theta: torch.Tensor, rate: float, start: int, steps: int,
             ) -> tuple[float, torch.Tensor]:
    """Σ_t f(θ_t) over ``steps`` steps of θ ← θ − rate · ∇f(θ) from step ``start``, and the last θ."""
    total = 0.0
    for t in range(start, start + steps):
        leaf = theta.detach().requires_grad_()
        (grad,) = torch.autograd.grad(problem.loss({"theta": leaf}, t), [leaf])
        theta = (theta - rate * grad).detach()
        total += problem.loss({"theta": theta}, t + 1).item()
    return total, theta


def test_the_accumulator_spans_truncations_and_restarts_at_a_reset() -> None:
    """Horizon 3 in truncations of 2, one pair, written out by hand.

    Call 0: steps 0-2 of problem 0, credited to ε₀. Call 1 straddles the reset: step 2-3 of problem 0
    is credited to ξ = ε₀ + ε₁, step 0-1 of problem 1 to ε₁ alone, and ξ restarts at ε₁. Call 2: steps
    1-3 of problem 1, credited to ε₁ + ε₂; the run ends with the truncation, so call 3 starts problem 2
    with ξ = 0 (credited to ε₃ alone).
    """
    sigma, truncation, rate = 0.01, 2, 0.02
    learner, stream = rate_learner(3, rate), OptimizeeStream(Quadratics(dim=2, batch=1, dtype=torch.float64), 0)
    estimator = PES(sigma=sigma, pairs=1, truncation=truncation, seed=5)
    name, phi = next(learner.named_parameters())
    eps = [sigma * perturbation((5, i, 0, 0), {name: phi.detach()})[name].item() for i in range(4)]
    thetas = {s: stream.batch(0).init_params()["theta"] for s in (1, -1)}

    def credit(problem_index: int, start: int, steps: int, rate_eps: float, fresh: bool) -> float:
        """(S⁺ − S⁻)/K of one segment of both branches, which carry their θ on."""
        delta = 0.0
        for s in (1, -1):
            theta = stream.batch(problem_index).init_params()["theta"] if fresh else thetas[s]
            total, thetas[s] = hand_run(stream.batch(problem_index), theta, rate + s * rate_eps, start, steps)
            delta += s * total / truncation
        return delta

    expected = [eps[0] * credit(0, 0, 2, eps[0], fresh=True)]
    before = credit(0, 2, 1, eps[1], fresh=False)
    expected.append((eps[0] + eps[1]) * before + eps[1] * credit(1, 0, 1, eps[1], fresh=True))
    expected.append((eps[1] + eps[2]) * credit(1, 1, 2, eps[2], fresh=False))
    expected.append(eps[3] * credit(2, 0, 2, eps[3], fresh=True))
    for i in range(4):
        learner.zero_grad(set_to_none=True)
        estimator.estimate(learner, stream, i)
        assert math.isclose(grad_of(learner), expected[i] / (2 * sigma**2), rel_tol=1e-9), i
        run = estimator.state_dict()["runs"][0]
        if i == 1:
            assert (run["problem"], run["step"]) == (1, 1)
            assert math.isclose(run["particles"][0]["xi"][name].item(), eps[1], rel_tol=1e-12)
        if i == 2:
            assert run is None and estimator.started == 2


def test_each_pair_keeps_its_own_plus_and_minus_states() -> None:
    learner = rate_learner(6, rate=0.02)
    stream = OptimizeeStream(Quadratics(dim=3, batch=2, dtype=torch.float64), first=0)
    estimator = PES(pairs=2, truncation=2)
    estimator.estimate(learner, stream, 0)
    particles = estimator.state_dict()["runs"][0]["particles"]
    thetas = [particles[i][b]["params"]["theta"] for i in range(2) for b in ("plus", "minus")]
    assert all(not torch.equal(thetas[i], thetas[j]) for i in range(4) for j in range(i))
    assert sorted(particles[0]) == ["minus", "plus", "xi"]


def test_settings_are_recorded() -> None:
    """The resume test of both estimators is in test_es.py (their state is the shared base's)."""
    assert PES().settings() == {"sigma": 0.01, "pairs": 8, "truncation": 10, "tasks": 1, "seed": 0}


class NaNQuadratics(Quadratics):
    """Quadratics that start at NaN: every loss is NaN."""

    def sample(self, seed: int) -> Quadratic:
        problem = super().sample(seed)
        return Quadratic(problem.w, problem.y, torch.full_like(problem.theta0, math.nan))


def test_non_finite_pairs_add_nothing_are_counted_and_end_the_run() -> None:
    learner = rate_learner(4)
    estimator = PES(pairs=3, truncation=2)
    estimate = estimator.estimate(learner, OptimizeeStream(NaNQuadratics(dim=3, batch=2), first=0), 0)
    assert math.isnan(estimate.loss) and estimate.metrics["nonfinite_pairs"] == 3
    assert estimate.metrics["zeroed_grads"] == 0 and grad_of(learner) == 0
    assert estimator.state_dict() == {"started": 1, "runs": [None], "task_runs": [1]}


def test_the_trainer_meta_trains_with_pes_and_resumes_exactly(tmp_path) -> None:
    assert_trains_and_resumes_exactly(tmp_path, lambda: PES(pairs=2, truncation=3), started=5)
