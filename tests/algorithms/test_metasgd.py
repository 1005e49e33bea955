"""Meta-SGD: meta-gradients against finite differences and MAML, the α shapes and init, and a learning test."""

from __future__ import annotations

import pytest
import torch

from metaopt.algorithms import MAML, MetaSGD
from metaopt.algorithms.metasgd import MetaSGDOptions
from metaopt.engine.higher_driver import HigherRule
from metaopt.models import MLP
from metaopt.options import ConfigError
from metaopt.registry import BuildContext, entry
from metaopt.training.config import RunConfig, Section
from metaopt.training.experiment import build_experiment
from tests.helpers import (
    assert_close_dicts,
    meta_grads,
    sinusoid_mse_before_and_after,
    tiny_convnet,
    tiny_mlp,
    toy_regression_batch,
)


def test_alpha_has_the_shape_of_every_adapted_parameter() -> None:
    learner = MetaSGD(tiny_convnet(), adapt=["3.weight", "3.bias"])
    assert {k: tuple(v.shape) for k, v in learner.rule.rates.items()} == {"3-weight": (3, 12), "3-bias": (3,)}
    assert all(((r >= 0.005) & (r <= 0.1)).all() for r in learner.rule.rates.values())
    assert learner.inner_steps == learner.eval_steps == 1


def test_second_order_gradient_of_alpha_matches_finite_differences() -> None:
    batch = toy_regression_batch()
    learner = MetaSGD(tiny_mlp(), init=(0.005, 0.1), generator=torch.Generator().manual_seed(0)).double()
    _, grads = meta_grads(learner, batch)
    alpha = learner.rule.rates["0-weight"]
    eps = 1e-6
    for index in [(0, 0), (3, 0), (7, 0)]:
        with torch.no_grad():
            alpha[index] += eps
            up = learner.meta_loss(batch)[0].item()
            alpha[index] -= 2 * eps
            down = learner.meta_loss(batch)[0].item()
            alpha[index] += eps
        assert grads["rule.rates.0-weight"][index].item() == pytest.approx((up - down) / (2 * eps), rel=1e-5, abs=1e-9)


def test_constant_alpha_is_maml_and_its_entries_split_the_scalar_lr_gradient() -> None:
    batch = toy_regression_batch()
    loss, grads = meta_grads(MetaSGD(tiny_mlp(), init=0.05).double(), batch)
    expected_loss, expected = meta_grads(MAML(tiny_mlp(), inner_lr=0.05, learn_inner_lr=True).double(), batch)
    torch.testing.assert_close(loss, expected_loss)
    torch.testing.assert_close(sum(g.sum() for k, g in grads.items() if k.startswith("rule.")), expected["rule.lr"])
    assert_close_dicts({k: v for k, v in grads.items() if k.startswith("model.")},
                       {k: v for k, v in expected.items() if k.startswith("model.")})


def test_loop_and_vmap_agree() -> None:
    batch = toy_regression_batch()
    loop = meta_grads(MetaSGD(tiny_mlp(), generator=torch.Generator().manual_seed(1), strategy="loop").double(), batch)
    vmap = meta_grads(MetaSGD(tiny_mlp(), generator=torch.Generator().manual_seed(1), strategy="vmap").double(), batch)
    torch.testing.assert_close(vmap[0], loop[0])
    assert_close_dicts(vmap[1], loop[1])


def test_higher_driver_is_refused_with_the_reason() -> None:
    with pytest.raises(TypeError, match="unexpected keyword argument 'driver'"):
        MetaSGD(tiny_mlp(), driver="higher")
    with pytest.raises(NotImplementedError, match="LearnedRates has no torch.optim counterpart; run it with the "
                                                  "torch.func driver"):
        HigherRule(MetaSGD(tiny_mlp()).rule)  # the higher driver of a MetaLearner: MetaLearner(model, HigherRule(...))


def test_config_init_is_recorded_and_seeded() -> None:
    config = RunConfig.from_dict({"data": {"name": "sinusoid", "meta_batch": 2},
                                  "model": {"name": "mlp", "hidden": [8]},
                                  "algorithm": {"name": "metasgd", "inner_steps": 1}})
    assert config.algorithm.options.init == "uniform"
    first, again = (build_experiment(config).learner.rule.rates["0-weight"] for _ in range(2))
    assert torch.equal(first, again) and first.min() >= 0.005 and first.max() <= 0.1 and first.std() > 0
    constant = build_experiment(config.replace(algorithm={"init": "constant", "init_lr": 0.02})).learner
    assert all(torch.all(r == 0.02) for r in constant.rule.rates.values())


METASGD_OPTIONS = ("adapt", "first_order", "checkpoint_steps", "inner_steps", "eval_inner_steps", "strategy",
                   "bn_policy", "init", "init_lr")


def test_registered_options_build_metasgd_and_refuse_others() -> None:
    found = entry("algorithm", "metasgd")
    assert found.options is MetaSGDOptions and tuple(MetaSGDOptions.field_names()) == METASGD_OPTIONS
    batch = toy_regression_batch()
    learner = found.build(MetaSGDOptions(init="constant", init_lr=0.05), BuildContext(tiny_mlp(), batch))
    assert isinstance(learner, MetaSGD) and all(torch.all(r == 0.05) for r in learner.rule.rates.values())
    loss, grads = meta_grads(learner, batch)
    expected_loss, expected = meta_grads(MetaSGD(tiny_mlp(), init=0.05), batch)
    assert torch.equal(loss, expected_loss) and grads.keys() == expected.keys()
    for name in expected:
        assert torch.equal(grads[name], expected[name]), name
    uniform = found.build(MetaSGDOptions(adapt="2.weight,2.bias"), BuildContext(tiny_mlp(), batch)).rule.rates
    assert sorted(uniform) == ["2-bias", "2-weight"]
    assert all(((r >= 0.005) & (r <= 0.1)).all() for r in uniform.values())
    with pytest.raises(ConfigError, match=r"option 'init_lr' is the starting step size of init='constant' .* "
                                          r"got init='uniform', init_lr=0.02"):
        Section.from_dict("algorithm", {"name": "metasgd", "init": "uniform", "init_lr": 0.02})
    with pytest.raises(ConfigError, match="required there"):
        MetaSGDOptions(init="constant")
    listed = ", ".join(METASGD_OPTIONS)
    for option in ("inner_lr", "metasgd_init", "driver"):
        with pytest.raises(ConfigError, match=rf"^'{option}'( \(did you mean '\w+'\?\))? is not an option of "
                                              rf"algorithm 'metasgd'; its options are {listed}$"):
            Section.from_dict("algorithm", {"name": "metasgd", option: 1})


def test_metasgd_learns_sinusoids() -> None:
    torch.manual_seed(0)
    learner = MetaSGD(MLP(1, 1, hidden=(40, 40)), init=0.01, strategy="vmap")
    before, after = sinusoid_mse_before_and_after(learner, iterations=300)
    assert after.mean < 0.6 * before.mean, f"post-adaptation MSE {after} vs untrained {before}"
    assert any(not torch.allclose(r, torch.full_like(r, 0.01)) for r in learner.rule.rates.values())
