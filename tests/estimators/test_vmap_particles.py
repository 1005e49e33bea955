"""Particles batched with torch.func.vmap (metaopt/estimators/es.py, ``vmap=True``): the same estimates, metrics and
carried states as the loop for TruncatedES and PES (float64 to 1e-10 with learned rates and the MLP optimizer,
float32 to 1e-5 with the hierarchical optimizer), across run ends and PES resets, drawn lengths, offsets and the loss
clip; errors that name the fix for what vmap cannot run; the option and its settings; exact resume."""

from __future__ import annotations

import io
import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch.utils import _pytree as pytree

from metaopt.algorithms.mlp_lopt import MLPLOptRule
from metaopt.algorithms.rnn_mlp_lopt import RNNMLPLOptRule
from metaopt.datasets.quadratics import Quadratic, Quadratics
from metaopt.engine.optimizer_learner import OptimizerLearner
from metaopt.engine.rules import LearnedRates, StepInfo
from metaopt.estimators import PES, TruncatedES
from metaopt.estimators.es import particle_truncations
from metaopt.estimators.unroll_options import UnrollOptions, estimator_of
from metaopt.options import ConfigError
from metaopt.problems.optimizees import OptimizeeStream, optimizee_stream
from metaopt.training.checkpoint import CheckpointError
from metaopt.training.config import TrainerConfig
from metaopt.training.trainer import MetaTrainer

F64 = torch.float64


def rates(dtype: torch.dtype = F64) -> LearnedRates:
    """SGD with one learned step size per problem tensor."""
    return LearnedRates({"theta": torch.tensor(0.02, dtype=dtype)}, per_step=False)


def mlp_lopt() -> MLPLOptRule:
    return MLPLOptRule(hidden_size=8, generator=torch.Generator().manual_seed(0)).to(F64)


def rnn_mlp_lopt(validation_every: int = 0) -> RNNMLPLOptRule:
    return RNNMLPLOptRule(hidden_size=8, lstm_hidden=8, validation_every=validation_every,
                          generator=torch.Generator().manual_seed(0))


def run(family: type, make_rule: Callable[[], Any], stream: Any, calls: int, horizon: int, vmap: bool,
        **kwargs: Any) -> tuple[list[tuple[float, dict[str, float], list[torch.Tensor]]], dict[str, Any]]:
    """``calls`` estimates of a fresh learner: (loss, metrics, meta-gradients) of each, and the final state."""
    learner = OptimizerLearner(make_rule(), horizon=horizon)
    estimator = family(vmap=vmap, **kwargs)
    history = []
    for i in range(calls):
        learner.zero_grad(set_to_none=True)
        estimate = estimator.estimate(learner, stream, i)
        history.append((estimate.loss, estimate.metrics, [p.grad.clone() for p in learner.parameters()]))
    return history, estimator.state_dict()


def assert_trees_close(a: Any, b: Any, rtol: float, atol: float) -> None:
    """Same structure, tensors close, everything else equal (None runs, counters, steps)."""
    leaves_a, spec_a = pytree.tree_flatten(a)
    leaves_b, spec_b = pytree.tree_flatten(b)
    assert spec_a == spec_b
    for x, y in zip(leaves_a, leaves_b):
        if isinstance(x, torch.Tensor):
            assert x.dtype == y.dtype and x.shape == y.shape
            torch.testing.assert_close(x, y, rtol=rtol, atol=atol)
        else:
            assert x == y


def assert_loop_equals_vmap(family: type, make_rule: Callable[[], Any], stream: Any, calls: int, horizon: int,
                            rtol: float, atol: float, **kwargs: Any) -> list:
    loop, loop_state = run(family, make_rule, stream, calls, horizon, vmap=False, **kwargs)
    batched, batched_state = run(family, make_rule, stream, calls, horizon, vmap=True, **kwargs)
    for (loss_a, metrics_a, grads_a), (loss_b, metrics_b, grads_b) in zip(loop, batched):
        assert math.isclose(loss_a, loss_b, rel_tol=rtol), (loss_a, loss_b)
        assert metrics_a.keys() == metrics_b.keys()
        for name in metrics_a:
            assert math.isclose(metrics_a[name], metrics_b[name], rel_tol=rtol), name
        for a, b in zip(grads_a, grads_b):
            torch.testing.assert_close(a, b, rtol=rtol, atol=atol)
    assert_trees_close(loop_state, batched_state, rtol, atol)
    assert any(bool(g.abs().sum() > 0) for _, _, grads in loop for g in grads)  # an estimate that says something
    return loop


