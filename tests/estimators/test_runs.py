"""Run layout and loss guard (metaopt/estimators/runs.py) in the three truncated estimators: log-uniform lengths in
[min_horizon, horizon] drawn from (seed, task, run), a random first-run offset the rule's step counter starts at,
runs that end at their own length (PES straddling into the next run), exact resume, the loss clip against torch.clamp,
and bit-identical estimates when the options are off or inert."""

from __future__ import annotations

import io
import math
import statistics
from typing import Any

import pytest
import torch

from metaopt.datasets.quadratics import Quadratic, Quadratics
from metaopt.engine.optimizer_learner import OptimizerLearner
from metaopt.engine.rules import LearnedRates, StepInfo
from metaopt.estimators import PES, TruncatedBackprop, TruncatedES, perturbation
from metaopt.estimators.es import perturbed_truncation
from metaopt.estimators.runs import InnerRuns
from metaopt.problems.optimizees import Optimizee, OptimizeeStream

ESTIMATORS = [TruncatedBackprop, TruncatedES, PES]


class Steps(LearnedRates):
    """SGD with one learned step size that records the step counter of every update it takes."""

    def __init__(self, rate: float = 0.01, dtype: torch.dtype = torch.float32) -> None:
        super().__init__({"theta": torch.tensor(rate, dtype=dtype)}, per_step=False)
        self.seen: list[int] = []

    def step(self, params: dict, grads: dict, state: Any, info: StepInfo) -> tuple[dict, Any]:
        self.seen.append(info.t)
        return super().step(params, grads, state, info)


class NaNQuadratics(Quadratics):
    """Quadratics that start at NaN: every loss is NaN."""

    def sample(self, seed: int) -> Quadratic:
        problem = super().sample(seed)
        return Quadratic(problem.w, problem.y, torch.full_like(problem.theta0, math.nan))


class Scored(Quadratic):
    """A quadratic whose outer loss is scored apart from the inner loss (as the MLP tasks' is)."""

    outer_is_inner = False


class ScoredQuadratics(Quadratics):
    def sample(self, seed: int) -> Quadratic:
        problem = super().sample(seed)
        return Scored(problem.w, problem.y, problem.theta0)


class Recorded:
    """A problem source that records which problems were read."""

    def __init__(self, family: Quadratics) -> None:
        self.stream, self.read = OptimizeeStream(family, first=0), []

    def batch(self, index: int) -> Optimizee:
        self.read.append(index)
        return self.stream.batch(index)


def learner_of(horizon: int, rate: float = 0.01, dtype: torch.dtype = torch.float32) -> OptimizerLearner:
    return OptimizerLearner(Steps(rate, dtype), horizon=horizon)


def build(estimator: type, **kwargs: Any) -> Any:
    """``estimator`` with ``kwargs``; ES and PES get two pairs unless told (truncated backprop takes neither)."""
    if estimator is TruncatedBackprop:
        return estimator(**{k: v for k, v in kwargs.items() if k not in ("pairs", "tasks")})
    return estimator(**{"pairs": 2, **kwargs})


def live(estimator: Any, task: int = 0) -> dict[str, Any] | None:
    state = estimator.state_dict()
    return state["carried"] if "carried" in state else state["runs"][task]


def schedule(runs: InnerRuns, seed: int, task: int, horizon: int, truncation: int, calls: int,
             straddle: bool) -> list[list[tuple[int, int, int]]]:
    """Per call, the segments ``(run, first step, steps)`` of a task: cut at each run's length, or (PES) continued."""
    out, run = [], 0
    step, length = runs.begin(horizon, seed, task, run)
    for _ in range(calls):
        segments, remaining = [], truncation
        while remaining:
            n = min(remaining, length - step)
            segments.append((run, step, n))
            step += n
            remaining = remaining - n if straddle else 0
            if step == length:
                run += 1
                step, length = runs.begin(horizon, seed, task, run)
        out.append(segments)
    return out


# ------------------------------------------------------------------------------------------------ the draws


