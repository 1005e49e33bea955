"""Meta-SGD: meta-gradients against finite differences and MAML, the α shapes and init, and a learning test."""

from __future__ import annotations

import pytest
import torch

from metaopt.algorithms import MAML, MetaSGD
from metaopt.config import ExperimentConfig
from metaopt.experiment import build_experiment
from metaopt.models import MLP
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
    assert learner.inner_steps == learner.eval_inner_steps == 1


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
    with pytest.raises(NotImplementedError, match="LearnedRates has no torch.optim counterpart; use driver='func'"):
        MetaSGD(tiny_mlp(), driver="higher")


def test_config_init_is_recorded_and_seeded() -> None:
    config = ExperimentConfig(algorithm="metasgd", hidden=(8,), meta_batch=2, inner_steps=1)
    first, again = (build_experiment(config).algorithm.rule.rates["0-weight"] for _ in range(2))
    assert torch.equal(first, again) and first.min() >= 0.005 and first.max() <= 0.1 and first.std() > 0
    constant = build_experiment(config.replace(metasgd_init="constant", inner_lr=0.02)).algorithm
    assert all(torch.all(r == 0.02) for r in constant.rule.rates.values())


def test_metasgd_learns_sinusoids() -> None:
    torch.manual_seed(0)
    learner = MetaSGD(MLP(1, 1, hidden=(40, 40)), init=0.01, strategy="vmap")
    before, after = sinusoid_mse_before_and_after(learner, iterations=300)
    assert after.mean < 0.6 * before.mean, f"post-adaptation MSE {after} vs untrained {before}"
    assert any(not torch.allclose(r, torch.full_like(r, 0.01)) for r in learner.rule.rates.values())
