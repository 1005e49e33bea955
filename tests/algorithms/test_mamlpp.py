"""MAML++ techniques, each against an oracle: plain MAML, the schedule formulas, a second driver, finite sums."""

from __future__ import annotations

import pytest
import torch

from metaopt.algorithms import MAML, MAMLPlusPlus
from metaopt.algorithms.mamlpp import MAMLPlusPlusOptions
from metaopt.engine.functional import named_params, select
from metaopt.engine.higher_driver import HigherRule
from metaopt.engine.meta_learner import MetaLearner
from metaopt.engine.per_step_batchnorm import PerStepBatchNorm, per_step_batchnorm
from metaopt.engine.rules import LearnedRates, per_step_sgd
from metaopt.options import ConfigError
from metaopt.problems.episode_task import EpisodeTask, default_loss
from metaopt.problems.sampling import EpisodeSampler
from metaopt.registry import BuildContext, entry
from metaopt.training.config import Section, TrainerConfig, load_preset
from metaopt.training.schedules import multi_step_loss_weights
from metaopt.training.trainer import MetaTrainer
from tests.helpers import assert_close_dicts, meta_grads, tiny_convnet, toy_classification_batch

BN = ("0.1.weight", "0.1.bias", "1.1.weight", "1.1.bias")
OFF = {"msl_epochs": None, "second_order_from_epoch": None, "per_step_bn_stats": False, "per_step_bn_weights": False,
       "per_step_lr": False}


def test_with_every_switch_off_it_is_maml_exactly() -> None:
    batch = toy_classification_batch()
    loss, grads = meta_grads(MAMLPlusPlus(tiny_convnet(), inner_lr=0.3, inner_steps=2, **OFF), batch)
    expected_loss, expected = meta_grads(MAML(tiny_convnet(), inner_lr=0.3, inner_steps=2), batch)
    assert torch.equal(loss, expected_loss)
    assert grads.keys() == expected.keys()
    for name in expected:
        assert torch.equal(grads[name], expected[name]), name


def test_lslr_starts_as_maml_and_its_rates_split_the_scalar_lr_gradient() -> None:
    """With every rate at α, LSLR is MAML; d/dα of one shared α is the sum of the per-layer per-step gradients."""
    batch = toy_classification_batch()
    loss, grads = meta_grads(MAMLPlusPlus(tiny_convnet(), inner_lr=0.3, inner_steps=3, **{**OFF, "per_step_lr": True}),
                             batch)
    maml = MAML(tiny_convnet(), inner_lr=0.3, inner_steps=3, learn_inner_lr=True).double()
    expected_loss, expected = meta_grads(maml, batch)
    torch.testing.assert_close(loss, expected_loss)
    rates = {k: v for k, v in grads.items() if k.startswith("rule.rates.")}
    assert {k: tuple(grads[k].shape) for k in rates} == {f"rule.rates.{n.replace('.', '-')}": (3,)
                                                          for n, _ in tiny_convnet().named_parameters()}
    torch.testing.assert_close(sum(g.sum() for g in rates.values()), expected["rule.lr"])
    assert_close_dicts({k: v for k, v in grads.items() if k.startswith("model.")},
                       {k: v for k, v in expected.items() if k.startswith("model.")})


def test_per_step_batchnorm_starts_as_maml_and_its_rows_split_the_gradient() -> None:
    """BNRS + BNWB: same function at the start; the per-step weights' gradients sum to the shared weights' ones."""
    batch = toy_classification_batch()
    learner = MAMLPlusPlus(tiny_convnet(), inner_lr=0.3, inner_steps=2,
                           **{**OFF, "per_step_bn_stats": True, "per_step_bn_weights": True})
    assert sum(isinstance(m, PerStepBatchNorm) for m in learner.modules()) == 2
    adapted = [n for n, _ in tiny_convnet().named_parameters() if n not in BN]  # BNWB: outer loop only
    loss, grads = meta_grads(learner, batch)
    expected_loss, expected = meta_grads(MAML(tiny_convnet(), inner_lr=0.3, inner_steps=2, adapt=adapted), batch)
    torch.testing.assert_close(loss, expected_loss)
    for name in expected:
        per_step = grads[name]
        if name.removeprefix("model.") in BN:
            assert per_step.shape == (2, *expected[name].shape)
            assert per_step.abs().min() > 0  # both steps' rows are used
            per_step = per_step.sum(0)
        torch.testing.assert_close(per_step, expected[name], msg=name)