def test_lengths_lie_in_the_range_and_are_log_uniform() -> None:
    """2000 draws in [50, 500]: quartiles at 50·10^(k/4) (about 89, 158, 281), not a uniform draw's 163, 275, 388."""
    runs = InnerRuns(min_horizon=50)
    lengths = [runs.begin(500, 0, task, run)[1] for task in range(4) for run in range(500)]
    assert all(isinstance(n, int) and 50 <= n <= 500 for n in lengths) and min(lengths) == 50
    quartiles = statistics.quantiles(lengths, n=4)
    for measured, expected in zip(quartiles, (50 * 10 ** (k / 4) for k in (1, 2, 3))):
        assert abs(measured / expected - 1) < 0.1, (quartiles, expected)


def test_draws_are_a_pure_function_of_seed_task_and_run() -> None:
    runs = InnerRuns(min_horizon=10, random_offset=True)
    first = runs.begin(1000, 3, 2, 0)
    torch.manual_seed(123)  # the global generator plays no part
    torch.rand(5)
    assert [runs.begin(1000, 3, 2, 0) for _ in range(2)] == [first, first]
    assert len({runs.begin(1000, 3, task, 0) for task in range(8)}) == 8  # tasks differ
    assert len({runs.begin(1000, seed, 2, 0) for seed in range(8)}) == 8  # seeds differ
    assert len({runs.begin(1000, 3, 2, run)[1] for run in range(8)}) > 1  # each run draws its own length


def test_only_a_tasks_first_run_is_offset_uniformly_within_its_length() -> None:
    runs = InnerRuns(random_offset=True)
    firsts = [runs.begin(200, 0, task, 0) for task in range(400)]
    assert all(length == 200 and 0 <= step < 200 for step, length in firsts)
    assert abs(statistics.mean(200 - step for step, _ in firsts) / 200 - 0.5) < 0.05  # remaining steps ~ U[1, 200]
    assert all(runs.begin(200, 0, task, run)[0] == 0 for task in range(20) for run in range(1, 4))
    sampled = InnerRuns(min_horizon=5, random_offset=True)
    assert all(step < length for step, length in (sampled.begin(9, 0, task, 0) for task in range(50)))


def test_the_defaults_draw_nothing_and_clip_nothing() -> None:
    runs = InnerRuns()
    assert not runs.sampled and runs.begin(100, 5, 3, 7) == (0, 100)
    losses = torch.tensor([1.0, math.nan, math.inf])
    clipped, marked = runs.clip(losses)
    assert clipped is losses and not marked.any() and marked.shape == (3,)
    assert runs.settings() == {} and runs.metrics(0) == {}
    assert InnerRuns(min_horizon=100).begin(100, 0, 0, 0) == (0, 100)  # a range of one length


def test_the_clip_is_torch_clamp_with_nan_and_inf_at_the_maximum() -> None:
    losses = torch.tensor([1.0, 3.0, 5.0, math.nan, math.inf, -1.0], requires_grad=True)
    clipped, marked = InnerRuns(max_loss=3.0).clip(losses)
    assert clipped.tolist() == [1.0, 3.0, 3.0, 3.0, 3.0, -1.0]
    assert marked.tolist() == [False, True, True, True, True, False]  # from the maximum on, as clamp's gradient
    clipped.sum().backward()
    assert losses.grad.tolist() == [1.0, 0.0, 0.0, 0.0, 0.0, 1.0]  # the marked steps carry no gradient
    assert InnerRuns(max_loss=3.0).metrics(2) == {"clipped_losses": 2.0}


def test_bad_settings_name_the_problem() -> None:
    with pytest.raises(ValueError, match="min_horizon must be >= 1"):
        InnerRuns(min_horizon=0)
    with pytest.raises(ValueError, match="max_loss must be a finite number"):
        InnerRuns(max_loss=math.inf)
    with pytest.raises(ValueError, match=r"min_horizon \(10\) exceeds the learner's horizon \(5\)"):
        TruncatedBackprop(min_horizon=10).estimate(learner_of(5), OptimizeeStream(Quadratics(dim=2, batch=1), 0), 0)
    with pytest.raises(ValueError, match="seed must be >= 0"):
        TruncatedBackprop(seed=-1)
    with pytest.raises(ValueError, match="max_loss must be"):
        PES(max_loss=math.nan)


