"""PPO over discrete rules: the surrogate's gradient against REINFORCE and the clip, the cache, the baseline, resume."""

from __future__ import annotations

import pytest
import torch

from metaopt.algorithms.rule_search import RuleController, RuleSearch
from metaopt.estimators.policy_gradient import PPO


class KeyRewards:
    """Rewards by a rule's canonical string, counting the scorings (a child training stands in)."""

    batch_size, seed = 6, 0

    def __init__(self) -> None:
        self.calls: list[str] = []

    def reward(self, rule) -> float:
        self.calls.append(rule.key)
        return float("adam" in rule.key) + 0.1 * len(rule.groups)


def search(groups: int = 1, seed: int = 0) -> RuleSearch:
    torch.manual_seed(seed)
    return RuleSearch(RuleController(groups=groups, hidden=8), eval_steps=1)


def grads_of(learner: RuleSearch) -> list[torch.Tensor]:
    return [p.grad.clone() for p in learner.parameters()]


def test_first_epoch_gradient_is_reinforce_with_the_baselined_advantage_and_entropy() -> None:
    learner, problems = search(groups=2), KeyRewards()
    ppo = PPO(entropy=0.01)
    ppo.estimate(learner, problems, iteration=0)
    ours = grads_of(learner)
    batch = ppo.batch
    learner.zero_grad()
    log_prob, entropy = learner.log_prob(batch["tokens"])
    advantages = batch["rewards"] - batch["rewards"].mean()  # the first baseline is the first batch's mean
    (-(advantages * log_prob).mean() - 0.01 * entropy.mean()).backward()  # ratio = 1: ∇ρ = ∇ log π
    for a, b in zip(ours, grads_of(learner)):
        torch.testing.assert_close(a, b)


def test_clipped_ratios_give_no_gradient() -> None:
    learner, problems = search(), KeyRewards()
    ppo = PPO(entropy=0.0, clip=0.2)
    ppo.estimate(learner, problems, iteration=0)
    ppo.batch["old_log_prob"] = ppo.batch["old_log_prob"] - 1.0  # every ratio e > 1 + ε
    ppo.batch["advantages"] = torch.ones_like(ppo.batch["advantages"])  # positive: the clip binds
    learner.zero_grad()
    ppo.estimate(learner, problems, iteration=1)
    assert all(torch.count_nonzero(g) == 0 for g in grads_of(learner))


def test_cache_scores_each_rule_once_and_epochs_reuse_the_batch() -> None:
    learner, problems = search(), KeyRewards()
    ppo = PPO(epochs=2)
    for iteration in range(6):
        learner.zero_grad()
        ppo.estimate(learner, problems, iteration)
    assert len(problems.calls) == len(set(problems.calls)) == len(learner.scored)
    assert ppo.counts["scored"] + ppo.counts["cached"] == 3 * problems.batch_size  # 3 batches of 6
    assert ppo.batch["index"] == 2


def test_baseline_is_a_moving_average_of_batch_means() -> None:
    learner, problems = search(), KeyRewards()
    ppo = PPO(epochs=1, baseline_decay=0.5)
    means = []
    for iteration in range(3):
        learner.zero_grad()
        ppo.estimate(learner, problems, iteration)
        means.append(ppo.batch["rewards"].mean().item())
    expected = means[0]
    for mean in means:
        expected = 0.5 * expected + 0.5 * mean
    assert ppo.baseline == pytest.approx(expected)


def test_random_search_writes_no_gradient_and_draws_uniformly() -> None:
    learner, problems = search(), KeyRewards()
    problems.batch_size = 4000
    PPO("random", epochs=1).estimate(learner, problems, iteration=0)
    assert all(p.grad is None for p in learner.parameters())
    tokens = learner.sample(4000, torch.Generator().manual_seed(0), uniform=True)
    binary = torch.bincount(tokens[:, 4], minlength=6).double() / 4000
    assert (binary - 1 / 6).abs().max() < 0.03


def test_state_dict_resumes_mid_batch_exactly() -> None:
    problems = KeyRewards()
    whole, ppo = search(), PPO(epochs=3)
    for iteration in range(2):
        whole.zero_grad()
        ppo.estimate(whole, problems, iteration)
    saved, weights = ppo.state_dict(), whole.state_dict()
    whole.zero_grad()
    ppo.estimate(whole, problems, 2)
    resumed, again = search(seed=5), PPO(epochs=3)
    resumed.load_state_dict(weights)
    again.load_state_dict(saved)
    again.estimate(resumed, problems, 2)
    for a, b in zip(grads_of(whole), grads_of(resumed)):
        assert torch.equal(a, b)
    assert resumed.scored == whole.scored


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"search": "bandit"}, "unknown search"),
    ({"search": "random", "epochs": 4}, "epochs must be 1"),
    ({"clip": 1.5}, "0 < clip < 1"),
])
def test_bad_settings_are_refused(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        PPO(**kwargs)