def quadratics(dtype: torch.dtype = F64) -> OptimizeeStream:
    return OptimizeeStream(Quadratics(dim=3, batch=2, dtype=dtype), first=0)


CASES = {  # (family, options, horizon, calls)
    "es across a run end, two tasks": (TruncatedES, {"pairs": 3, "truncation": 2, "tasks": 2}, 5, 4),
    "es drawn lengths, offsets, clipped": (TruncatedES, {"pairs": 2, "truncation": 2, "tasks": 2, "min_horizon": 2,
                                                         "random_offset": True, "max_loss": 20.0}, 6, 5),
    "pes straddling resets, two tasks": (PES, {"pairs": 3, "truncation": 2, "tasks": 2}, 3, 4),
    "pes drawn lengths, offsets, clipped": (PES, {"pairs": 2, "truncation": 2, "tasks": 2, "min_horizon": 2,
                                                  "random_offset": True, "max_loss": 20.0}, 6, 5),
}


@pytest.mark.parametrize("rule", [rates, mlp_lopt], ids=["learned-rates", "mlp-lopt"])
@pytest.mark.parametrize("case", CASES)
def test_vmap_gives_the_loops_estimates_and_carried_states_in_float64(case: str, rule: Callable) -> None:
    family, options, horizon, calls = CASES[case]
    loop = assert_loop_equals_vmap(family, rule, quadratics(), calls, horizon, rtol=1e-10, atol=1e-13, **options)
    if "max_loss" in options:  # the clip bites on some steps (problems above 20 at the start), not on all
        clipped = sum(metrics["clipped_losses"] for _, metrics, _ in loop)
        assert 0 < clipped < calls * 2 * 2 * options["pairs"] * options["truncation"], clipped