def test_settings_record_the_options_that_are_on() -> None:
    assert TruncatedBackprop(4, max_loss=3).settings() == {"truncation": 4, "max_loss": 3}  # the seed is not read
    assert TruncatedBackprop(4, min_horizon=2, random_offset=True, seed=7).settings() == {
        "truncation": 4, "seed": 7, "min_horizon": 2, "random_offset": True}
    assert TruncatedES(min_horizon=30).settings() == {"sigma": 0.01, "pairs": 8, "truncation": 20, "tasks": 1,
                                                      "seed": 0, "min_horizon": 30}
    assert PES(random_offset=True, max_loss=2.5).settings()["random_offset"] is True


# --------------------------------------------------------------------------------- runs in the estimators


@pytest.mark.parametrize("random_offset", [False, True], ids=["from step 0", "offset first run"])
@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_each_run_ends_at_its_own_length(estimator: type, random_offset: bool) -> None:
    """Horizon 9, lengths in [2, 9], truncations of 3: the rule's step counters, problems and carried states.

    Truncated backpropagation and ES cut a truncation at the end of its run; PES continues into the
    next run, through two resets in one call where the runs are short.
    """
    horizon, truncation, pairs, calls, seed = 9, 3, 2, 14, 1
    learner, problems = learner_of(horizon), Recorded(Quadratics(dim=2, batch=1))
    es = build(estimator, truncation=truncation, pairs=pairs, min_horizon=2, random_offset=random_offset, seed=seed)
    expected = schedule(es.runs, seed, 0, horizon, truncation, calls, straddle=estimator is PES)
    assert len({es.runs.begin(horizon, seed, 0, run)[1] for run in range(5)}) > 1  # lengths differ
    if random_offset:
        assert expected[0][0][1] > 0  # this seed's first run starts partway
    branches = 1 if estimator is TruncatedBackprop else 2 * pairs
    for i, segments in enumerate(expected):
        learner.rule.seen.clear()
        es.estimate(learner, problems, i)
        seen = [t for run, start, n in segments for t in list(range(start, start + n)) * branches]
        assert learner.rule.seen == seen, i
        run, start, n = segments[-1]
        length = es.runs.begin(horizon, seed, 0, run)[1]
        carried = live(es)
        assert carried is None if start + n == length else (carried["step"], carried["length"]) == (start + n, length)
    assert sorted(set(problems.read)) == list(range(expected[-1][-1][0] + 1))  # one problem per run, in order


@pytest.mark.parametrize("estimator", [TruncatedES, PES])
def test_random_offsets_make_the_tasks_step_counters_differ_at_the_first_call(estimator: type) -> None:
    horizon, truncation, tasks = 50, 2, 4
    learner, stream = learner_of(horizon), OptimizeeStream(Quadratics(dim=2, batch=1), 0)
    es = build(estimator, truncation=truncation, tasks=tasks, random_offset=True, min_horizon=10)
    es.estimate(learner, stream, 0)
    starts = [es.runs.begin(horizon, 0, task, 0)[0] for task in range(tasks)]
    assert len(set(starts)) > 1  # not in lock-step (without offsets every task starts at 0)
    seen = learner.rule.seen
    firsts = [seen[i * 2 * 2 * truncation] for i in range(tasks)]  # each task: 2 pairs x 2 branches x 2 steps
    assert firsts == starts
    lengths = [run["length"] for run in es.state_dict()["runs"]]
    assert len(set(lengths)) > 1 and all(10 <= n <= horizon for n in lengths)


