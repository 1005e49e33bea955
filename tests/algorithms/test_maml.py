"""MAML, first-order MAML and ANIL: behaviour of the algorithm as a user sees it, and a learning test."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from metaopt.algorithms import MAML
from metaopt.algorithms.maml import MAMLOptions
from metaopt.engine.higher_driver import HigherRule
from metaopt.models import MLP
from metaopt.options import ConfigError
from metaopt.problems.episode import Episode
from metaopt.registry import BuildContext, entry
from metaopt.training.config import Section
from tests.helpers import meta_grads, sinusoid_mse_before_and_after, tiny_convnet, toy_classification_batch

HEAD = ("3.weight", "3.bias")


def test_model_is_unchanged_by_adapt_and_meta_loss() -> None:
    model = tiny_convnet().train()
    with torch.no_grad():
        model(toy_classification_batch(seed=5).support_x[0])  # non-trivial running statistics
    before = {k: v.clone() for k, v in model.state_dict().items()}
    maml = MAML(model, inner_lr=0.5, inner_steps=2)
    batch = toy_classification_batch()
    maml.meta_loss(batch)[0].backward()
    maml.adapt(batch[0])(batch.query_x[0]).sum().backward()
    after = model.state_dict()
    for k, v in before.items():
        torch.testing.assert_close(after[k], v, rtol=0, atol=0, msg=f"{k} changed")


def test_backward_fills_the_gradients_of_every_meta_parameter() -> None:
    maml = MAML(tiny_convnet(), inner_lr=0.5, learn_inner_lr=True).double()
    loss, metrics = maml.meta_loss(toy_classification_batch())
    loss.backward()
    assert [n for n, p in maml.named_parameters() if p.grad is None] == []
    assert maml.rule.lr.grad != 0 and maml.model[3].weight.grad.abs().sum() > 0
    assert 0.0 <= metrics["accuracy"] <= 1.0


def test_adapted_learner_fits_its_support_set() -> None:
    maml = MAML(tiny_convnet(), inner_lr=0.5)
    task = toy_classification_batch()[0]
    with torch.no_grad():
        learner = maml.adapt(task, steps=5)
        unadapted = maml.adapt(task, steps=1)
        assert learner(task.query_x).shape == (6, 3)
        fitted = F.cross_entropy(learner(task.support_x), task.support_y)
        assert fitted < F.cross_entropy(unadapted(task.support_x), task.support_y)
        assert (learner(task.support_x).argmax(-1) == task.support_y).all()


def test_anil_adapts_only_the_head() -> None:
    model = tiny_convnet()
    anil = MAML(model, inner_lr=0.5, adapt="head")
    adapted = anil.adapt(toy_classification_batch()[0])
    for name, p in model.named_parameters():
        moved = not torch.equal(adapted.params[name], p)
        assert moved is (name in HEAD), name
    loss, _ = anil.meta_loss(toy_classification_batch())
    loss.backward()
    assert model[0][0].weight.grad.abs().sum() > 0  # the body is still meta-learned
    assert anil.inner.adapted == HEAD
    assert MAML(model, adapt=list(HEAD)).inner.adapted == HEAD
    assert MAML(model, adapt="3.weight, 3.bias").inner.adapted == HEAD  # a comma-separated string too


def test_first_order_flag() -> None:
    batch = toy_classification_batch()
    _, second = meta_grads(MAML(tiny_convnet(), inner_lr=0.5, inner_steps=2), batch)
    first_order = MAML(tiny_convnet(), inner_lr=0.5, inner_steps=2, first_order=True)
    _, first = meta_grads(first_order, batch)
    assert first_order.first_order and not torch.allclose(first["model.0.0.weight"], second["model.0.0.weight"])
    first_order.first_order = False
    torch.testing.assert_close(meta_grads(first_order, batch)[1]["model.0.0.weight"], second["model.0.0.weight"])


def test_learned_inner_lr_gets_a_gradient_with_both_drivers() -> None:
    for driver, name in (("func", "rule.lr"), ("higher", "rule.source.lr")):
        maml = MAML(tiny_convnet(), inner_lr=0.5, learn_inner_lr=True, driver=driver)
        rule = maml.rule.source if driver == "higher" else maml.rule  # higher runs the sgd rule it wraps
        assert isinstance(maml.rule, HigherRule) is (driver == "higher")
        assert dict(maml.named_parameters())[name] is rule.lr
        _, grads = meta_grads(maml, toy_classification_batch())
        assert grads[name] != 0, driver


@pytest.mark.parametrize("kwargs, error, message", [
    ({"inner_lr": 0.0}, ValueError, "inner learning rate must be > 0, got 0.0"),
    ({"inner_steps": 0}, ValueError, "the inner loop needs at least one step, got steps=0"),
    ({"anil": True}, TypeError, "unexpected keyword argument 'anil'"),  # gone: adapt="head" is ANIL
    ({"adapt": ["head.weight"]}, ValueError, r"adapt names unknown parameters \['head.weight'\]"),
    ({"strategy": "threads"}, ValueError, "unknown task-batching strategy 'threads'"),
    ({"driver": "jax"}, ValueError, "driver must be 'func' or 'higher', got 'jax'"),
    ({"learning_rate": 0.1}, TypeError, "unexpected keyword argument 'learning_rate'"),
], ids=["zero lr", "no steps", "anil is gone", "unknown param", "strategy", "driver", "misspelt option"])
def test_bad_options_raise_clear_errors(kwargs: dict, error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        MAML(tiny_convnet(), **kwargs)


MAML_OPTIONS = ("adapt", "first_order", "checkpoint_steps", "inner_steps", "eval_inner_steps", "strategy", "bn_policy",
                "inner_lr", "learn_inner_lr")


def test_registered_options_build_maml_and_refuse_others() -> None:
    """The "maml" entry builds MAML from its options; an option it does not take (MAML++'s) is refused, listed."""
    found = entry("algorithm", "maml")
    assert found.options is MAMLOptions and tuple(MAMLOptions.field_names()) == MAML_OPTIONS
    batch = toy_classification_batch()
    options = MAMLOptions(inner_lr=0.3, inner_steps=2, adapt="head", learn_inner_lr=True)
    learner = found.build(options, BuildContext(tiny_convnet(), batch))
    assert isinstance(learner, MAML) and learner.inner_steps == 2 and learner.inner.adapted == HEAD
    assert learner.rule.lr.item() == pytest.approx(0.3) and not learner.first_order
    loss, grads = meta_grads(learner, batch)
    expected_loss, expected = meta_grads(MAML(tiny_convnet(), inner_lr=0.3, inner_steps=2, adapt="head",
                                              learn_inner_lr=True), batch)
    assert torch.equal(loss, expected_loss) and grads.keys() == expected.keys()
    for name in expected:
        assert torch.equal(grads[name], expected[name]), name
    default = found.build(MAMLOptions(), BuildContext(tiny_convnet(), batch))
    assert (default.rule.lr, default.inner_steps, default.eval_steps, default.inner.adapted) == (0.4, 1, 1, None)
    listed = ", ".join(MAML_OPTIONS)
    for option in ("msl_epochs", "per_step_lr", "driver"):  # MAML++'s switches are options of mamlpp only
        with pytest.raises(ConfigError, match=rf"^'{option}'( \(did you mean '\w+'\?\))? is not an option of "
                                              rf"algorithm 'maml'; its options are {listed}$"):
            Section.from_dict("algorithm", {"name": "maml", option: 1})


def test_episodes_built_by_hand() -> None:
    torch.manual_seed(0)
    maml = MAML(MLP(2, 2, hidden=(8,)), inner_lr=0.5, inner_steps=3, eval_inner_steps=20)
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.9, 0.1], [0.1, 0.9], [1.1, -0.1], [-0.1, 1.1]])
    y = torch.tensor([0, 1, 0, 1, 0, 1])
    flipped = Episode(x[:2], 1 - y[:2], x[2:], 1 - y[2:])
    batch = Episode.stack([Episode(x[:2], y[:2], x[2:], y[2:]), flipped])
    loss, metrics = maml.meta_loss(batch)
    loss.backward()
    assert batch.ways == 2 and sorted(metrics) == ["accuracy", "loss"]
    assert all(p.grad is not None for p in maml.parameters())
    with torch.no_grad():  # twenty steps fit either labelling of the two clusters
        assert maml.adapt(flipped)(x[2:]).argmax(-1).tolist() == [1, 0, 1, 0]
        assert maml.adapt(batch[0])(x[2:]).argmax(-1).tolist() == [0, 1, 0, 1]


def test_maml_learns_sinusoids() -> None:
    """Finn et al. 2017, §5.1: MLP 40-40, one step of lr 0.01, Adam 1e-3, 25 tasks per meta-batch."""
    torch.manual_seed(0)
    maml = MAML(MLP(1, 1, hidden=(40, 40)), inner_lr=0.01, strategy="vmap")
    before, after = sinusoid_mse_before_and_after(maml, iterations=500)
    assert after.mean < 0.6 * before.mean, f"post-adaptation MSE {after} vs untrained {before}"
