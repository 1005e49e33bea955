"""learned_optimization's hierarchical optimizer (per-tensor LSTM, per-parameter MLP): training and validation steps
against a numpy oracle of the reference's update, meta-gradients against finite differences, the torch.optim wrapper,
validation losses through the inner loop, meta-training."""

from __future__ import annotations

import copy
import io
import math

import numpy as np
import pytest
import torch
from torch import nn

from metaopt.algorithms.rnn_mlp_lopt import RNNMLPLOptOptions, RNNMLPLOptRule, RNNMLPOptimizer
from metaopt.datasets.quadratics import Quadratics
from metaopt.engine.optimizer_learner import OptimizerLearner
from metaopt.engine.rules import StepInfo
from metaopt.estimators import TruncatedBackprop
from metaopt.problems.optimizees import Optimizee
from metaopt.registry import BuildContext, entry
from metaopt.training.checkpoint import CheckpointError
from tests.algorithms.lopt_checks import (
    assert_meta_gradients_match_finite_differences,
    assert_meta_training_halves_the_loss,
    model_with_every_rank,
    one_iteration_checkpoint,
)

#: A scalar, a bias, a matrix and a convolution kernel (in sorted-name order, the reference's ``tree_leaves`` order).
SHAPES = {"bias": (5,), "kernel": (4, 3, 3, 3), "scale": (), "weight": (3, 4)}
#: The reference's names of the LSTM's inputs; it concatenates them sorted by name.
LSTM_INPUTS = ("mean_ms_mag", "mean_ms_sign", "var_ms", "mean_rms", "mean_sign", "var_rms", "mean_v_mag",
               "mean_v_sign", "var_v", "norm_weight", "g_norm", "is_scalar", "shape_0", "shape_1", "shape_2",
               "shape_3", "train_loss_feat", "valid_loss_feat", "from_mlp", "from_lstm")


# --------------------------------------------------------------------------------------------------------------------
# A numpy oracle of learned_optimization's RNNMLPLOpt.opt_fn (update_is_training / update_is_valid), line by line.


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _clip_log_abs(x: np.ndarray) -> np.ndarray:
    return np.clip(np.log(1e-8 + np.abs(x)), -5, 5)


class _LossNormalizer:
    """The reference's ``_LossNormalizer``: an EMA state ``(mean, var, updates)``."""

    def __init__(self, decay: float) -> None:
        self.decay = decay

    def next_state(self, state: tuple, loss: float) -> tuple:
        mean = self.decay * state[0] + (1.0 - self.decay) * loss
        var = self.decay * state[1] + (1.0 - self.decay) * np.square(mean - loss)
        return mean, var, state[2] + 1

    def weight_loss(self, state: tuple, loss: float) -> float:
        c = 1.0 / (1 - self.decay ** state[2] + 1e-8)
        return np.clip((loss - state[0] * c) / np.sqrt(state[1] * c + 1e-8), -5, 5)

    def corrected_mean(self, state: tuple) -> float:
        return state[0] * (1.0 / (1 - self.decay ** state[2] + 1e-8))