def test_pes_restarts_the_accumulator_at_every_reset_inside_a_truncation() -> None:
    """ξ of the live run is the sum of the perturbations of the calls since its run began (one pair)."""
    horizon, truncation, sigma, seed, calls = 9, 3, 0.01, 2, 10
    learner, stream = learner_of(horizon), OptimizeeStream(Quadratics(dim=2, batch=1), 0)
    es = PES(sigma=sigma, pairs=1, truncation=truncation, min_horizon=2, random_offset=True, seed=seed)
    expected = schedule(es.runs, seed, 0, horizon, truncation, calls, straddle=True)
    assert any(len(segments) > 1 for segments in expected)  # some truncations straddle a reset
    name, phi = next(learner.named_parameters())
    eps = [sigma * perturbation((seed, i, 0, 0), {name: phi.detach()})[name] for i in range(calls)]
    began = {}
    for i, segments in enumerate(expected):
        for run, *_ in segments:
            began.setdefault(run, i)
        es.estimate(learner, stream, i)
        run = live(es)
        if run is not None:
            xi = torch.zeros(())
            for j in range(began[segments[-1][0]], i + 1):
                xi = xi + eps[j]
            assert torch.equal(run["particles"][0]["xi"][name], xi), i


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_sampled_runs_resume_exactly(estimator: type) -> None:
    """Lengths, offsets and clipped losses continue bit for bit from a saved state (two tasks for ES and PES)."""
    learner, stream = learner_of(8), OptimizeeStream(Quadratics(dim=3, batch=2), first=0)
    settings = {"truncation": 2, "tasks": 2, "min_horizon": 2, "random_offset": True, "max_loss": 20.0}

    def grads() -> list[torch.Tensor]:
        return [p.grad.clone() for p in learner.parameters()]

    whole, history = build(estimator, **settings), []
    for i in range(7):
        learner.zero_grad(set_to_none=True)
        estimate = whole.estimate(learner, stream, i)
        history.append((estimate.loss, estimate.metrics, grads()))
    cut = build(estimator, **settings)
    for i in range(3):
        cut.estimate(learner, stream, i)
    buffer = io.BytesIO()
    torch.save(cut.state_dict(), buffer)
    buffer.seek(0)
    resumed = build(estimator, **settings)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    for i in range(3, 7):
        learner.zero_grad(set_to_none=True)
        estimate = resumed.estimate(learner, stream, i)
        assert (estimate.loss, estimate.metrics) == history[i][:2]
        assert all(torch.equal(a, b) for a, b in zip(grads(), history[i][2]))
    assert resumed.state_dict()["started"] == whole.state_dict()["started"]
    if estimator is not TruncatedBackprop:
        assert resumed.state_dict()["task_runs"] == whole.state_dict()["task_runs"]


def test_a_state_saved_before_lengths_were_drawn_continues_at_the_horizon() -> None:
    learner, stream = learner_of(6), OptimizeeStream(Quadratics(dim=3, batch=2), first=0)
    for estimator in ESTIMATORS:
        es = build(estimator, truncation=2)
        es.estimate(learner, stream, 0)
        old = es.state_dict()
        old.pop("task_runs", None)
        (old["carried"] if "carried" in old else old["runs"][0]).pop("length")
        resumed = build(estimator, truncation=2)
        resumed.load_state_dict(old)
        for i in (1, 2):
            resumed.estimate(learner, stream, i)
        assert live(resumed) is None, estimator  # steps 2-4 and 4-6: the run ended at the horizon


# ------------------------------------------------------------------------------------------- the loss clip


@pytest.mark.parametrize("family", [Quadratics, ScoredQuadratics], ids=["outer is inner", "scored apart"])
def test_truncated_backprop_clips_the_meta_loss_as_torch_clamp_does(family: type) -> None:
    """Σ_t clamp(f(θ_t), max) over one truncation, first order, against a hand-written unroll (float64)."""
    steps, rate = 4, 0.02
    learner = learner_of(steps, rate, torch.float64)
    stream = OptimizeeStream(family(dim=3, batch=2, dtype=torch.float64), first=0)
    problem = stream.batch(0)
    losses = learner.losses(problem)[1:]
    max_loss = ((losses[1] + losses[2]) / 2).item()  # clips the first two steps (the losses fall)
    phi = torch.tensor(rate, dtype=torch.float64, requires_grad=True)
    theta, hand = problem.init_params()["theta"], []
    for t in range(steps):
        leaf = theta.detach().requires_grad_()
        (grad,) = torch.autograd.grad(problem.loss({"theta": leaf}, t), [leaf])
        theta = theta - phi * grad  # the optimizee's gradient is a constant (first order)
        hand.append(problem.loss({"theta": theta}, t + 1))
    torch.clamp(torch.stack(hand), max=max_loss).sum().backward()
    estimate = TruncatedBackprop(steps, max_loss=max_loss).estimate(learner, stream, 0)
    assert estimate.metrics["clipped_losses"] == int((losses >= max_loss).sum()) == 2
    assert estimate.loss == pytest.approx(losses.clamp(max=max_loss).mean().item(), rel=1e-12)
    clipped = next(learner.parameters()).grad
    torch.testing.assert_close(clipped, phi.grad, rtol=1e-10, atol=0)
    learner.zero_grad(set_to_none=True)
    TruncatedBackprop(steps).estimate(learner, stream, 0)
    assert abs(next(learner.parameters()).grad - clipped) > 0.1 * abs(clipped)  # the clip changed the gradient