def test_bnwb_weights_stay_out_of_the_inner_loop() -> None:
    learner = MAMLPlusPlus(tiny_convnet(), inner_steps=2)
    task = EpisodeTask(learner.model, default_loss, *toy_classification_batch()[0].tensors())
    path = learner.inner.unroll(task, dict(learner.model.named_parameters()), steps=2).params
    for name in BN:
        assert torch.equal(path[-1][name], path[0][name]), name
    for name in ("0.0.weight", "1.0.weight", "3.weight", "3.bias"):  # (a bias before batch norm has no gradient)
        assert not torch.equal(path[-1][name], path[0][name]), name


@pytest.mark.parametrize("epoch", [0, 3, 9, 10])
def test_msl_weights_the_query_loss_of_every_step_by_the_schedule(epoch: int) -> None:
    learner = MAMLPlusPlus(tiny_convnet(), inner_lr=0.3, inner_steps=3, msl_epochs=10)
    learner.set_epoch(epoch)
    weights = multi_step_loss_weights(3, epoch, 10)
    assert learner.step_weights == weights
    loss, metrics = learner.meta_loss(toy_classification_batch(tasks=1), track_steps=True)
    expected = sum(w * metrics[f"query_loss_step{t + 1}"] for t, w in enumerate(weights))
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    with torch.no_grad():  # evaluation scores the last step only, whatever the epoch
        final = learner.task_outputs(toy_classification_batch(tasks=1), learner.eval_steps, final_step_only=True)
        scored = learner.evaluate(toy_classification_batch(tasks=1))
    assert final.losses.item() == pytest.approx(metrics["query_loss_step3"], rel=1e-12)
    assert scored.metric == "accuracy" and torch.equal(scored.values, final.accuracy)


def test_derivative_order_switches_at_its_epoch() -> None:
    batch = toy_classification_batch()
    learner = MAMLPlusPlus(tiny_convnet(), inner_lr=0.3, inner_steps=2, **{**OFF, "second_order_from_epoch": 3})
    first = meta_grads(MAML(tiny_convnet(), inner_lr=0.3, inner_steps=2, first_order=True), batch)[1]
    second = meta_grads(MAML(tiny_convnet(), inner_lr=0.3, inner_steps=2), batch)[1]
    for epoch, expected in [(0, first), (2, first), (3, second), (7, second)]:
        learner.set_epoch(epoch)
        assert learner.first_order is (epoch < 3)
        assert_close_dicts(meta_grads(learner, batch)[1], expected, rtol=1e-10, atol=1e-12)
    assert any(not torch.allclose(first[k], second[k]) for k in first)