class Oracle:
    """The reference's optimizer state and its two updates, for a dict of numpy tensors (iterated in sorted order).

    ``weights`` holds (weight ``[out, in]``, bias) pairs ``lstm``, ``rnn_to_ff``, ``rnn_to_in`` and the list ``ffmod``,
    and the vectors ``initial_from_lstm``, ``initial_from_mlp`` and the LSTM's initial ``(hidden, cell)``.
    """

    decays = np.asarray([0.5, 0.9, 0.99, 0.999, 0.9999])
    timescales = np.asarray([1, 3, 10, 30, 100, 300, 1000, 3000, 10000, 30000, 100000], dtype=np.float64)

    def __init__(self, weights: dict, params: dict[str, np.ndarray]) -> None:
        self.w, self.names = weights, sorted(params)
        n = len(self.names)
        self.params = {k: params[k] for k in self.names}
        self.mom = {k: np.zeros(params[k].shape + (5,)) for k in self.names}
        self.rms = {k: np.zeros(params[k].shape + (5,)) for k in self.names}
        self.iteration = 0
        self.hidden = np.tile(weights["lstm_init_state"][0], (n, 1))
        self.cell = np.tile(weights["lstm_init_state"][1], (n, 1))
        self.from_mlp = {k: weights["initial_from_mlp"] for k in self.names}
        self.from_lstm = weights["initial_from_lstm"]
        self.train_norm, self.valid_norm = _LossNormalizer(0.9), _LossNormalizer(0.95)
        self.train_loss_accum = self.valid_loss_accum = (0.0, 0.0, 0)
        self.clip_state = (1.0, 1.0 * (1 - 0.99))  # _DynamicGradientClipper.initial_state
        self.clipped = 0  # entries clipped so far, to know that a test exercised the clip
        self.loss_features: list[tuple[float, float]] = []

    @staticmethod
    def linear(layer: tuple[np.ndarray, np.ndarray], x: np.ndarray) -> np.ndarray:
        return x @ layer[0].T + layer[1]

    def validate(self, loss: float) -> None:
        self.valid_loss_accum = self.valid_norm.next_state(self.valid_loss_accum, loss)
        self.iteration += 1

    def _clip(self, grads: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        t, snd = self.clip_state
        clip_amount = (snd / (1 - 0.99**t)) * 10.0
        clipped = {k: np.clip(g, -clip_amount, clip_amount) for k, g in grads.items()}
        self.clipped += sum(int(np.sum(np.abs(g) > clip_amount)) for g in grads.values())
        avg_squared_mean = sum(np.mean(np.square(g)) for g in clipped.values()) / len(clipped)
        self.clip_state = (t + 1, snd * 0.99 + np.sqrt(1e-8 + avg_squared_mean) * (1.0 - 0.99))
        return clipped

    def _lstm_features(self, ms, rms, g, v, from_mlp, train_loss_feat, valid_loss_feat) -> np.ndarray:
        inputs = {}
        mean_ms = np.mean(ms)
        inputs["mean_ms_mag"], inputs["mean_ms_sign"] = _clip_log_abs(mean_ms), np.sign(mean_ms)
        inputs["var_ms"] = _clip_log_abs(np.mean(np.square(ms - mean_ms)))
        mean_rms = np.mean(rms)
        inputs["mean_rms"], inputs["mean_sign"] = _clip_log_abs(mean_rms), np.sign(mean_rms)
        inputs["var_rms"] = _clip_log_abs(np.mean(np.square(rms - mean_rms)))
        mean_v = np.mean(v)
        inputs["mean_v_mag"], inputs["mean_v_sign"] = _clip_log_abs(mean_v), np.sign(mean_v)
        inputs["var_v"] = _clip_log_abs(np.mean(np.square(v - mean_v)))
        inputs["norm_weight"] = _clip_log_abs(np.sqrt(np.sum(np.square(v))))
        inputs["g_norm"] = _clip_log_abs(np.sqrt(np.sum(np.square(g))))
        inputs["is_scalar"] = np.asarray(1.0 if v.ndim == 0 else -1.0)
        shape_stack = np.concatenate([np.asarray(v.shape, np.float64), np.ones(4 - v.ndim)])
        for j in range(4):
            inputs[f"shape_{j}"] = np.log(shape_stack)[j] - 1.0
        inputs["train_loss_feat"], inputs["valid_loss_feat"] = train_loss_feat, valid_loss_feat
        inputs["from_mlp"], inputs["from_lstm"] = from_mlp, self.from_lstm
        assert set(inputs) == set(LSTM_INPUTS)
        return np.concatenate([np.reshape(inputs[k], -1) for k in sorted(inputs)])

    def _mlp_features(self, m, rms, g, v, ff_inputs, num_tensors) -> np.ndarray:
        rows = int(np.prod(v.shape))
        flat_g, flat_v = g.reshape(-1, 1), v.reshape(-1, 1)
        rms, m = rms.reshape(rows, rms.shape[-1]), m.reshape(rows, m.shape[-1])
        rsqrt = 1.0 / np.sqrt(rms + 1e-6)
        inps = {"flat_g": flat_g, "flat_v": flat_v, "log_abs_v": np.log(np.abs(flat_v) + 1e-8), "m": m,
                "rms_scaled_g": m * rsqrt, "rms": rms, "rsqrt": rsqrt}
        inp = np.concatenate([inps[k] for k in sorted(inps)], axis=1)
        inp = inp / np.sqrt(1e-5 + np.mean(np.square(inp), axis=0, keepdims=True))
        step = np.sin(self.iteration / (self.timescales * np.pi))

        def tile(x):
            return np.tile(np.reshape(x, (1, -1)), (rows, 1))

        return np.concatenate([inp, tile(step), tile(np.log(float(num_tensors)) - 1.0),
                               tile(np.log(np.linalg.norm(flat_v) + 1e-8)), tile(np.log(float(rows))),
                               tile(ff_inputs)], axis=1)

    def train(self, grads: dict[str, np.ndarray], loss: float) -> None:
        next_train = self.train_norm.next_state(self.train_loss_accum, loss)
        train_loss_feat = self.train_norm.weight_loss(next_train, loss)
        valid_loss = self.valid_norm.corrected_mean(self.valid_loss_accum)
        valid_loss_feat = self.train_norm.weight_loss(next_train, valid_loss)
        self.loss_features.append((train_loss_feat, valid_loss_feat))
        grads = self._clip(grads)
        for k in self.names:
            self.mom[k] = self.decays * self.mom[k] + (1 - self.decays) * grads[k][..., None]
            self.rms[k] = self.decays * self.rms[k] + (1 - self.decays) * (grads[k] * grads[k])[..., None]
        rnn_inputs = np.stack([
            self._lstm_features(self.mom[k], self.rms[k], grads[k], self.params[k], self.from_mlp[k], train_loss_feat,
                                valid_loss_feat) for k in self.names])
        # haiku's LSTM: gates i, g, f, o of one linear of [x, h]; forget bias 1
        gated = self.linear(self.w["lstm"], np.concatenate([rnn_inputs, self.hidden], axis=1))
        i, g, f, o = np.split(gated, 4, axis=1)
        self.cell = _sigmoid(f + 1) * self.cell + _sigmoid(i) * np.tanh(g)
        self.hidden = lstm_out = _sigmoid(o) * np.tanh(self.cell)
        new_from_lstm = np.mean(self.linear(self.w["rnn_to_in"], lstm_out), axis=0)
        ff_inputs = self.linear(self.w["rnn_to_ff"], lstm_out)
        for row, k in enumerate(self.names):
            out = self._mlp_features(self.mom[k], self.rms[k], grads[k], self.params[k], ff_inputs[row],
                                     len(self.names))
            for layer, (weight, bias) in enumerate(self.w["ffmod"]):
                out = out @ weight.T + bias
                if layer < len(self.w["ffmod"]) - 1:
                    out = np.maximum(out, 0.0)
            step = out[:, 0:1] * np.exp(out[:, 1:2] * 0.001) * 0.001
            self.params[k] = self.params[k] - step.reshape(self.params[k].shape)
            self.from_mlp[k] = np.mean(out[:, 2:], axis=0)
        self.from_lstm = new_from_lstm
        self.train_loss_accum = next_train
        self.iteration += 1


def reference_weights(rule: RNNMLPLOptRule) -> dict:
    """The rule's weights as the oracle reads them (numpy float64)."""

    def pair(m: nn.Linear) -> tuple[np.ndarray, np.ndarray]:
        return m.weight.detach().numpy(), m.bias.detach().numpy()

    return {"lstm": pair(rule.lstm), "rnn_to_ff": pair(rule.lstm_to_mlp), "rnn_to_in": pair(rule.lstm_to_lstm),
            "ffmod": [pair(m) for m in rule.mlp if isinstance(m, nn.Linear)],
            "initial_from_lstm": rule.initial_from_lstm.detach().numpy(),
            "initial_from_mlp": rule.initial_from_mlp.detach().numpy(),
            "lstm_init_state": rule.initial_lstm.detach().numpy()}


def random_rule(seed: int = 0) -> RNNMLPLOptRule:
    """A float64 rule whose biases and learnable initial LSTM state are random too (haiku starts them at zero)."""
    rule = RNNMLPLOptRule(generator=torch.Generator().manual_seed(seed)).double()
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for name, p in rule.named_parameters():
            if name.endswith("bias") or name == "initial_lstm":
                p.copy_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return rule


@pytest.mark.parametrize("clipped", [False, True], ids=["unclipped", "clipped"])
def test_training_and_validation_steps_match_a_numpy_oracle_of_the_reference_on_every_rank(clipped: bool) -> None:
    rule = random_rule()
    g = torch.Generator().manual_seed(1)
    params = {name: torch.randn(shape, generator=g, dtype=torch.float64) for name, shape in SHAPES.items()}
    gradients = [{name: torch.randn(shape, generator=g, dtype=torch.float64) for name, shape in SHAPES.items()}
                 for _ in range(4)]
    if clipped:  # far above the running RMS: clipped at 10x it (step 0 clips at 10 too)
        gradients[0]["kernel"] = 30.0 * gradients[0]["kernel"]
        gradients[2]["weight"] = 1e3 * gradients[2]["weight"]
    losses = (2.5 + torch.rand(4, generator=g, dtype=torch.float64)).tolist()
    valid_losses = {0: 3.1, 2: 60.0}  # validation calls after training steps 0 and 2; the second one far off
    oracle = Oracle(reference_weights(rule), {k: v.numpy() for k, v in params.items()})
    state, ours = rule.init(params), params
    with torch.no_grad():
        for t, grads in enumerate(gradients):
            ours, state = rule.step(ours, grads, state, StepInfo(t, torch.tensor(losses[t], dtype=torch.float64)))
            oracle.train({k: v.numpy() for k, v in grads.items()}, losses[t])
            if t in valid_losses:
                before = {k: v for k, v in state.items() if k != "valid_loss" and k != "step"}
                state = rule.validate(state, torch.tensor(valid_losses[t], dtype=torch.float64))
                assert all(state[k] is v for k, v in before.items())  # only the statistics and the count move
                oracle.validate(valid_losses[t])
            assert int(state["step"]) == oracle.iteration
            for name, shape in SHAPES.items():
                assert ours[name].shape == shape and ours[name].dtype == torch.float64
                np.testing.assert_allclose(ours[name].numpy(), oracle.params[name], rtol=1e-10, atol=1e-13)
                moved, expected = (ours[name] - params[name]).numpy(), oracle.params[name] - params[name].numpy()
                np.testing.assert_allclose(moved, expected, rtol=1e-8, atol=1e-14)  # the steps, not only the sums
                np.testing.assert_allclose(state["mom"][name].numpy(), oracle.mom[name], rtol=1e-12, atol=1e-15)
                np.testing.assert_allclose(state["rms"][name].numpy(), oracle.rms[name], rtol=1e-12, atol=1e-15)
            np.testing.assert_allclose(state["lstm"][0].numpy(), oracle.hidden, rtol=1e-10, atol=1e-13)
            np.testing.assert_allclose(state["lstm"][1].numpy(), oracle.cell, rtol=1e-10, atol=1e-13)
            np.testing.assert_allclose(state["from_lstm"].numpy(), oracle.from_lstm, rtol=1e-10, atol=1e-13)
            np.testing.assert_allclose(state["from_mlp"].numpy(), np.stack([oracle.from_mlp[k] for k in SHAPES]),
                                       rtol=1e-10, atol=1e-13)
            np.testing.assert_allclose(state["train_loss"].numpy(), oracle.train_loss_accum, rtol=1e-13)
            np.testing.assert_allclose(state["valid_loss"].numpy(), oracle.valid_loss_accum, rtol=1e-13)
            np.testing.assert_allclose(state["clip"].numpy(), oracle.clip_state, rtol=1e-12)
    assert (oracle.clipped > 0) == clipped
    assert oracle.loss_features[-1][1] == 5.0  # the z-scored validation loss is clipped
    assert oracle.iteration == 6


def test_the_lstm_reads_its_inputs_in_the_references_sorted_order() -> None:
    """The 52 inputs of a tensor: the messages first, then the 18 tensor features by name; one feature moved at a
    time (by a sign flip of the mean parameter) changes exactly its own slot."""
    names = sorted(LSTM_INPUTS)
    assert names[:2] == ["from_lstm", "from_mlp"] and names[-3:] == ["var_ms", "var_rms", "var_v"]
    rule = random_rule()
    v, m = torch.full((3, 4), 0.7, dtype=torch.float64), torch.full((3, 4, 5), 0.2, dtype=torch.float64)
    r, g = torch.full((3, 4, 5), 0.3, dtype=torch.float64), torch.full((3, 4), 0.1, dtype=torch.float64)
    state = rule.init({"w": v})
    loss_features = torch.tensor([0.25, -0.5], dtype=torch.float64)
    x = rule._tensor_features(m, r, g, v, state["from_mlp"][0], state["from_lstm"], loss_features)
    assert x.shape == (52,)
    torch.testing.assert_close(x[:18], state["from_lstm"], rtol=0, atol=0)
    torch.testing.assert_close(x[18:34], state["from_mlp"][0], rtol=0, atol=0)
    slot = {name: 34 + i for i, name in enumerate(names[2:])}
    assert x[slot["train_loss_feat"]] == 0.25 and x[slot["valid_loss_feat"]] == -0.5
    assert x[slot["is_scalar"]] == -1.0 and x[slot["shape_0"]] == math.log(3) - 1 and x[slot["shape_2"]] == -1.0
    assert x[slot["mean_v_sign"]] == 1.0
    assert x[slot["mean_v_mag"]].item() == pytest.approx(math.log(1e-8 + 0.7), rel=1e-15)
    flipped = rule._tensor_features(m, r, g, -v, state["from_mlp"][0], state["from_lstm"], loss_features)
    assert (flipped != x).nonzero().flatten().tolist() == [slot["mean_v_sign"]]


def test_meta_gradients_match_finite_differences_in_float64() -> None:
    """d/dφ Σ_t f(θ_t) through a 3-step unroll (second order), against central differences along random directions.

    The inner loop gives the rule its losses detached, so the LSTM's weights on the two loss features start at zero:
    then the function the differences see is the one autograd differentiates (their own gradient is still checked).
    """
    rule = random_rule()
    with torch.no_grad():  # steps large enough that the losses depend visibly on the weights
        [m for m in rule.mlp if isinstance(m, nn.Linear)][-1].weight.mul_(100.0)
        for name in ("train_loss_feat", "valid_loss_feat"):
            rule.lstm.weight[:, sorted(LSTM_INPUTS).index(name) + 34 - 2].zero_()
    assert_meta_gradients_match_finite_differences(rule)


# --------------------------------------------------------------------------------------------------------------------
# The torch.optim optimizer.


SHARED = ("from_lstm", "train_loss", "valid_loss", "clip", "step")


def assert_same_state(opt: RNNMLPOptimizer, model: nn.Module, state: dict) -> None:
    """The optimizer's state is the rule's: per parameter (in the model's order) and shared."""
    for i, (name, p) in enumerate(model.named_parameters()):
        row = opt.state[p]
        assert torch.equal(row["mom"], state["mom"][name]) and torch.equal(row["rms"], state["rms"][name]), name
        assert torch.equal(row["from_mlp"], state["from_mlp"][i]), name
        assert torch.equal(row["lstm"], torch.stack([state["lstm"][0][i], state["lstm"][1][i]])), name
    for key in SHARED:
        assert torch.equal(opt.state["shared"][key], state[key]), key


@pytest.mark.parametrize("mode", ["loss", "closure"])
def test_the_torch_optimizer_makes_the_rules_own_steps_on_every_rank(mode: str) -> None:
    model, x = model_with_every_rank(), torch.randn(6, 1, 4, 4, dtype=torch.float64)
    assert sorted(p.dim() for p in model.parameters()) == [0, 1, 1, 2, 4]
    rule = random_rule()
    params = {name: p.detach().clone() for name, p in model.named_parameters()}
    state = rule.init(params)
    opt = RNNMLPOptimizer(model.parameters(), rule=rule)
    assert opt.steps == 0
    for t in range(4):
        leaves = {name: p.requires_grad_() for name, p in params.items()}
        loss = torch.func.functional_call(model, leaves, (x,)).square().mean()
        grads = dict(zip(leaves, torch.autograd.grad(loss, list(leaves.values()))))
        with torch.no_grad():
            params, state = rule.step(leaves, grads, state, StepInfo(t, loss.detach()))

        def closure() -> torch.Tensor:
            opt.zero_grad()
            value = model(x).square().mean()
            value.backward()
            return value

        if mode == "closure":
            returned = opt.step(closure)
            assert returned.requires_grad and torch.equal(returned.detach(), loss.detach())
        else:
            assert opt.step(loss=closure()) is None
        assert opt.steps == t + 1
    for name, p in model.named_parameters():
        assert torch.equal(p, params[name]), name
    assert_same_state(opt, model, state)
    assert int(state["train_loss"][2]) == 4 and state["train_loss"][0] != 0


def test_observe_validation_moves_only_the_validation_statistics_and_the_step_count() -> None:
    model, x = model_with_every_rank(), torch.randn(6, 1, 4, 4, dtype=torch.float64)
    rule = random_rule()
    opt = RNNMLPOptimizer(model.parameters(), rule=rule)
    opt.observe_validation(2.5)  # before any step: the shared state starts fresh
    assert opt.steps == 1 and int(opt.state["shared"]["valid_loss"][2]) == 1
    opt.zero_grad()
    loss = model(x).square().mean()
    loss.backward()
    opt.step(loss=loss)
    before = copy.deepcopy({"params": [p.detach() for p in model.parameters()],
                            "state": [opt.state[p] for p in model.parameters()], "shared": opt.state["shared"]})
    opt.observe_validation(torch.tensor(1.75, dtype=torch.float64))
    expected = rule.validate(before["shared"], torch.tensor(1.75, dtype=torch.float64))
    assert opt.steps == 3
    for p, b in zip(model.parameters(), before["params"]):
        assert torch.equal(p, b)
    for p, row in zip(model.parameters(), before["state"]):
        assert row.keys() == opt.state[p].keys() and all(torch.equal(opt.state[p][k], v) for k, v in row.items())
    for key in SHARED:
        assert torch.equal(opt.state["shared"][key], expected[key]), key
        assert torch.equal(opt.state["shared"][key], before["shared"][key]) == (key not in ("valid_loss", "step"))


def test_the_loss_is_optional_and_parameters_without_gradient_keep_their_value_and_state() -> None:
    model, x = model_with_every_rank(), torch.randn(6, 1, 4, 4, dtype=torch.float64)
    rule = random_rule()
    opt = RNNMLPOptimizer(model.parameters(), rule=rule)
    assert opt.step() is None and opt.steps == 0 and not opt.state  # no gradients yet: nothing moves
    opt.zero_grad()
    loss = model(x).square().mean()
    loss.backward()
    with pytest.raises(ValueError, match="a closure or a loss, not both"):
        opt.step(lambda: loss, loss=loss)
    assert opt.steps == 0
    opt.step(loss=loss)
    trained = copy.deepcopy(opt.state["shared"]["train_loss"])

    # no loss: the rule's step with loss features 0, and the training statistics unchanged
    opt.zero_grad()
    model(x).square().mean().backward()
    names = [name for name, _ in model.named_parameters()]
    state = {"mom": {n: opt.state[p]["mom"] for n, p in zip(names, model.parameters())},
             "rms": {n: opt.state[p]["rms"] for n, p in zip(names, model.parameters())},
             "from_mlp": torch.stack([opt.state[p]["from_mlp"] for p in model.parameters()]),
             "lstm": tuple(torch.stack([opt.state[p]["lstm"][i] for p in model.parameters()]) for i in range(2)),
             **opt.state["shared"]}
    with torch.no_grad():
        expected, state = rule.step(dict(model.named_parameters()), {n: p.grad for n, p in model.named_parameters()},
                                    state, StepInfo(1))
    assert opt.step() is None
    assert torch.equal(opt.state["shared"]["train_loss"], trained) and opt.steps == 2
    for name, p in model.named_parameters():
        assert torch.equal(p, expected[name]), name
    assert_same_state(opt, model, state)

    # a parameter without gradient: its value and state stay; the others step as a model without it
    frozen = model.head.bias
    value, row = frozen.detach().clone(), copy.deepcopy(opt.state[frozen])
    opt.zero_grad()
    loss = model(x).square().mean()
    loss.backward()
    frozen.grad = None
    opt.step(loss=loss)
    assert torch.equal(frozen, value) and opt.steps == 3
    assert all(torch.equal(opt.state[frozen][k], v) for k, v in row.items())
    new = nn.Linear(2, 2).double()
    new.bias.requires_grad_(False)
    fresh = RNNMLPOptimizer(new.parameters(), rule=rule)
    new(torch.randn(3, 2, dtype=torch.float64)).sum().backward()
    fresh.step()
    assert new.bias not in fresh.state and fresh.steps == 1


def test_state_dict_round_trip_mid_run_continues_identically() -> None:
    rule, data = random_rule(), torch.randn(6, 8, 1, 4, 4, dtype=torch.float64)

    def train(model: nn.Module, opt: RNNMLPOptimizer, batches: torch.Tensor) -> None:
        for i, x in enumerate(batches):
            opt.zero_grad()
            loss = model(x).square().mean()
            loss.backward()
            opt.step(loss=loss)
            if i == 1:
                opt.observe_validation(loss.detach() + 0.5)

    model = model_with_every_rank()
    opt = RNNMLPOptimizer(model.parameters(), rule=rule)
    train(model, opt, data[:3])
    assert opt.steps == 4
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    in_memory = (copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict()))
    train(model, opt, data[3:])

    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    for model_state, opt_state in [(saved["model"], saved["opt"]), in_memory]:
        resumed = model_with_every_rank()
        resumed.load_state_dict(model_state)
        opt2 = RNNMLPOptimizer(resumed.parameters(), rule=rule)
        opt2.load_state_dict(opt_state)
        assert opt2.steps == 4 and int(opt2.state["shared"]["valid_loss"][2]) == 1
        assert opt2.state[resumed.conv.weight]["mom"].shape == (2, 1, 3, 3, 5)
        assert opt2.state[resumed.scale]["lstm"].shape == (2, 64)
        train(resumed, opt2, data[3:])
        assert opt2.steps == opt.steps == 8
        for a, b in zip(model.parameters(), resumed.parameters()):
            assert torch.equal(a, b)
        for key in SHARED:
            assert torch.equal(opt.state["shared"][key], opt2.state["shared"][key]), key