def test_truncated_es_clips_the_per_step_losses_of_both_branches() -> None:
    sigma, seed, truncation = 0.01, 1, 3
    learner, stream = learner_of(6), OptimizeeStream(Quadratics(dim=3, batch=2), first=0)
    problem = stream.batch(0)
    phi = {name: p.detach() for name, p in learner.named_parameters()}
    z = [perturbation((seed, 0, 0, pair), phi) for pair in range(2)]
    branches = [[perturbed_truncation(learner, {k: phi[k] + s * sigma * zi[k] for k in phi}, problem,
                                      problem.init_params(), None, 0, truncation)[0] for s in (1, -1)] for zi in z]
    max_loss = torch.cat([loss for pair in branches for loss in pair]).median().item()
    expected = {k: torch.zeros_like(v) for k, v in phi.items()}
    for zi, (plus, minus) in zip(z, branches):
        delta = (plus.clamp(max=max_loss).mean() - minus.clamp(max=max_loss).mean()).item()
        for k in expected:
            expected[k] += zi[k] * (delta / (2 * sigma))
    estimate = TruncatedES(sigma=sigma, pairs=2, truncation=truncation, seed=seed, max_loss=max_loss).estimate(
        learner, stream, 0)
    n = sum(int((loss >= max_loss).sum()) for pair in branches for loss in pair)
    assert 0 < n < 4 * truncation and estimate.metrics["clipped_losses"] == n
    for name, p in learner.named_parameters():
        torch.testing.assert_close(p.grad, expected[name] / 2)


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_clipped_nan_losses_do_not_poison_the_estimate_and_end_the_run(estimator: type) -> None:
    """Every loss NaN: the clipped meta-loss is max_loss, finite, with a zero estimate, and the run still ends."""
    learner, stream = learner_of(6), OptimizeeStream(NaNQuadratics(dim=3, batch=2), first=0)
    es = build(estimator, truncation=2, pairs=3, max_loss=3.0)
    estimate = es.estimate(learner, stream, 0)
    branches = 1 if estimator is TruncatedBackprop else 2 * 3
    assert estimate.loss == 3.0 and estimate.metrics["clipped_losses"] == 2 * branches
    assert torch.equal(next(learner.parameters()).grad, torch.zeros(()))  # as torch.clamp's gradient
    if estimator is not TruncatedBackprop:
        assert estimate.metrics["nonfinite_pairs"] == 0  # no pair was dropped: their difference is 0
    assert live(es) is None  # θ diverged: the next call starts the next problem


# --------------------------------------------------------------------------------- defaults are unchanged


@pytest.mark.parametrize("inert", [{"min_horizon": 6}, {"max_loss": 1e30}], ids=["one length", "huge max"])
@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_inert_options_give_the_default_estimates_bit_for_bit(estimator: type, inert: dict) -> None:
    """A length range of one value (runs draw, all at the horizon) or a clip above every loss changes nothing."""

    def estimates(**options: Any) -> list[tuple[float, list[torch.Tensor]]]:
        torch.manual_seed(0)
        learner, stream = learner_of(6), OptimizeeStream(Quadratics(dim=3, batch=2), first=0)
        es, out = build(estimator, truncation=2, tasks=2, **options), []
        for i in range(5):
            learner.zero_grad(set_to_none=True)
            estimate = es.estimate(learner, stream, i)
            assert ("clipped_losses" in estimate.metrics) == ("max_loss" in options)
            out.append((estimate.loss, [p.grad.clone() for p in learner.parameters()]))
        return out

    for (loss, grads), (inert_loss, inert_grads) in zip(estimates(), estimates(**inert)):
        assert loss == inert_loss and all(torch.equal(a, b) for a, b in zip(grads, inert_grads))