def test_a_pes_truncation_straddling_a_reset_is_one_vmap_call_per_run(monkeypatch) -> None:
    """Horizon 3 in truncations of 2: the second call runs the end of problem 0, then the start of problem 1."""
    import metaopt.estimators.es as es

    calls = []
    original = torch.func.vmap

    def counting(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(es.torch.func, "vmap", counting)
    learner, estimator = OptimizerLearner(rates(), horizon=3), PES(pairs=4, truncation=2, vmap=True)
    estimator.estimate(learner, quadratics(), 0)
    assert len(calls) == 1
    estimator.estimate(learner, quadratics(), 1)
    assert len(calls) == 3 and estimator.state_dict()["runs"][0]["problem"] == 1


class CPUQuadratic(Quadratic):
    """A quadratic that stays of its class when the estimator moves it to the learner's device (the CPU)."""

    def to(self, device: torch.device | str) -> Quadratic:
        assert torch.device(device).type == "cpu"
        return self


class Validated(CPUQuadratic):
    """A quadratic with a validation loss (half the training loss), for rules that read one."""

    validations = 0  # calls of validation_loss, so that a test knows they happen

    def validation_loss(self, params: dict[str, torch.Tensor], step: int) -> torch.Tensor:
        Validated.validations += 1
        return 0.5 * self.loss(params, step)


class ValidatedQuadratics(Quadratics):
    def sample(self, seed: int) -> Quadratic:
        problem = super().sample(seed)
        return Validated(problem.w, problem.y, problem.theta0)


@pytest.mark.parametrize("family", [TruncatedES, PES])
@pytest.mark.parametrize("validation_every", [0, 1])
def test_the_hierarchical_optimizer_matches_in_float32(family: type, validation_every: int) -> None:
    """Its state holds a learned initial state (per particle: computed outside vmap) and reads validation losses."""
    stream = OptimizeeStream(ValidatedQuadratics(dim=2, batch=2), first=0)
    before = Validated.validations
    assert_loop_equals_vmap(family, lambda: rnn_mlp_lopt(validation_every), stream, 3, 4, rtol=1e-5, atol=1e-6,
                            sigma=0.1, pairs=2, truncation=3)
    assert (Validated.validations > before) == bool(validation_every)


def test_particles_from_their_own_states_match_the_loop_one_by_one_in_float32() -> None:
    """Stacked θ and states (PES's case) and a shared θ with fresh per-particle states (ES's), particle by particle."""
    learner = OptimizerLearner(rnn_mlp_lopt(validation_every=2), horizon=10)
    problem = ValidatedQuadratics(dim=2, batch=3).sample(0)
    phi = {k: p.detach() for k, p in learner.named_parameters()}
    g = torch.Generator().manual_seed(0)
    phis = [{k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in phi.items()} for _ in range(3)]
    fresh = [(problem.init_params(), None)] * 3
    firsts = particle_truncations(learner, phis, problem, fresh, 0, 2)
    assert firsts[0].state["valid_loss"][2] == 1  # one validation loss read (after step 2)
    for starts in (fresh, [(p.params, p.state) for p in firsts]):
        loop = particle_truncations(learner, phis, problem, starts, 2, 3)
        batched = particle_truncations(learner, phis, problem, starts, 2, 3, vmap=True)
        assert_trees_close([(p.losses, p.params, p.state) for p in loop],
                           [(p.losses, p.params, p.state) for p in batched], rtol=1e-5, atol=1e-6)
        assert not torch.equal(loop[0].losses, loop[1].losses)  # the particles differ: their order is checked
        assert all(p.losses.shape == (3,) and p.params["theta"].shape == (3, 2) for p in batched)
        # each particle owns its tensors: a carried state does not keep the stacked batch alive
        leaves = [t for p in batched for t in pytree.tree_leaves((p.params, p.state))]
        assert len({t.untyped_storage().data_ptr() for t in leaves}) == len(leaves)


class ItemRates(LearnedRates):
    """Learned rates read as a Python number: fine in a loop, not under vmap."""

    def step(self, params: dict, grads: dict, state: Any, info: StepInfo) -> tuple[dict, Any]:
        rate = self.rate("theta", info.t).item()
        return {name: p - rate * grads[name] for name, p in params.items()}, state


class BranchingQuadratic(CPUQuadratic):
    """A loss with Python control flow on a tensor's value."""

    def loss(self, params: dict[str, torch.Tensor], step: int) -> torch.Tensor:
        loss = super().loss(params, step)
        return loss if loss > 0 else -loss


class Branching:
    def batch(self, index: int) -> Quadratic:
        problem = Quadratics(dim=3, batch=2, dtype=F64).sample(index)
        return BranchingQuadratic(problem.w, problem.y, problem.theta0)


@pytest.mark.parametrize("family", [TruncatedES, PES])
@pytest.mark.parametrize("rule, stream, culprit", [
    (lambda: ItemRates({"theta": torch.tensor(0.02, dtype=F64)}, per_step=False), quadratics(), "item"),
    (rates, Branching(), "data-dependent control flow"),
], ids=["item-in-the-rule", "control-flow-in-the-problem"])
def test_what_vmap_cannot_run_is_an_error_that_names_the_fix(family: type, rule: Callable, stream: Any,
                                                             culprit: str) -> None:
    run(family, rule, stream, 1, 4, vmap=False, pairs=2, truncation=2)  # the loop runs them
    with pytest.raises(RuntimeError, match="could not be batched with torch.func.vmap") as caught:
        run(family, rule, stream, 1, 4, vmap=True, pairs=2, truncation=2)
    message = str(caught.value)
    assert culprit in message and "vmap=False" in message and "vmap_particles=False" in message
    assert type(caught.value.__cause__) is RuntimeError  # the original error is chained


def test_the_option_builds_batched_estimators_and_is_recorded_only_when_on() -> None:
    for estimator, family in (("es", TruncatedES), ("pes", PES)):
        built = estimator_of(UnrollOptions(estimator=estimator, truncation=4, vmap_particles=True))
        assert isinstance(built, family) and built.vmap and built.settings()["vmap"] is True
        plain = estimator_of(UnrollOptions(estimator=estimator, truncation=4))
        assert not plain.vmap and "vmap" not in plain.settings()  # the settings of earlier runs still match
        assert {k: v for k, v in built.settings().items() if k != "vmap"} == plain.settings()
    assert TruncatedES().settings() == {"sigma": 0.01, "pairs": 8, "truncation": 20, "tasks": 1, "seed": 0}


@pytest.mark.parametrize("options, message", [
    ({"vmap_particles": True}, "option 'vmap_particles' belongs to the ES and PES estimators; it does nothing with "
                               "estimator='backprop': drop it, or pass estimator='es' or 'pes'"),
    ({"estimator": "es", "vmap_particles": 1}, "option 'vmap_particles' must be bool"),
])
def test_bad_option_values_are_config_errors(options: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        UnrollOptions(**options)


def test_a_non_bool_vmap_is_refused() -> None:
    with pytest.raises(ValueError, match="vmap must be True or False"):
        PES(vmap="yes")


@pytest.mark.parametrize("family", [TruncatedES, PES])
def test_a_batched_estimator_resumes_exactly_and_takes_over_a_loops_state(family: type) -> None:
    learner = OptimizerLearner(mlp_lopt(), horizon=5)
    options = {"pairs": 2, "truncation": 2, "tasks": 2}

    def grads() -> list[torch.Tensor]:
        return [p.grad.clone() for p in learner.parameters()]

    whole, history = family(vmap=True, **options), []
    for i in range(5):
        learner.zero_grad(set_to_none=True)
        history.append((whole.estimate(learner, quadratics(), i).loss, grads()))
    for cut_vmap, exact in ((True, True), (False, False)):
        cut = family(vmap=cut_vmap, **options)
        for i in range(2):
            cut.estimate(learner, quadratics(), i)
        buffer = io.BytesIO()
        torch.save(cut.state_dict(), buffer)
        buffer.seek(0)
        resumed = family(vmap=True, **options)
        resumed.load_state_dict(torch.load(buffer, weights_only=True))
        for i in range(2, 5):
            learner.zero_grad(set_to_none=True)
            loss = resumed.estimate(learner, quadratics(), i).loss
            if exact:  # a batched run resumed batched: bit for bit
                assert loss == history[i][0] and all(torch.equal(a, b) for a, b in zip(grads(), history[i][1]))
            else:  # a loop's state continued batched: to rounding error
                assert math.isclose(loss, history[i][0], rel_tol=1e-10)
                for a, b in zip(grads(), history[i][1]):
                    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13)
        assert_trees_close(resumed.state_dict(), whole.state_dict(), rtol=1e-10, atol=1e-13)


def test_the_trainer_records_vmap_and_resumes_only_with_it(tmp_path) -> None:
    family = Quadratics(dim=3, batch=2)

    def trainer(iterations: int, vmap: bool) -> MetaTrainer:
        torch.manual_seed(0)
        config = TrainerConfig(iterations=iterations, meta_lr=0.003, eval_every=3, eval_episodes=1,
                               checkpoint_every=3, log_every=3)
        learner = OptimizerLearner(rates(torch.float32), horizon=4)
        return MetaTrainer(learner, optimizee_stream(family, "train", 0), config,
                           estimator=PES(pairs=2, truncation=3, vmap=vmap),
                           val_problems=optimizee_stream(family, "val", 0), run_dir=tmp_path)

    trainer(3, vmap=True).fit()
    with pytest.raises(CheckpointError, match="'vmap': True"):
        trainer(6, vmap=False).fit(resume=True)
    assert trainer(6, vmap=True).fit(resume=True)["iteration"] == 6
