"""Ravi & Larochelle's meta-learner LSTM: the cell against a hand-written unroll, SGD as a special case, batch norm."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from metaopt.algorithms import MAML, MetaLSTM
from metaopt.algorithms.metalstm import MetaLSTMOptions, MetaLSTMRule
from metaopt.engine.coordinatewise import preprocess
from metaopt.engine.rules import StepInfo
from metaopt.options import ConfigError
from metaopt.problems.episode import Episode
from metaopt.registry import BuildContext, entry
from metaopt.training.config import Section
from tests.helpers import assert_close_dicts, meta_grads, tiny_convnet, tiny_mlp, toy_classification_batch


def test_gate_initialisation_follows_the_paper() -> None:
    torch.manual_seed(0)
    rule = MetaLSTMRule()
    assert 4 <= rule.forget_bias.item() <= 5 and -5 <= rule.input_bias.item() <= -4
    for weight in (rule.forget_weight, rule.input_weight, *rule.lstm.parameters()):
        assert weight.abs().max() <= 0.01


def test_one_step_equals_the_cell_written_out() -> None:
    """c_1 = σ(W_F [h, c_0, f_0] + b_F) c_0 - σ(W_I [h, c_0, i_0] + b_I) ∇, h from a standard LSTM cell."""
    torch.manual_seed(0)
    rule = MetaLSTMRule(hidden=6).double()
    params = {"w": torch.randn(2, 3, dtype=torch.float64), "b": torch.randn(2, dtype=torch.float64)}
    grads = {"w": torch.randn(2, 3, dtype=torch.float64), "b": torch.randn(2, dtype=torch.float64) * 1e-6}
    loss = torch.tensor(0.7, dtype=torch.float64)
    new, _ = rule.step(params, grads, rule.init(params), StepInfo(0, loss))
    cell = rule.lstm.cells[0]
    for name in params:
        for index in range(params[name].numel()):
            c, g = params[name].reshape(-1)[index], grads[name].reshape(-1)[index]
            x = torch.cat([preprocess(loss), preprocess(g)])
            gates = cell.weight_ih @ x + cell.bias_ih + cell.bias_hh  # h_0 = c_0 = 0
            i, f, cand, o = gates.chunk(4)
            h = torch.sigmoid(o) * torch.tanh(torch.sigmoid(i) * torch.tanh(cand))
            forget = rule.forget_weight @ torch.cat([h, c.reshape(1), torch.zeros(1, dtype=c.dtype)]) + rule.forget_bias
            inp = rule.input_weight @ torch.cat([h, c.reshape(1), torch.zeros(1, dtype=c.dtype)]) + rule.input_bias
            expected = torch.sigmoid(forget) * c - torch.sigmoid(inp) * g
            torch.testing.assert_close(new[name].reshape(-1)[index], expected)


def test_a_cell_set_to_keep_theta_and_step_by_lr_is_gradient_descent() -> None:
    """σ(f) = 1, σ(i) = α: the meta-learner reproduces first-order MAML's SGD exactly."""
    lr = 0.25  # exact in float32, where MAML's sgd keeps its rate
    learner = MetaLSTM(tiny_convnet(), inner_steps=3, bn_policy="batch").double()
    with torch.no_grad():
        learner.rule.forget_weight.zero_()
        learner.rule.input_weight.zero_()
        learner.rule.forget_bias.fill_(60.0)  # sigmoid(60) == 1 in float64
        learner.rule.input_bias.fill_(math.log(lr / (1 - lr)))
    maml = MAML(tiny_convnet(), inner_lr=lr, inner_steps=3, first_order=True).double()
    with torch.no_grad():  # MetaLSTM set its batch-norm eps / momentum; give MAML's model the same
        for ours, theirs in zip(learner.model.modules(), maml.model.modules()):
            if isinstance(ours, nn.BatchNorm2d):
                theirs.eps, theirs.momentum = ours.eps, ours.momentum
    task = toy_classification_batch()[0]
    adapted = learner.adapt(task)
    expected = maml.adapt(task)
    assert_close_dicts(adapted.params, expected.params, rtol=1e-12, atol=1e-12)
    loss, _ = learner.meta_loss(toy_classification_batch())
    torch.testing.assert_close(loss, maml.meta_loss(toy_classification_batch())[0])


