"""Policy gradients over discrete update rules: PPO, as Neural Optimizer Search trains its controller (Bello 2017).

The learner is a *policy* over token sequences (a controller that writes update rules); the
problems give each decoded rule a **reward** (a child network's validation accuracy). Every
``epochs`` meta-updates the estimator samples a batch of ``problems.batch_size`` rules, scores
the ones not yet scored (the learner's memory of rewards, keyed by canonical string, is the cache:
rules are sampled again and again) and takes advantages ``A = r - b`` against an exponential
moving average ``b`` of the batch mean rewards (decay ``baseline_decay``; the first batch's mean
starts it). Each meta-update of the batch (PPO's epochs) writes the gradient of the clipped
surrogate (Schulman et al. 2017, eq. 7) with an entropy bonus,

    loss = -mean_i min(ρ_i A_i, clip(ρ_i, 1 - ε, 1 + ε) A_i) - c · mean_i H_i,
    ρ_i = exp(log π(rule_i) - log π_old(rule_i)),

where ``π_old`` is the policy that sampled the batch. ``search="random"`` is the baseline with the
same budget: rules drawn uniformly from the same token space, every iteration a fresh batch,
no gradient. The batch in progress, the baseline and the counters are the estimator's state
(checkpointed), and batch ``j``'s draws come from a generator keyed by ``(seed, j)``, so a resumed
search samples what an uninterrupted one would.

The policy (the learner) provides ``sample(n, generator, uniform) -> tokens``, ``log_prob(tokens)
-> (log-probabilities, entropies)``, ``decode(tokens_row) -> rule`` (with a ``key``) and the
memory ``scored: dict[str, float]``.

On several processes (``distribute``) every rank samples the same batch (the same controller, the
same key), scores its contiguous share of the batch's new rules, and the rewards are gathered, so
the child trainings spread over the ranks; every rank then fills its memory and takes the same
controller update from the same rewards (no gradient travels).

References:
    Bello, Zoph, Vasudevan, Le, 2017. Neural Optimizer Search with Reinforcement Learning. ICML (§3.2: PPO).
    Schulman, Wolski, Dhariwal, Radford, Klimov, 2017. Proximal Policy Optimization Algorithms. arXiv 1707.06347.

Example:
    >>> import torch
    >>> class Coin(torch.nn.Module):        # a policy over one binary token; the rule "1" earns reward 1
    ...     def __init__(self):
    ...         super().__init__(); self.logit = torch.nn.Parameter(torch.zeros(1)); self.scored = {}
    ...     def sample(self, n, generator, uniform=False):
    ...         p = torch.tensor(0.5) if uniform else torch.sigmoid(self.logit.detach())
    ...         return (torch.rand(n, 1, generator=generator) < p).long()
    ...     def log_prob(self, tokens):
    ...         logp = torch.nn.functional.logsigmoid(torch.where(tokens[:, 0] == 1, self.logit, -self.logit))
    ...         q = torch.sigmoid(self.logit)
    ...         return logp, -(q * q.log() + (1 - q) * (1 - q).log()).expand(len(tokens))
    ...     def decode(self, row):
    ...         return type("Rule", (), {"key": str(int(row[0]))})()
    >>> class Rewards:
    ...     batch_size, seed = 8, 0
    ...     def reward(self, rule):
    ...         return float(rule.key)
    >>> policy, ppo = Coin(), PPO()
    >>> estimate = ppo.estimate(policy, Rewards(), iteration=0)
    >>> policy.logit.grad.item() < 0, sorted(policy.scored)   # ascend the surrogate: raise P("1")
    (True, ['0', '1'])
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch

from metaopt.estimators.base import Estimate, Estimator
from metaopt.estimators.perturbations import key_seed
from metaopt.training.distributed import World

__all__ = ["PPO", "SEARCHES"]

SEARCHES = ("ppo", "random")
_STREAM = (0x9E05,)  # keeps the rule draws apart from the perturbation streams of the same seed


class PPO(Estimator):
    """The clipped-surrogate policy gradient of a rule search (module docs), or random search.

    Args:
        search: ``"ppo"`` (train the policy) or ``"random"`` (uniform rules, no gradient).
        epochs: meta-updates per sampled batch (PPO's epochs; 1 for random search).
        clip: ε of the clipped ratio.
        entropy: c, the weight of the entropy bonus.
        baseline_decay: decay of the moving-average reward baseline.
    """

    def __init__(self, search: Literal["ppo", "random"] = "ppo", epochs: int = 4, clip: float = 0.2,
                 entropy: float = 1e-3, baseline_decay: float = 0.9) -> None:
        if search not in SEARCHES:
            raise ValueError(f"unknown search {search!r}; choose one of {SEARCHES}")
        if search == "random" and epochs != 1:
            raise ValueError("random search takes no gradient steps: a batch is used once, epochs must be 1")
        if epochs < 1 or not 0 < clip < 1 or entropy < 0 or not 0 <= baseline_decay < 1:
            raise ValueError(f"PPO needs epochs >= 1, 0 < clip < 1, entropy >= 0 and 0 <= baseline_decay < 1; got "
                             f"epochs={epochs}, clip={clip}, entropy={entropy}, baseline_decay={baseline_decay}")
        self.search, self.epochs, self.clip, self.entropy, self.baseline_decay = (search, epochs, clip, entropy,
                                                                                   baseline_decay)
        self.batch: dict[str, Any] | None = None
        self.baseline: float | None = None
        self.counts = {"scored": 0, "cached": 0, "invalid": 0}

    def distribute(self, world: World) -> None:
        self.world = world

    def settings(self) -> dict[str, Any]:
        return {"search": self.search, "epochs": self.epochs, "clip": self.clip, "entropy": self.entropy,
                "baseline_decay": self.baseline_decay}

    def state_dict(self) -> dict[str, Any]:
        return {"batch": self.batch, "baseline": self.baseline, "counts": dict(self.counts)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.batch, self.baseline, self.counts = state["batch"], state["baseline"], dict(state["counts"])

    def _sample(self, policy: Any, problems: Any, index: int) -> dict[str, Any]:
        """Batch ``index``: rules, rewards (from the memory or the problems), advantages, old log-probabilities."""
        generator = torch.Generator().manual_seed(key_seed((problems.seed, index), _STREAM))
        tokens = policy.sample(problems.batch_size, generator, uniform=self.search == "random")
        rules = [policy.decode(row) for row in tokens]
        new = list({rule.key: rule for rule in rules if rule.key not in policy.scored}.values())
        mine = self.world.share(len(new))
        scores = {rule.key: float(problems.reward(rule)) for rule in new[mine.start:mine.stop]}
        for share in self.world.gather(scores) if self.world.active else []:
            scores.update(share)
        rewards = []
        for rule in rules:
            key = rule.key
            if key in policy.scored:
                self.counts["cached"] += 1
            else:
                policy.scored[key] = scores[key]
                self.counts["scored"] += 1
                self.counts["invalid"] += policy.scored[key] == 0.0
            rewards.append(policy.scored[key])
        mean = sum(rewards) / len(rewards)
        baseline = mean if self.baseline is None else self.baseline
        self.baseline = self.baseline_decay * baseline + (1 - self.baseline_decay) * mean
        old = None
        if self.search == "ppo":
            with torch.no_grad():
                old = policy.log_prob(tokens)[0]
        return {"index": index, "tokens": tokens, "rewards": torch.tensor(rewards),
                "advantages": torch.tensor(rewards) - baseline, "old_log_prob": old}

    def estimate(self, learner: Any, problems: Any, iteration: int, track_steps: bool = False) -> Estimate:
        del track_steps
        index = iteration // self.epochs
        if self.batch is None or self.batch["index"] != index:
            self.batch = self._sample(learner, problems, index)
        batch = self.batch
        rewards = batch["rewards"]
        metrics = {"loss": -rewards.mean().item(), "reward_mean": rewards.mean().item(),
                   "reward_max": rewards.max().item(), "best_reward": max(learner.scored.values()),
                   "baseline": float(self.baseline), "rules_scored": float(self.counts["scored"]),
                   "cache_hits": float(self.counts["cached"]), "invalid_rules": float(self.counts["invalid"])}
        if self.search == "random":
            return Estimate(metrics["loss"], metrics)
        log_prob, entropy = learner.log_prob(batch["tokens"])
        ratio = torch.exp(log_prob - batch["old_log_prob"])
        advantages = batch["advantages"].to(ratio)
        surrogate = torch.minimum(ratio * advantages, torch.clamp(ratio, 1 - self.clip, 1 + self.clip) * advantages)
        loss = -(surrogate.mean() + self.entropy * entropy.mean())
        if math.isfinite(loss.item()):
            loss.backward()
        metrics.update(entropy=entropy.mean().item(), ratio_max=ratio.max().item(),
                       clipped=((ratio - 1).abs() > self.clip).float().mean().item())
        return Estimate(metrics["loss"], metrics)
