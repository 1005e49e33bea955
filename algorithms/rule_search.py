"""Neural Optimizer Search (Bello et al. 2017): an LSTM controller writes update rules, trained by PPO on their rewards.

The controller (:class:`RuleController`, §3.2 of the paper) samples a rule of the language of
:mod:`metaopt.algorithms.rule_dsl` token by token: ``groups`` groups of 5 tokens (op1, op2, u1,
u2, b), each from a softmax head of its token type, the sampled token's embedding fed back as the
next input. Group ``k``'s operand head also offers the outputs ``o1 … o(k-1)`` of the groups
before it (the vocabulary grows; the others are masked). Its rules are scored by child trainings
(:mod:`metaopt.datasets.child_training`: a 2-layer ConvNet on Fashion-MNIST, λ swept, the best
validation accuracy) and it is trained by the engine's policy-gradient estimator
(:class:`metaopt.estimators.policy_gradient.PPO`: clipped surrogate, entropy bonus, moving-average
baseline) in the one trainer, with its checkpoints and exact resume. ``search="random"`` samples
uniformly from the same token space with the same budget: the baseline the search must beat.

:class:`RuleSearch` (the learner) is the controller plus the memory of every rule scored (reward
by canonical string: the reward cache, kept in checkpoints); its evaluation re-scores the best
rule found so far on the evaluation problems' child seeds (validation seeds during training, test
seeds for the final result), so ``best.pt`` is the search state whose best rule re-scored best.

Deviations from the paper: the child is Fashion-MNIST 14x14 for 100 steps, not CIFAR-10 for 5
epochs (CIFAR-10 drops in through the child's ``dataset`` where its files are); the controller is
a 1-layer LSTM of ``hidden`` units trained on one machine with batches of ``rules_per_batch``
rules (the paper: distributed workers, a larger batch).

Reference:
    Bello, Zoph, Vasudevan, Le, 2017. Neural Optimizer Search with Reinforcement Learning. ICML.
    https://arxiv.org/abs/1709.07417

Example:
    >>> controller = RuleController(groups=2, hidden=16)
    >>> tokens = controller.sample(3, torch.Generator().manual_seed(0))
    >>> tokens.shape, len(controller.decode(tokens[0]).groups) <= 2
    (torch.Size([3, 10]), True)
    >>> log_prob, entropy = controller.log_prob(tokens)
    >>> bool((log_prob < 0).all()), bool((entropy > 0).all())
    (True, True)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from metaopt.algorithms.rule_dsl import BINARY, OPERANDS, UNARY, Rule, parse
from metaopt.engine.learner import Evaluation, Learner
from metaopt.estimators.policy_gradient import PPO
from metaopt.options import ConfigError, Options
from metaopt.registry import BuildContext, register_algorithm

__all__ = ["RuleController", "RuleSearch", "RuleSearchOptions", "build_rule_search"]

#: The token types of a group, in sampling order.
GROUP_TYPES = ("operand", "operand", "unary", "unary", "binary")
UNARIES, BINARIES = tuple(UNARY), tuple(BINARY)


class RuleController(nn.Module):
    """An LSTM that writes rules of ``groups`` groups: one softmax head per token type (module docs).

    Args:
        groups: groups per rule (dead groups are dropped by the canonical form, so rules may be shorter).
        hidden: units of the LSTM (and size of the token embeddings).
    """

    def __init__(self, groups: int = 3, hidden: int = 64) -> None:
        super().__init__()
        if groups < 1 or hidden < 1:
            raise ValueError(f"RuleController needs groups >= 1 and hidden >= 1, got {groups}, {hidden}")
        self.groups, self.hidden = groups, hidden
        self.vocab = {"operand": (*OPERANDS, *(f"o{k + 1}" for k in range(groups - 1))), "unary": UNARIES,
                      "binary": BINARIES}
        self.offset = {"operand": 0, "unary": len(self.vocab["operand"]),
                       "binary": len(self.vocab["operand"]) + len(UNARIES)}
        self.embedding = nn.Embedding(sum(len(v) for v in self.vocab.values()) + 1, hidden)  # last: the start token
        self.cell = nn.LSTMCell(hidden, hidden)
        self.heads = nn.ModuleDict({kind: nn.Linear(hidden, len(words)) for kind, words in self.vocab.items()})

    @property
    def length(self) -> int:
        return 5 * self.groups

    def _positions(self) -> list[tuple[str, int]]:
        """(token type, vocabulary size allowed) at every position of a rule."""
        return [(kind, len(OPERANDS) + k if kind == "operand" else len(self.vocab[kind]))
                for k in range(self.groups) for kind in GROUP_TYPES]

    def _walk(self, n: int, tokens: torch.Tensor | None, generator: torch.Generator | None,
              uniform: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Run the LSTM over a rule: sample (``tokens`` None) or score ``tokens``; tokens, log-probs, entropies."""
        weight = self.embedding.weight
        h = c = weight.new_zeros(n, self.hidden)
        x = weight[-1].expand(n, -1)
        chosen, log_prob, entropy = [], weight.new_zeros(n), weight.new_zeros(n)
        for position, (kind, allowed) in enumerate(self._positions()):
            h, c = self.cell(x, (h, c))
            logits = self.heads[kind](h)[:, :allowed]
            if uniform:
                logits = torch.zeros_like(logits)
            logp = torch.log_softmax(logits, dim=1)
            if tokens is None:
                token = torch.multinomial(logp.detach().exp(), 1, generator=generator).squeeze(1)
            else:
                token = tokens[:, position]
            chosen.append(token)
            log_prob = log_prob + logp.gather(1, token[:, None]).squeeze(1)
            entropy = entropy - (logp.exp() * logp).sum(1)
            x = self.embedding(token + self.offset[kind])
        return torch.stack(chosen, 1), log_prob, entropy

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None, uniform: bool = False) -> torch.Tensor:
        """``n`` rules as token indices ``[n, 5·groups]`` (``uniform``: every allowed token equally likely)."""
        return self._walk(n, None, generator, uniform)[0]

    def log_prob(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Log-probabilities of the rules ``tokens`` and the entropies of the heads along them (summed)."""
        if tokens.dim() != 2 or tokens.shape[1] != self.length:
            raise ValueError(f"tokens must be [rules, {self.length}], got {tuple(tokens.shape)}")
        _, log_prob, entropy = self._walk(len(tokens), tokens, None, False)
        return log_prob, entropy

    def decode(self, tokens: torch.Tensor) -> Rule:
        """The canonical rule of one row of token indices."""
        words = [self.vocab[kind][int(t)] for kind, t in zip(GROUP_TYPES * self.groups, tokens)]
        return Rule.from_tokens(words).canonical()


class RuleSearch(Learner):
    """What a rule search meta-trains: the controller and the memory of scored rules (module docs).

    Args:
        controller: the rule-writing policy.
        eval_steps: the child training's steps (recorded with every evaluation).
    """

    def __init__(self, controller: RuleController, eval_steps: int) -> None:
        super().__init__()
        self.controller, self.eval_steps = controller, eval_steps
        self.scored: dict[str, float] = {}

    def sample(self, n: int, generator: torch.Generator | None = None, uniform: bool = False) -> torch.Tensor:
        return self.controller.sample(n, generator, uniform)

    def log_prob(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.controller.log_prob(tokens)

    def decode(self, tokens: torch.Tensor) -> Rule:
        return self.controller.decode(tokens)

    def best(self, k: int = 1) -> list[tuple[str, float]]:
        """The ``k`` best rules scored so far: (canonical string, reward), best first (ties: first scored)."""
        return sorted(self.scored.items(), key=lambda item: -item[1])[:k]

    def get_extra_state(self) -> dict[str, float]:
        return dict(self.scored)

    def set_extra_state(self, state: dict[str, float]) -> None:
        self.scored = dict(state)

    def evaluate(self, batch: Any, steps: int | None = None) -> Evaluation:
        """The best rule so far re-scored on the batch's child seeds."""
        if steps not in (None, self.eval_steps):
            raise ValueError(f"a rule search scores rules with its child training's {self.eval_steps} steps; "
                             "the step count of an evaluation is the child's option 'steps'")
        if not self.scored:
            raise ValueError("no rule has been scored yet: evaluate after at least one meta-update")
        return Evaluation("accuracy", batch.scores(parse(self.best()[0][0])))

    def logged(self) -> dict[str, float]:
        return {"search/rules_in_memory": float(len(self.scored))}

    def protocol(self) -> dict[str, Any]:
        return {"rule": self.best()[0][0] if self.scored else None}


@dataclass(frozen=True)
class RuleSearchOptions(Options):
    """The rule search's options (Bello et al. 2017; the child training's are the data section's).

    Args:
        search: "ppo" (train the controller) or "random" (uniform rules, the baseline).
        groups: groups of 5 tokens per rule.
        hidden: units of the controller's LSTM.
        epochs: PPO meta-updates per batch of rules (ppo only; default 4).
        clip: PPO's ratio clip ε (ppo only; default 0.2).
        entropy: weight of the entropy bonus (ppo only; default 1e-3).
        baseline_decay: decay of the moving-average reward baseline (ppo only; default 0.9).
    """

    positive = ("groups", "hidden", "epochs", "clip")
    search: Literal["ppo", "random"] = "ppo"
    groups: int = 3
    hidden: int = 64
    epochs: int | None = None
    clip: float | None = None
    entropy: float | None = None
    baseline_decay: float | None = None

    def check(self) -> None:
        super().check()
        if self.search == "random":
            ppo = ("epochs", "clip", "entropy", "baseline_decay")
            given = [name for name in ppo if getattr(self, name) is not None]
            if given:
                raise ConfigError(f"option(s) {given} shape PPO's updates and do nothing for search='random'; drop "
                                  "them or use search='ppo'")


@register_algorithm("neural-optimizer-search", RuleSearchOptions, problems="rules")
def build_rule_search(options: RuleSearchOptions, context: BuildContext) -> tuple[RuleSearch, PPO]:
    """Neural Optimizer Search (Bello et al. 2017): a controller writes update rules, trained by PPO (or random)."""
    learner = RuleSearch(RuleController(options.groups, options.hidden), context.example.task.steps)
    if options.search == "random":
        return learner, PPO("random", epochs=1)
    defaults = {"epochs": 4, "clip": 0.2, "entropy": 1e-3, "baseline_decay": 0.9}
    chosen = {name: default if getattr(options, name) is None else getattr(options, name)
              for name, default in defaults.items()}
    return learner, PPO("ppo", **chosen)