def test_loop_and_vmap_agree_with_every_technique_on() -> None:
    batch = toy_classification_batch()
    loop = meta_grads(MAMLPlusPlus(tiny_convnet(), inner_steps=2, strategy="loop", msl_epochs=4), batch)
    vmap = meta_grads(MAMLPlusPlus(tiny_convnet(), inner_steps=2, strategy="vmap", msl_epochs=4), batch)
    torch.testing.assert_close(vmap[0], loop[0])
    assert_close_dicts(vmap[1], loop[1], rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("first_order", [False, True])
def test_higher_driver_agrees_with_lslr_and_per_step_batchnorm(first_order: bool) -> None:
    """LSLR reaches higher as per-group, per-step ``override`` learning rates; BNWB via the step context.

    MAMLPlusPlus runs torch.func; on the higher driver the same learner is a MetaLearner of the same parts:
    per-step batch norm, per-step rates of the adapted (non-BNWB) parameters as a HigherRule, MSL's weights.
    """
    batch = toy_classification_batch()
    options = {"inner_steps": 3, "msl_epochs": 5, "second_order_from_epoch": None, "first_order": first_order}
    func = MAMLPlusPlus(tiny_convnet(), **options)
    model = per_step_batchnorm(tiny_convnet(), steps=3)
    adapted = [name for name, _ in model.named_parameters() if name not in BN]
    weights = multi_step_loss_weights(3, 0, 5)
    assert func.step_weights == weights and func.inner.adapted == tuple(adapted)
    rule = HigherRule(per_step_sgd(select(named_params(model), adapted), steps=3, lr=0.1))
    higher = MetaLearner(model, rule, inner_steps=3, first_order=first_order, adapt=adapted, step_weights=weights)
    with torch.no_grad():  # rates and per-step weights apart, so that a wrong step index would show
        for learner, learned in ((func, func.rule), (higher, higher.rule.source)):
            for i, rates in enumerate(learned.rates.values()):
                rates.copy_(torch.tensor([0.1, 0.3, 0.2], dtype=rates.dtype) * (1 + i / 10))
            for m in learner.modules():
                if isinstance(m, PerStepBatchNorm):
                    m.weight.copy_(torch.linspace(0.5, 1.5, m.weight.numel(), dtype=m.weight.dtype).view_as(m.weight))
    expected_loss, expected = meta_grads(func, batch)
    loss, grads = meta_grads(higher, batch)
    torch.testing.assert_close(loss, expected_loss)
    # the higher rule wraps the per-step rates: rule.source.rates.* there, rule.rates.* in MAMLPlusPlus
    assert_close_dicts({name.replace("rule.source.", "rule.", 1): g for name, g in grads.items()}, expected,
                       rtol=1e-9, atol=1e-11)


def test_running_statistics_per_step_are_updated_by_meta_training_only() -> None:
    """bn_policy 'running': meta-training writes each step's row; evaluation reads them (more steps: the last row)."""
    learner = MAMLPlusPlus(tiny_convnet(), inner_steps=2, bn_policy="running")
    layer = learner.model[0][1]
    before = layer.running_mean.clone()
    with torch.no_grad():
        learner.evaluate(toy_classification_batch(), steps=4)
    assert torch.equal(layer.running_mean, before)
    learner.meta_loss(toy_classification_batch())
    assert (layer.running_mean != before).all(dim=1).all()  # both steps' rows moved
    trained = layer.running_mean.clone()
    with torch.no_grad():
        outputs = learner.evaluate(toy_classification_batch(seed=1), steps=4)
    assert torch.equal(layer.running_mean, trained) and outputs.metric == "accuracy" and outputs.values.shape == (3,)


def _sampler(seed: int) -> EpisodeSampler:
    """Random 8x8 images, 6 classes of 8: 3-way 1-shot tasks for the tiny convnet."""
    images = {c: torch.randn(8, 1, 8, 8, generator=torch.Generator().manual_seed(c)) for c in range(6)}
    return EpisodeSampler(images, ways=3, shots=1, query=2, batch_size=2, seed=seed)


def test_resume_carries_rates_per_step_weights_and_statistics(tmp_path) -> None:
    def learner() -> MAMLPlusPlus:
        return MAMLPlusPlus(tiny_convnet().float(), inner_steps=2, bn_policy="running", msl_epochs=2)

    config = TrainerConfig(iterations=6, epoch_length=2, eval_every=100, checkpoint_every=1, log_every=1,
                           lr_schedule="cosine", min_meta_lr=1e-4)
    class Interrupted(EpisodeSampler):
        def batch(self, index: int):  # noqa: ANN202
            if index == 3:
                raise KeyboardInterrupt
            return super().batch(index)

    straight = learner()
    MetaTrainer(straight, _sampler(0), config).fit()
    interrupted = _sampler(0)
    interrupted.__class__ = Interrupted
    with pytest.raises(KeyboardInterrupt):
        MetaTrainer(learner(), interrupted, config, run_dir=tmp_path).fit()
    resumed = learner()
    MetaTrainer(resumed, _sampler(0), config, run_dir=tmp_path).fit(resume=True)
    state, expected = resumed.state_dict(), straight.state_dict()
    assert any(k.startswith("rule.rates.") for k in expected) and "model.0.1.running_mean" in expected
    for k, v in expected.items():
        assert torch.equal(state[k], v), k


MAMLPP_OPTIONS = ("adapt", "first_order", "checkpoint_steps", "inner_steps", "eval_inner_steps", "strategy",
                  "bn_policy", "inner_lr", "learn_inner_lr", *OFF)


def test_registered_options_build_mamlpp_and_refuse_others() -> None:
    """The "mamlpp" entry builds MAML++ with every switch on by default (off: MAML); others' options are refused."""
    found = entry("algorithm", "mamlpp")
    assert found.options is MAMLPlusPlusOptions and tuple(MAMLPlusPlusOptions.field_names()) == MAMLPP_OPTIONS
    batch = toy_classification_batch()
    learner = found.build(MAMLPlusPlusOptions(inner_steps=2), BuildContext(tiny_convnet(), batch))
    assert isinstance(learner, MAMLPlusPlus) and isinstance(learner.rule, LearnedRates) and learner.rule.per_step
    assert learner.rule.rate("3.weight", 1).item() == pytest.approx(0.1)
    assert sum(isinstance(m, PerStepBatchNorm) for m in learner.modules()) == 2
    assert learner.step_weights == multi_step_loss_weights(2, 0, 10) and not learner.first_order
    assert not set(learner.inner.adapted) & set(BN)
    off = found.build(MAMLPlusPlusOptions(inner_lr=0.3, inner_steps=2, **OFF), BuildContext(tiny_convnet(), batch))
    loss, grads = meta_grads(off, batch)
    expected_loss, expected = meta_grads(MAML(tiny_convnet(), inner_lr=0.3, inner_steps=2), batch)
    assert torch.equal(loss, expected_loss) and grads.keys() == expected.keys()
    for name in expected:
        assert torch.equal(grads[name], expected[name]), name
    listed = ", ".join(MAMLPP_OPTIONS)
    for option in ("driver", "mask", "anil"):
        with pytest.raises(ConfigError, match=rf"^'{option}'( \(did you mean '\w+'\?\))? is not an option of "
                                              rf"algorithm 'mamlpp'; its options are {listed}$"):
            Section.from_dict("algorithm", {"name": "mamlpp", option: 1})
    with pytest.raises(ConfigError, match="'learn_inner_lr' .* and 'per_step_lr' .* exclude each other"):
        MAMLPlusPlusOptions(learn_inner_lr=True)
    with pytest.raises(ConfigError, match="cannot be combined with first_order=True"):
        MAMLPlusPlusOptions(first_order=True)


def test_presets_hold_the_official_settings() -> None:
    omniglot = load_preset("mamlpp-omniglot-5w1s")
    algorithm, data, trainer = omniglot.algorithm.options, omniglot.data.options, omniglot.trainer
    assert (omniglot.algorithm.name, algorithm.inner_steps, data.meta_batch, data.query,
            omniglot.model.options.filters) == ("mamlpp", 5, 8, 1, 64)
    assert (algorithm.msl_epochs, trainer.min_meta_lr, trainer.epoch_length, trainer.iterations) == \
        (10, 1e-5, 500, 50000)
    assert algorithm.per_step_lr and algorithm.per_step_bn_stats and algorithm.per_step_bn_weights
    mini = load_preset("mamlpp-miniimagenet-5w5s")
    assert (mini.model.options.filters, mini.data.options.meta_batch, mini.data.options.query,
            mini.algorithm.options.msl_epochs, mini.trainer.grad_clip_value) == (48, 2, 15, 15, 10.0)
    assert MAMLPlusPlus(tiny_convnet()).rule.rate("0.0.weight", 4).item() == pytest.approx(0.1)