def test_gradients_enter_as_constants() -> None:
    """The rule detaches the gradients it is fed: asking the engine for second order changes nothing."""
    batch = toy_classification_batch()
    first = MetaLSTM(tiny_convnet(), inner_steps=2, bn_policy="batch").double()
    second = MetaLSTM(tiny_convnet(), inner_steps=2, bn_policy="batch").double()
    second.load_state_dict(first.state_dict())
    second.first_order = False
    assert_close_dicts(meta_grads(second, batch)[1], meta_grads(first, batch)[1], rtol=0, atol=0)


def test_meta_gradients_reach_the_initial_weights_and_every_lstm_parameter() -> None:
    learner = MetaLSTM(tiny_mlp(), inner_steps=3, bn_policy="batch").double()
    x = torch.linspace(-2, 2, 20, dtype=torch.float64)[:, None]
    batch = Episode.stack([Episode(x[::2], torch.sin(x[::2]), x[1::2], torch.sin(x[1::2]))])
    _, grads = meta_grads(learner, batch)
    assert all(g.abs().sum() > 0 for g in grads.values()), [k for k, g in grads.items() if g.abs().sum() == 0]


def _bn_net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3)).double()


def test_support_policy_scores_the_query_with_the_support_statistics() -> None:
    """§3.3: per task fresh statistics, accumulated on the support passes, used for the query; the model untouched."""
    learner = MetaLSTM(_bn_net(), inner_steps=2, bn_momentum=0.9, bn_eps=1e-3).double()
    before = {k: v.clone() for k, v in learner.model.state_dict().items()}
    g = torch.Generator().manual_seed(1)
    task = Episode(torch.randn(6, 4, generator=g, dtype=torch.float64), torch.arange(3).repeat(2),
                   3 + torch.randn(9, 4, generator=g, dtype=torch.float64), torch.arange(3).repeat(3))
    with torch.no_grad():
        adapted = learner.adapt(task)
    params = adapted.params
    # the oracle: replay the two support passes by hand for the statistics, then normalise the query with them
    mean, var = torch.zeros(6, dtype=torch.float64), torch.ones(6, dtype=torch.float64)
    with torch.no_grad():
        theta = dict(learner.model.named_parameters())
        state = learner.rule.init(theta)
        for t in range(2):
            with torch.enable_grad():
                leaves = {k: v.detach().requires_grad_() for k, v in theta.items()}
                pre = F.linear(task.support_x, leaves["0.weight"], leaves["0.bias"])
                batch_mean, batch_var = pre.mean(0), pre.var(0, unbiased=False)
                h = (pre - batch_mean) / torch.sqrt(batch_var + 1e-3) * leaves["1.weight"] + leaves["1.bias"]
                out = F.linear(F.relu(h), leaves["3.weight"], leaves["3.bias"])
                loss = F.cross_entropy(out, task.support_y)
                grads = dict(zip(leaves, torch.autograd.grad(loss, list(leaves.values()))))
            mean = 0.1 * mean + 0.9 * pre.mean(0)
            var = 0.1 * var + 0.9 * pre.var(0, unbiased=True)
            theta, state = learner.rule.step(theta, grads, state, StepInfo(t, loss.detach()))
        assert_close_dicts({k: v for k, v in params.items() if k in theta}, theta)
        torch.testing.assert_close(params["1.running_mean"], mean)
        torch.testing.assert_close(params["1.running_var"], var)
        query_pre = F.linear(task.query_x, theta["0.weight"], theta["0.bias"])
        h = (query_pre - mean) / torch.sqrt(var + 1e-3) * theta["1.weight"] + theta["1.bias"]
        torch.testing.assert_close(adapted(task.query_x), F.linear(F.relu(h), theta["3.weight"], theta["3.bias"]))
    learner.meta_loss(Episode.stack([task, task]))
    for k, v in learner.model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_support_policy_starts_every_task_afresh() -> None:
    """A task's query scores do not depend on which tasks ran before it in the batch."""
    learner = MetaLSTM(_bn_net(), inner_steps=2).double()
    g = torch.Generator().manual_seed(2)
    tasks = [Episode(torch.randn(6, 4, generator=g, dtype=torch.float64) * (1 + 3 * i), torch.arange(3).repeat(2),
                     torch.randn(9, 4, generator=g, dtype=torch.float64), torch.arange(3).repeat(3)) for i in range(2)]
    with torch.no_grad():  # the final query losses, as an evaluation scores them, and the evaluation itself
        alone = learner.task_outputs(Episode.stack([tasks[1]]), learner.eval_steps, final_step_only=True).losses
        after = learner.task_outputs(Episode.stack(tasks), learner.eval_steps, final_step_only=True).losses[1:]
        scored_alone = learner.evaluate(Episode.stack([tasks[1]])).values
        scored_after = learner.evaluate(Episode.stack(tasks)).values[1:]
    torch.testing.assert_close(after, alone, rtol=0, atol=0)
    torch.testing.assert_close(scored_after, scored_alone, rtol=0, atol=0)


