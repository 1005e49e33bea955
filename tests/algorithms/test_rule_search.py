"""The rule-writing controller and the search in the one trainer: valid rules, learning, memory, exact resume."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from metaopt.algorithms.rule_dsl import OPERANDS, Rule
from metaopt.algorithms.rule_search import RuleController, RuleSearch, RuleSearchOptions
from metaopt.datasets.child_training import ChildTask, RuleRewards, fake_data
from metaopt.estimators.policy_gradient import PPO
from metaopt.options import ConfigError
from metaopt.training.checkpoint import load_checkpoint
from metaopt.training.config import TrainerConfig
from metaopt.training.trainer import MetaTrainer


def test_sampled_rules_only_read_earlier_groups_and_decode_to_canonical_rules() -> None:
    controller = RuleController(groups=3, hidden=8)
    tokens = controller.sample(500, torch.Generator().manual_seed(0), uniform=True)
    operand_columns = tokens[:, [0, 1, 5, 6, 10, 11]]
    limits = torch.tensor([len(OPERANDS)] * 2 + [len(OPERANDS) + 1] * 2 + [len(OPERANDS) + 2] * 2)
    assert bool((operand_columns < limits).all())  # group k sees o1 .. o(k-1) only
    assert bool((operand_columns[:, 4:] >= len(OPERANDS)).any())  # and does use them
    for row in tokens[:50]:
        rule = controller.decode(row)
        assert isinstance(rule, Rule) and rule == rule.canonical()


def test_log_prob_is_a_distribution_and_the_one_the_sampler_draws_from() -> None:
    torch.manual_seed(0)
    controller = RuleController(groups=1, hidden=8)
    with torch.no_grad():
        controller.heads["operand"].weight.mul_(10)  # a peaked first head, so frequencies differ
    sizes = [len(OPERANDS), len(OPERANDS), len(controller.vocab["unary"]), len(controller.vocab["unary"]),
             len(controller.vocab["binary"])]
    every = torch.cartesian_prod(*(torch.arange(n) for n in sizes))  # all 345,600 one-group rules
    with torch.no_grad():
        log_prob, _ = controller.log_prob(every)
    assert torch.logsumexp(log_prob.double(), 0).exp().item() == pytest.approx(1.0, abs=1e-5)
    first = torch.zeros(len(OPERANDS), dtype=torch.float64).index_add_(0, every[:, 0], log_prob.double().exp())
    drawn = controller.sample(20000, torch.Generator().manual_seed(1))[:, 0]
    observed = torch.bincount(drawn, minlength=len(OPERANDS)).double() / len(drawn)
    assert first.max() > 0.15 and (observed - first).abs().max() < 0.015


class AdamRewards:
    """Reward 1 for rules that read the Adam update (what a search should learn to write), else 0.1."""

    batch_size, seed = 16, 0

    def reward(self, rule: Rule) -> float:
        return 1.0 if "adam" in rule.key else 0.1


def trainer(run_dir: Path | None, iterations: int, search: str = "ppo") -> MetaTrainer:
    torch.manual_seed(0)
    learner = RuleSearch(RuleController(groups=1, hidden=16), eval_steps=1)
    estimator = PPO("ppo", epochs=2, entropy=1e-3) if search == "ppo" else PPO("random", epochs=1)
    config = TrainerConfig(iterations=iterations, meta_lr=0.03, eval_every=1000, checkpoint_every=5, log_every=5)
    return MetaTrainer(learner, AdamRewards(), config, estimator=estimator, run_dir=run_dir)


def test_ppo_learns_to_write_the_rewarded_rules_and_random_search_does_not() -> None:
    ppo, random = trainer(None, 60), trainer(None, 30, "random")
    ppo.fit()
    random.fit()
    assert ppo.estimator.batch["rewards"].mean() > 0.6  # of 16 rules, most read adam
    assert random.estimator.batch["rewards"].mean() < 0.4  # chance: about 1 operand in 20


def test_search_resumes_exactly_with_its_memory(tmp_path: Path) -> None:
    whole = trainer(tmp_path / "whole", 10)
    whole.fit()
    trainer(tmp_path / "cut", 5).fit()
    resumed = trainer(tmp_path / "cut", 10)
    resumed.fit(resume=True)
    for a, b in zip(whole.learner.parameters(), resumed.learner.parameters()):
        assert torch.equal(a, b)
    assert resumed.learner.scored == whole.learner.scored
    saved = load_checkpoint(tmp_path / "whole" / "last.pt", required=("model",))
    assert saved["model"]["_extra_state"] == whole.learner.scored  # the reward cache is in the checkpoint


def test_evaluation_rescores_the_best_rule_on_fresh_child_seeds() -> None:
    task = ChildTask(steps=3, lrs=(0.1,), val_images=64, data=fake_data(256))
    learner = RuleSearch(RuleController(groups=1, hidden=8), eval_steps=3)
    with pytest.raises(ValueError, match="no rule has been scored yet"):
        learner.evaluate(RuleRewards(task, 2, "val", 0).batch(0))
    learner.scored.update({"g": 0.5, "log(g)": 0.1})
    batch = RuleRewards(task, 2, "val", 0).batch(0)
    scores = learner.evaluate(batch)
    assert scores.metric == "accuracy" and scores.values.shape == (2,)
    assert torch.equal(scores.values, batch.scores(Rule.from_tokens(["g", "1", "id", "id", "left"])))
    with pytest.raises(ValueError, match="child training's 3 steps"):
        learner.evaluate(batch, steps=10)


def test_ppo_options_are_refused_for_random_search() -> None:
    with pytest.raises(ConfigError, match=r"\['epochs', 'clip'\] shape PPO's updates and do nothing"):
        RuleSearchOptions(search="random", epochs=4, clip=0.2)
