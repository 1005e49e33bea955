"""The hierarchical learned optimizer of Metz et al. 2020: a per-tensor LSTM steering a per-parameter MLP.

learned_optimization's ``RNNMLPLOpt`` (``learned_optimizers/rnn_mlp_lopt.py``, which cites
arXiv 2009.11243 for it), written out in PyTorch. At every training step, for the tensors
``v_1..v_n`` of the optimizee with gradients ``g_i``:

1. **Dynamic gradient clipping**: every gradient is clipped to ±10 · r / (1 - 0.99^k), r a running
   (α = 0.99) mean of ``sqrt(mean over tensors of mean(g²))`` of the clipped gradients, k its count.
2. **Accumulators** at decays (0.5, 0.9, 0.99, 0.999, 0.9999): momenta ``m ← β m + (1-β) g`` and
   second moments ``r ← β r + (1-β) g²``.
3. **Loss features**: the training loss through an EMA normaliser (decay 0.9, bias-corrected,
   z-scored, clipped to ±5); the validation loss, the bias-corrected mean of its own EMA (decay 0.95),
   z-scored with the *training* statistics as the reference does. Validation batches
   (:meth:`RNNMLPLOptRule.validate`) update only the validation EMA (and the step count).
4. **Per-tensor LSTM** (hidden 64, haiku's gates with forget bias +1) over 52 inputs per tensor:
   18 tensor features (log|·| clipped to [-5, 5] of the mean and variance of m, of r and of v, of
   ``‖v‖`` and ``‖g‖``; signs of the means; an is-scalar flag; ``log`` of the four shape dimensions
   − 1; the two loss features), the tensor's 16-d message from the MLP of the last step and the
   18-d message of all tensors (DeepSets: the mean over tensors of a linear map of the LSTM outputs).
5. **Per-parameter MLP** (2 × 32, ReLU, 2 + 16 outputs) over 54 inputs per coordinate: g, v,
   log|v|, m, r, m·rsqrt(r + 1e-6), rsqrt(r + 1e-6) (in that order), all scaled by their second moment over the
   tensor; sin(t / (τπ)) for τ in 1, 3, ..., 1e5; log(number of tensors) − 1, log‖v‖, log(size);
   and a 17-d linear map of the tensor's LSTM output. The step is ``d · exp(1e-3 · m) · 1e-3``
   with (d, m) the first two outputs; the mean over the tensor of the other 16 is its next message.

Inputs are in the reference's order (its features are sorted by name), and the initialisation is
haiku's (truncated normal of std ``1/sqrt(fan_in)``, zero biases; the learnable initial messages
from ``VarianceScaling``; the LSTM's learnable initial state zero).

What is not matched, and why: the reference requires a loss at every step; :class:`RNNMLPOptimizer`
accepts ``step()`` without one (then the loss features are 0, the value at the running mean, and
the normaliser is not updated), because ``torch.optim`` makes the loss optional. The reference's
``jax.lax.cond`` between the training and validation paths is two methods here. The validation
loss enters the meta-gradient as a constant (it is detached: the reference differentiates through
it under backpropagation, which none of its ES / PES training runs use). Tensors of rank above 4
are refused (the reference's shape feature has four slots).

Results (paper vs ours; commands and protocol in the README): meta-trained by PES for 30 CPU
minutes on the task suite's five training families (``metaopt train --preset rnn-mlp-lopt-suite-pes``),
then on 20 tasks of four held-out families against Adam tuned over 14 learning rates per task:

    ==============================  ==============================  ==============================
    claim                           paper (thousands of tasks)      metaopt (30 CPU-min, 5 families)
    ==============================  ==============================  ==============================
    beats lr-tuned Adam             on most held-out tasks          8/20 at T = 200, 3/20 at 4T
    speed-up over tuned Adam        > 1 on most tasks               median 0.56 at T, 0.24 at 4T
    self-training                   comparable to Adam              comparable (best 0.909 vs 0.894)
    ==============================  ==============================  ==============================

Reference:
    Metz, Maheswaranathan, Freeman, Poole, Sohl-Dickstein, 2020. Tasks, stability, architecture,
    and compute: training more effective learned optimizers, and using them to train themselves.
    https://arxiv.org/abs/2009.11243 (§3.1, Appendix B)

Example:
    >>> import torch
    >>> rule = RNNMLPLOptRule(generator=torch.Generator().manual_seed(0))
    >>> params = {"w": torch.randn(3, 2), "b": torch.zeros(3), "scale": torch.tensor(1.0)}
    >>> state = rule.init(params)
    >>> tuple(state["lstm"][0].shape), tuple(state["mom"]["w"].shape)   # one LSTM row per tensor
    ((3, 64), (3, 2, 5))
    >>> grads = {name: torch.ones_like(p) for name, p in params.items()}
    >>> new, state = rule.step(params, grads, state, StepInfo(0, torch.tensor(2.3)))
    >>> state = rule.validate(state, torch.tensor(2.4))    # a validation batch: statistics only
    >>> int(state["step"]), tuple(new["scale"].shape)
    (2, ())
    >>> model = torch.nn.Linear(4, 1)                       # the same rule in a plain PyTorch loop
    >>> opt = RNNMLPOptimizer(model.parameters(), rule=rule)
    >>> for _ in range(3):
    ...     opt.zero_grad()
    ...     loss = model(torch.randn(8, 4)).square().mean()
    ...     loss.backward()
    ...     opt.step(loss=loss)
    >>> opt.observe_validation(torch.tensor(0.5)); opt.steps
    4
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from metaopt.algorithms.mlp_lopt import haiku_linear, haiku_mlp, second_moment_normalize
from metaopt.engine.coordinatewise import by_chunks
from metaopt.engine.functional import Params
from metaopt.engine.optimizer_learner import OptimizerLearner
from metaopt.engine.rule_optimizer import RuleOptimizer, add_update, one_source
from metaopt.engine.rules import StepInfo, UpdateRule
from metaopt.estimators.base import Estimator
from metaopt.estimators.unroll_options import UnrollOptions, estimator_of
from metaopt.registry import BuildContext, register_algorithm
from metaopt.training.experiment import load_rule

__all__ = ["DECAYS", "RNNMLPLOptOptions", "RNNMLPLOptRule", "RNNMLPOptimizer", "build_rnn_mlp_lopt"]

#: Decays of the momenta and second moments (the reference's ``decays``).
DECAYS = (0.5, 0.9, 0.99, 0.999, 0.9999)
#: Timescales of the step's sine embedding ``sin(t / (τπ))``.
TIMESCALES = (1, 3, 10, 30, 100, 300, 1000, 3000, 10000, 30000, 100000)
#: Tensor features of the LSTM besides the two messages, and per-coordinate features of the MLP besides the LSTM's.
TENSOR_FEATURES, COORDINATE_FEATURES = 18, 37
#: EMA decays of the training and validation loss normalisers, and the clip of the normalised loss.
TRAIN_DECAY, VALID_DECAY, LOSS_CLIP = 0.9, 0.95, 5.0
#: Running-RMS decay of the dynamic gradient clip and its multiple.
CLIP_DECAY, CLIP_MULT = 0.99, 10.0


def _clip_log_abs(x: torch.Tensor) -> torch.Tensor:
    return torch.log(1e-8 + x.abs()).clamp(-5.0, 5.0)


def _normaliser_update(stats: torch.Tensor, loss: torch.Tensor, decay: float) -> torch.Tensor:
    """The EMA ``[mean, var, updates]`` after ``loss`` (the reference's ``_LossNormalizer.next_state``)."""
    mean = decay * stats[0] + (1 - decay) * loss
    var = decay * stats[1] + (1 - decay) * (mean - loss).square()
    return torch.stack([mean, var, stats[2] + 1])


def _corrected(stats: torch.Tensor, decay: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The bias-corrected mean and variance of an EMA ``[mean, var, updates]``."""
    c = 1.0 / (1 - decay ** stats[2] + 1e-8)
    return stats[0] * c, stats[1] * c


def _normalised(stats: torch.Tensor, loss: torch.Tensor, decay: float) -> torch.Tensor:
    """``loss`` z-scored with the EMA ``stats`` and clipped to ±5 (``_LossNormalizer.weight_loss``)."""
    mean, var = _corrected(stats, decay)
    return ((loss - mean) * torch.rsqrt(var + 1e-8)).clamp(-LOSS_CLIP, LOSS_CLIP)


class RNNMLPLOptRule(UpdateRule):
    """learned_optimization's ``RNNMLPLOpt`` as an update rule (see the module docs).

    The state is a dict: per tensor ``mom`` and ``rms`` (``[*shape, 5]``) and ``from_mlp``
    (``[n, 16]``); the LSTM state ``lstm`` (h, c ``[n, 64]``), ``from_lstm`` (``[18]``), the loss
    EMAs ``train_loss`` / ``valid_loss`` (``[mean, var, updates]``), the gradient clip ``clip``
    (``[count, running rms]``) and the step count ``step`` (training and validation calls).

    Args:
        hidden_size, hidden_layers: the per-parameter MLP (32, 2).
        lstm_hidden: units of the per-tensor LSTM (64).
        from_mlp_size: the MLP's message to its tensor's LSTM (16).
        from_lstm_size: the message averaged over tensors (18).
        lstm_to_mlp: the LSTM's projection into each coordinate's MLP inputs (17).
        exp_mult, step_mult: the step ``d · exp(exp_mult · m) · step_mult`` (1e-3, 1e-3).
        validation_every: read the problem's validation loss after every this many steps (0: never).
        generator: random generator of the initial weights.
    """

    def __init__(self, hidden_size: int = 32, hidden_layers: int = 2, lstm_hidden: int = 64, from_mlp_size: int = 16,
                 from_lstm_size: int = 18, lstm_to_mlp: int = 17, exp_mult: float = 1e-3, step_mult: float = 1e-3,
                 validation_every: int = 0, generator: torch.Generator | None = None) -> None:
        super().__init__()
        if validation_every < 0:
            raise ValueError(f"validation_every must be >= 0 (0: no validation losses), got {validation_every}")
        self.exp_mult, self.step_mult, self.validation_every = exp_mult, step_mult, validation_every
        self.lstm_hidden = lstm_hidden
        self.initial_from_lstm = nn.Parameter(_variance_scaling(from_lstm_size, generator))
        self.initial_from_mlp = nn.Parameter(_variance_scaling(from_mlp_size, generator))
        self.initial_lstm = nn.Parameter(torch.zeros(2, lstm_hidden))  # haiku's LSTM starts at zero; learnable
        self.lstm = haiku_linear(TENSOR_FEATURES + from_lstm_size + from_mlp_size + lstm_hidden, 4 * lstm_hidden,
                                 generator)
        self.lstm_to_mlp = haiku_linear(lstm_hidden, lstm_to_mlp, generator)
        self.lstm_to_lstm = haiku_linear(lstm_hidden, from_lstm_size, generator)
        self.mlp = haiku_mlp([COORDINATE_FEATURES + lstm_to_mlp] + [hidden_size] * hidden_layers
                             + [2 + from_mlp_size], generator)

    @classmethod
    def from_checkpoint(cls, path: str | Path) -> RNNMLPLOptRule:
        """The rule of a checkpoint of a trained ``rnn-mlp-lopt`` run (``best.pt`` or ``last.pt``), on the CPU.

        Raises:
            CheckpointError: naming ``path``: missing, corrupt, or not of a run of this rule.
        """
        return load_rule(path, cls)

    def init(self, params: Params) -> dict[str, Any]:
        """Zero accumulators and statistics, the learned initial messages and LSTM state, the step count 0."""
        if not params:
            raise ValueError("RNNMLPLOptRule needs at least one parameter to optimize")
        for name, p in params.items():
            check_rank(repr(name), p)
        first = next(iter(params.values()))
        n, zeros = len(params), first.new_zeros(3)
        return {"mom": {k: p.new_zeros(*p.shape, len(DECAYS)) for k, p in params.items()},
                "rms": {k: p.new_zeros(*p.shape, len(DECAYS)) for k, p in params.items()},
                "from_mlp": self.initial_from_mlp.to(first.dtype).expand(n, -1),
                "lstm": tuple(self.initial_lstm[i].to(first.dtype).expand(n, -1) for i in range(2)),
                "from_lstm": self.initial_from_lstm.to(first.dtype),
                "train_loss": zeros, "valid_loss": zeros,
                "clip": torch.stack([first.new_ones(()), first.new_full((), 1 - CLIP_DECAY)]),
                "step": torch.zeros((), dtype=torch.long, device=first.device)}

    def validate(self, state: dict[str, Any], loss: torch.Tensor) -> dict[str, Any]:
        """The state after a validation loss: its EMA (decay 0.95) and the step count move, nothing else."""
        loss = loss.to(state["valid_loss"].dtype)
        return {**state, "valid_loss": _normaliser_update(state["valid_loss"], loss, VALID_DECAY),
                "step": state["step"] + 1}

    def step(self, params: Params, grads: Params, state: dict[str, Any], info: StepInfo,
             ) -> tuple[Params, dict[str, Any]]:
        """One training step of every tensor; differentiable in the rule's weights, θ and the state."""
        names = list(params)
        train_loss, loss_features = self._loss_features(state, info.loss)
        clip, grads = self._clip(state["clip"], [grads[k] for k in names])
        decays = torch.tensor(DECAYS, dtype=grads[0].dtype, device=grads[0].device)
        mom = [decays * state["mom"][k] + (1 - decays) * g.unsqueeze(-1) for k, g in zip(names, grads)]
        rms = [decays * state["rms"][k] + (1 - decays) * g.square().unsqueeze(-1) for k, g in zip(names, grads)]
        values = [params[k] for k in names]
        features = torch.stack([
            self._tensor_features(m, r, g, v, message, state["from_lstm"], loss_features)
            for m, r, g, v, message in zip(mom, rms, grads, values, state["from_mlp"])])
        h, c = self._lstm(features, state["lstm"])
        to_mlp = self.lstm_to_mlp(h)
        inputs = [self._coordinate_features(m, r, g, v, to_mlp[i], state["step"], len(names))
                  for i, (m, r, g, v) in enumerate(zip(mom, rms, grads, values))]
        outputs = by_chunks(self.mlp, torch.cat(inputs)).split([v.numel() for v in values])
        new_params, messages = {}, []
        for name, v, out in zip(names, values, outputs):
            step = out[:, 0] * torch.exp(out[:, 1] * self.exp_mult) * self.step_mult
            new_params[name] = v - step.reshape(v.shape)
            messages.append(out[:, 2:].mean(dim=0))
        return new_params, {"mom": dict(zip(names, mom)), "rms": dict(zip(names, rms)),
                            "from_mlp": torch.stack(messages), "lstm": (h, c),
                            "from_lstm": self.lstm_to_lstm(h).mean(dim=0), "train_loss": train_loss,
                            "valid_loss": state["valid_loss"], "clip": clip, "step": state["step"] + 1}

    def _loss_features(self, state: dict[str, Any], loss: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The training EMA after ``loss`` and the normalised training and validation losses ``[2]``."""
        stats = state["train_loss"]
        if loss is None:  # torch.optim without a loss: the value at the running mean, statistics unchanged
            return stats, stats.new_zeros(2)
        stats = _normaliser_update(stats, loss.to(stats.dtype), TRAIN_DECAY)
        valid_mean, _ = _corrected(state["valid_loss"], VALID_DECAY)
        return stats, torch.stack([_normalised(stats, loss.to(stats.dtype), TRAIN_DECAY),
                                   _normalised(stats, valid_mean, TRAIN_DECAY)])

    @staticmethod
    def _clip(clip: torch.Tensor, grads: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Gradients clipped at 10x the running RMS, and the clip's next ``[count, rms]``."""
        count, running = clip[0], clip[1]
        bound = running / (1 - CLIP_DECAY**count) * CLIP_MULT
        clipped = [torch.maximum(torch.minimum(g, bound), -bound) for g in grads]
        rms = torch.sqrt(1e-8 + sum(g.square().mean() for g in clipped) / len(clipped))
        return torch.stack([count + 1, running * CLIP_DECAY + rms * (1 - CLIP_DECAY)]), clipped

    @staticmethod
    def _tensor_features(m: torch.Tensor, r: torch.Tensor, g: torch.Tensor, v: torch.Tensor, from_mlp: torch.Tensor,
                         from_lstm: torch.Tensor, loss_features: torch.Tensor) -> torch.Tensor:
        """The LSTM's 52 inputs of one tensor, in the reference's (name-sorted) order."""
        mean_m, mean_r, mean_v = m.mean(), r.mean(), v.mean()
        shape = list(v.shape) + [1] * (4 - v.dim())
        scalars = [_clip_log_abs(g.norm()), v.new_tensor(1.0 if v.dim() == 0 else -1.0),
                   _clip_log_abs(mean_m), torch.sign(mean_m), _clip_log_abs(mean_r), torch.sign(mean_r),
                   _clip_log_abs(mean_v), torch.sign(mean_v), _clip_log_abs(v.norm()),
                   *(v.new_tensor(math.log(d) - 1.0) for d in shape), loss_features[0], loss_features[1],
                   _clip_log_abs((m - mean_m).square().mean()), _clip_log_abs((r - mean_r).square().mean()),
                   _clip_log_abs((v - mean_v).square().mean())]
        return torch.cat([from_lstm, from_mlp, torch.stack(scalars)])

    @staticmethod
    def _coordinate_features(m: torch.Tensor, r: torch.Tensor, g: torch.Tensor, v: torch.Tensor,
                             from_lstm: torch.Tensor, step: torch.Tensor, tensors: int) -> torch.Tensor:
        """The MLP's inputs of every coordinate of one tensor, ``[numel, 54]``."""
        rows = v.numel()
        m, r = m.reshape(rows, -1), r.reshape(rows, -1)
        rsqrt = torch.rsqrt(r + 1e-6)
        flat_g, flat_v = g.reshape(rows, 1), v.reshape(rows, 1)
        x = second_moment_normalize(torch.cat([flat_g, flat_v, torch.log(flat_v.abs() + 1e-8), m, r, m * rsqrt,
                                               rsqrt], dim=1))
        t = step.to(v.dtype)
        timescales = torch.tensor(TIMESCALES, dtype=v.dtype, device=v.device)
        tiled = torch.cat([torch.sin(t / (timescales * math.pi)),
                           torch.stack([v.new_tensor(math.log(tensors) - 1.0), torch.log(v.norm() + 1e-8),
                                        v.new_tensor(math.log(rows))]), from_lstm])
        return torch.cat([x, tiled.expand(rows, -1)], dim=1)

    def _lstm(self, x: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """haiku's ``LSTM``: gates (i, g, f, o) of one linear map of [x, h]; forget bias +1."""
        h, c = state
        i, g, f, o = self.lstm(torch.cat([x, h], dim=1)).chunk(4, dim=1)
        c = torch.sigmoid(f + 1) * c + torch.sigmoid(i) * torch.tanh(g)
        return torch.sigmoid(o) * torch.tanh(c), c

    def optimizer(self, params: Iterable[torch.Tensor], lr: float = 1.0) -> RNNMLPOptimizer:
        """This rule as a :class:`RNNMLPOptimizer` of ``params``, its step scaled by ``lr``."""
        return RNNMLPOptimizer(params, rule=self, lr=lr)

    def extra_repr(self) -> str:
        return f"exp_mult={self.exp_mult:g}, step_mult={self.step_mult:g}, validation_every={self.validation_every}"


def check_rank(name: str, param: torch.Tensor) -> None:
    """Refuse a parameter of rank above 4 (the rule's shape features have four slots), naming it."""
    if param.dim() > 4:
        raise ValueError(f"parameter {name} has rank {param.dim()}; the rule's shape features cover ranks 0 to 4: "
                         "reshape it, or optimize it with another optimizer")


def _variance_scaling(size: int, generator: torch.Generator | None) -> torch.Tensor:
    """haiku's ``VarianceScaling()`` of a vector: N(0, 1/size) / 0.8796 truncated at ±2 std."""
    std = math.sqrt(1.0 / size) / 0.87962566103423978
    return nn.init.trunc_normal_(torch.empty(size), std=std, a=-2 * std, b=2 * std, generator=generator)


class RNNMLPOptimizer(RuleOptimizer):
    """An :class:`RNNMLPLOptRule` as a ``torch.optim`` optimizer (the loss optional; see the module docs).

    ``loss.backward(); opt.step(loss=loss)`` (or ``opt.step(closure)``) feeds the rule its training
    loss; :meth:`observe_validation` its validation losses (the reference's ``is_valid=True`` calls).
    Every :meth:`step` runs the rule once on all the parameters that have a gradient, each step
    scaled by its group's ``lr`` (1.0: the rule as trained). A parameter's state holds its
    accumulators, LSTM row and message; the state shared by all tensors (the messages between them,
    the loss statistics, the gradient clip and the step count, the ``t`` of the step embedding) is
    ``state["shared"]``, so :meth:`state_dict` round trips all of it. The rule's weights come from
    ``rule`` or ``checkpoint``, never from the network, and are not trained here.

    Args:
        params: parameters or parameter groups (which may set their own ``lr``).
        rule: the rule to run, on the parameters' dtype and device.
        checkpoint: instead of ``rule``, a ``best.pt`` / ``last.pt`` of a trained ``rnn-mlp-lopt`` run.
        lr: the default multiplier of the rule's step (a finite number >= 0).
    """

    def __init__(self, params: Iterable[torch.Tensor] | Iterable[dict[str, Any]], rule: RNNMLPLOptRule | None = None,
                 checkpoint: str | Path | None = None, *, lr: float = 1.0) -> None:
        one_source("RNNMLPOptimizer", {"rule": rule, "checkpoint": checkpoint},
                   "rule= (an RNNMLPLOptRule) or checkpoint= (a path to a best.pt or last.pt of a trained "
                   "rnn-mlp-lopt run)")
        super().__init__(params, rule, lr)
        if rule is None:
            self.rule = self.placed(RNNMLPLOptRule.from_checkpoint(checkpoint))

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group of parameters; one of rank above 4 is refused here, by its name or position."""
        super().add_param_group(param_group)
        group, index = self.param_groups[-1], len(self.param_groups) - 1
        names = group.get("param_names") or [f"{i} of parameter group {index}" for i in range(len(group["params"]))]
        try:
            for name, p in zip(names, group["params"]):
                check_rank(name, p)
        except ValueError:
            self.param_groups.pop()
            raise

    @property
    def steps(self) -> int:
        """Training and validation calls so far (the rule's step count)."""
        return int(self._shared()["step"]) if "shared" in self.state else 0

    @torch.no_grad()
    def _shared(self) -> dict[str, Any]:
        if "shared" not in self.state:
            first = self.param_groups[0]["params"][0]
            full = self.rule.init({"p": first.detach()})
            self.state["shared"] = {k: full[k] for k in ("from_lstm", "train_loss", "valid_loss", "clip", "step")}
        return self.state["shared"]

    @torch.no_grad()
    def observe_validation(self, loss: torch.Tensor | float) -> None:
        """Feed a validation loss: only the validation statistics and the step count change."""
        shared = self._shared()
        self.state["shared"] = {**shared, **{k: v for k, v in self.rule.validate(
            shared, torch.as_tensor(loss, dtype=shared["valid_loss"].dtype)).items() if k in shared}}

    def apply(self, scaled: list[tuple[torch.Tensor, float]], loss: torch.Tensor | None) -> None:
        """One step of the rule on every tensor of ``scaled``, each scaled by its ``lr``."""
        shared = self._shared()
        names = [str(i) for i in range(len(scaled))]
        for p, _ in scaled:
            if not self.state[p]:
                fresh = self.rule.init({"p": p})
                self.state[p] = {"mom": fresh["mom"]["p"], "rms": fresh["rms"]["p"], "from_mlp": fresh["from_mlp"][0],
                                 "lstm": torch.stack([fresh["lstm"][0][0], fresh["lstm"][1][0]])}
        rows = [self.state[p] for p, _ in scaled]
        state = {**shared, "mom": {k: s["mom"] for k, s in zip(names, rows)},
                 "rms": {k: s["rms"] for k, s in zip(names, rows)},
                 "from_mlp": torch.stack([s["from_mlp"] for s in rows]),
                 "lstm": tuple(torch.stack([s["lstm"][i] for s in rows]) for i in range(2))}
        params = dict(zip(names, (p for p, _ in scaled)))
        grads = {k: p.grad for k, p in params.items()}
        info_loss = None if loss is None else loss.to(shared["train_loss"].dtype)
        new, state = self.rule.step(params, grads, state, StepInfo(int(shared["step"]), info_loss))
        for i, (name, (p, lr)) in enumerate(zip(names, scaled)):
            add_update(p, new[name] - p, lr)
            self.state[p] = {"mom": state["mom"][name], "rms": state["rms"][name], "from_mlp": state["from_mlp"][i],
                             "lstm": torch.stack([state["lstm"][0][i], state["lstm"][1][i]])}
        self.state["shared"] = {k: state[k] for k in shared}


@dataclass(frozen=True)
class RNNMLPLOptOptions(UnrollOptions):
    """The hierarchical optimizer's options (defaults: learned_optimization's ``RNNMLPLOpt``).

    The unroll and its estimator are :class:`metaopt.estimators.unroll_options.UnrollOptions`'.

    Args:
        hidden_size: units of each hidden layer of the per-parameter MLP.
        hidden_layers: hidden layers of the MLP.
        lstm_hidden: units of the per-tensor LSTM.
        exp_mult: factor of the magnitude output in the step's exponent.
        step_mult: factor of the step.
        validation_every: feed the rule the problem's validation loss after every this many inner steps (0: never).
    """

    positive = ("hidden_size", "hidden_layers", "lstm_hidden", "exp_mult", "step_mult", *UnrollOptions.positive)
    hidden_size: int = 32
    hidden_layers: int = 2
    lstm_hidden: int = 64
    exp_mult: float = 1e-3
    step_mult: float = 1e-3
    validation_every: int = 0


@register_algorithm("rnn-mlp-lopt", RNNMLPLOptOptions, problems="optimizees")
def build_rnn_mlp_lopt(options: RNNMLPLOptOptions, context: BuildContext) -> tuple[OptimizerLearner, Estimator]:
    """Metz et al. 2020's hierarchical optimizer (per-tensor LSTM, per-parameter MLP), trained as its options say."""
    del context
    rule = RNNMLPLOptRule(options.hidden_size, options.hidden_layers, options.lstm_hidden, exp_mult=options.exp_mult,
                          step_mult=options.step_mult, validation_every=options.validation_every)
    learner = OptimizerLearner(rule, options.horizon, first_order=not options.second_derivatives)
    return learner, estimator_of(options)