def test_the_lr_multiplier_scales_the_step_exactly() -> None:
    rule = random_rule()
    x = torch.randn(6, 1, 4, 4, dtype=torch.float64)
    runs = {}
    for lr in (1.0, 0.5, 0.0):
        model = model_with_every_rank()
        opt = RNNMLPOptimizer(model.parameters(), rule=rule, lr=lr)
        start = [p.detach().clone() for p in model.parameters()]
        loss = model(x).square().mean()
        loss.backward()
        opt.step(loss=loss)
        runs[lr] = ([p.detach() - s for p, s in zip(model.parameters(), start)], opt)
    for full, half, none in zip(runs[1.0][0], runs[0.5][0], runs[0.0][0]):
        assert full.abs().max() > 0 and torch.equal(none, torch.zeros_like(none))
        torch.testing.assert_close(half, 0.5 * full, rtol=1e-9, atol=1e-16)
    for key in SHARED:  # the rule's state does not depend on the multiplier
        assert torch.equal(runs[0.5][1].state["shared"][key], runs[1.0][1].state["shared"][key])


def test_rule_and_checkpoint_exclude_each_other_and_bad_checkpoints_and_ranks_are_named(tmp_path) -> None:
    with pytest.raises(ValueError, match="exactly one of them; got \\[.rule., .checkpoint.\\]"):
        RNNMLPOptimizer([torch.zeros(2)], rule=RNNMLPLOptRule(), checkpoint=tmp_path / "best.pt")
    with pytest.raises(ValueError, match="exactly one of them; got none"):
        RNNMLPOptimizer([torch.zeros(2)])
    with pytest.raises(CheckpointError, match=f"checkpoint {tmp_path / 'nope.pt'} does not exist"):
        RNNMLPOptimizer([torch.zeros(2)], checkpoint=tmp_path / "nope.pt")
    (tmp_path / "corrupt.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match=f"checkpoint {tmp_path / 'corrupt.pt'} cannot be read"):
        RNNMLPOptimizer([torch.zeros(2)], checkpoint=tmp_path / "corrupt.pt")
    with pytest.raises(ValueError, match="at least one parameter"):
        RNNMLPLOptRule().init({})
    with pytest.raises(ValueError, match="parameter 'video' has rank 5"):
        RNNMLPLOptRule().init({"w": torch.zeros(2), "video": torch.zeros(1, 1, 1, 1, 2)})
    five = nn.Parameter(torch.zeros(1, 1, 1, 1, 2))
    with pytest.raises(ValueError, match="^parameter 1 of parameter group 0 has rank 5; the rule's shape features"):
        RNNMLPOptimizer([torch.zeros(2, requires_grad=True), five], rule=RNNMLPLOptRule())
    with pytest.raises(ValueError, match="^parameter video has rank 5"):
        RNNMLPOptimizer([("w", nn.Parameter(torch.zeros(2))), ("video", five)], rule=RNNMLPLOptRule())
    opt = RNNMLPOptimizer([torch.zeros(2, requires_grad=True)], rule=RNNMLPLOptRule())
    with pytest.raises(ValueError, match="^parameter 0 of parameter group 1 has rank 5"):
        opt.add_param_group({"params": [five]})
    assert len(opt.param_groups) == 1  # the refused group is not kept
    with pytest.raises(ValueError, match="validation_every must be >= 0"):
        RNNMLPLOptRule(validation_every=-1)


# --------------------------------------------------------------------------------------------------------------------
# Registered options, validation losses through the inner loop, meta-training.


class Parabola(Optimizee):
    """f(x) = Σ (x - 1)²; held-out loss Σ (x - 2)² (or none), recording where the inner loop asked for it."""

    def __init__(self, held_out: bool = True) -> None:
        self.held_out, self.asked = held_out, []

    def init_params(self) -> dict[str, torch.Tensor]:
        return {"x": torch.linspace(-1, 1, 6, dtype=torch.float64).reshape(2, 3),
                "b": torch.zeros(2, dtype=torch.float64)}

    def loss(self, params: dict[str, torch.Tensor], step: int) -> torch.Tensor:
        del step
        return (params["x"] - 1).square().sum() + params["b"].square().sum()

    def validation_loss(self, params: dict[str, torch.Tensor], step: int) -> torch.Tensor | None:
        self.asked.append((step, params["x"].detach().clone()))
        return (params["x"] - 2).square().sum() if self.held_out else None


def test_registered_options_build_the_learner_and_validation_losses_reach_the_rule() -> None:
    found = entry("algorithm", "rnn-mlp-lopt")
    assert found.options is RNNMLPLOptOptions and found.problems == "optimizees"
    context = BuildContext(None, Quadratics(dim=4, batch=3).sample(seed=0))
    learner, estimator = found.build(RNNMLPLOptOptions(lstm_hidden=8, hidden_size=16, exp_mult=0.01, horizon=6,
                                                       truncation=3, validation_every=2), context)
    assert isinstance(learner, OptimizerLearner) and isinstance(estimator, TruncatedBackprop)
    rule = learner.rule
    assert isinstance(rule, RNNMLPLOptRule)
    assert (rule.exp_mult, rule.step_mult, rule.validation_every) == (0.01, 1e-3, 2)
    assert (rule.lstm.in_features, rule.lstm.out_features, rule.lstm_to_mlp.in_features) == (52 + 8, 32, 8)
    assert [m.out_features for m in rule.mlp if isinstance(m, nn.Linear)] == [16, 16, 18]
    assert (learner.horizon, estimator.truncation, learner.inner.first_order) == (6, 3, True)
    rule.double()

    problem = Parabola()
    with torch.no_grad():
        trajectory = learner.inner.unroll(problem, problem.init_params(), 5)
    state = trajectory.state
    assert [step for step, _ in problem.asked] == [1, 3]  # after every 2nd step, on the parameters it produced
    assert all(torch.equal(x, trajectory.params[step + 1]["x"]) for step, x in problem.asked)
    assert int(state["step"]) == 7 and int(state["valid_loss"][2]) == 2
    valid = [(x - 2).square().sum() for _, x in problem.asked]
    mean = 0.05 * valid[0] * 0.95 + 0.05 * valid[1]
    torch.testing.assert_close(state["valid_loss"][0], mean, rtol=1e-12, atol=0)

    silent = Parabola(held_out=False)
    with torch.no_grad():
        quiet = learner.inner.unroll(silent, silent.init_params(), 5).state
    assert len(silent.asked) == 2  # asked, but the problem has no held-out loss: nothing changes
    assert int(quiet["step"]) == 5 and torch.equal(quiet["valid_loss"], torch.zeros(3, dtype=torch.float64))
    assert not torch.equal(quiet["from_lstm"], state["from_lstm"])  # the validation losses steered the other run

    rule.validation_every = 0
    never = Parabola()
    with torch.no_grad():
        assert int(learner.inner.unroll(never, never.init_params(), 5).state["step"]) == 5
    assert never.asked == []


def test_meta_training_through_the_trainer_lowers_the_loss_and_the_checkpoint_loads(tmp_path) -> None:
    """The registered algorithm, TruncatedBackprop and MetaTrainer: the trained rule beats its start on held-out
    quadratics; RNNMLPOptimizer(checkpoint=...) runs the trained rule; another algorithm's checkpoint is refused."""
    learner = assert_meta_training_halves_the_loss("rnn-mlp-lopt", tmp_path / "rnn")
    assert isinstance(learner.rule, RNNMLPLOptRule)

    model = torch.nn.Linear(2, 1)
    opt = RNNMLPOptimizer(model.parameters(), checkpoint=tmp_path / "rnn" / "last.pt")
    for (name, a), b in zip(opt.rule.state_dict().items(), learner.rule.state_dict().values()):
        assert torch.equal(a, b), name
    model(torch.randn(4, 2)).square().mean().backward()
    weight = model.weight.detach().clone()
    opt.step()
    assert not torch.equal(model.weight, weight) and opt.steps == 1
    with pytest.raises(CheckpointError, match="holds a MLPLOptRule rule, not an RNNMLPLOptRule"):
        RNNMLPOptimizer([torch.zeros(2)], checkpoint=one_iteration_checkpoint("mlp-lopt", tmp_path / "mlp",
                                                                              hidden_size=4))