def test_support_policy_needs_the_loop() -> None:
    with pytest.raises(ValueError, match="strategy='vmap' is not available: batch-norm policy 'support' writes "
                                         "statistics shared by the tasks"):
        MetaLSTM(_bn_net(), strategy="vmap")


METALSTM_OPTIONS = ("adapt", "inner_steps", "eval_inner_steps", "strategy", "bn_policy", "lstm_units", "bn_momentum",
                    "bn_eps")


def test_registered_options_build_metalstm_and_refuse_others() -> None:
    """The "metalstm" entry builds the meta-learner; it has no inner_lr and is first-order, so both are refused."""
    found = entry("algorithm", "metalstm")
    assert found.options is MetaLSTMOptions and tuple(MetaLSTMOptions.field_names()) == METALSTM_OPTIONS
    x = torch.randn(15, 4)  # float32, as the rule built by the entry
    batch = Episode.stack([Episode(x[:6], torch.arange(3).repeat(2), x[6:], torch.arange(3).repeat(3))])
    options = MetaLSTMOptions(inner_steps=2, lstm_units=6, bn_momentum=0.95, bn_eps=1e-4)
    learner = found.build(options, BuildContext(_bn_net().float(), batch))
    assert isinstance(learner, MetaLSTM) and isinstance(learner.rule, MetaLSTMRule) and learner.rule.lstm.hidden == 6
    assert learner.inner_steps == 2 and learner.first_order and learner.bn_policy.name == "support"
    assert (learner.model[1].momentum, learner.model[1].eps) == (0.95, 1e-4)
    default = found.build(MetaLSTMOptions(), BuildContext(_bn_net().float(), batch))
    assert (default.inner_steps, default.rule.lstm.hidden, default.model[1].momentum, default.model[1].eps) == \
        (12, 20, 0.9, 1e-3)
    loss, _ = learner.meta_loss(batch)
    assert torch.isfinite(loss)
    listed = ", ".join(METALSTM_OPTIONS)
    for option in ("inner_lr", "first_order", "hidden"):
        with pytest.raises(ConfigError, match=rf"^'{option}'( \(did you mean '\w+'\?\))? is not an option of "
                                              rf"algorithm 'metalstm'; its options are {listed}$"):
            Section.from_dict("algorithm", {"name": "metalstm", option: 1})
