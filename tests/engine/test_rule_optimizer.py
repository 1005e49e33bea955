"""RuleOptimizer: the lr multiplier, its checks, the optional closure and the sources of a rule."""

from __future__ import annotations

import pytest
import torch

from metaopt.engine.rule_optimizer import RuleOptimizer, add_update, check_multiplier, one_source


class MinusGradient(RuleOptimizer):
    """The oracle rule: the update is -grad, so lr is plain SGD's learning rate."""

    def apply(self, scaled, loss):
        for p, lr in scaled:
            add_update(p, -p.grad, lr)
            self.state[p]["step"] = self.state[p].get("step", 0) + 1


def test_the_multiplier_scales_the_update_per_group_and_schedulers_change_it():
    a, b = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2))
    ours = MinusGradient([{"params": [a]}, {"params": [b], "lr": 0.1}], rule=torch.nn.Identity(), lr=0.5)
    a_sgd, b_sgd = (p.detach().clone().requires_grad_() for p in (a, b))
    sgd = torch.optim.SGD([{"params": [a_sgd]}, {"params": [b_sgd], "lr": 0.1}], lr=0.5)
    schedules = [torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5) for opt in (ours, sgd)]
    for _ in range(3):
        for opt, params in ((ours, (a, b)), (sgd, (a_sgd, b_sgd))):
            opt.zero_grad()
            sum((p * torch.arange(1.0, p.numel() + 1)).sum() for p in params).backward()
            opt.step()
        for schedule in schedules:
            schedule.step()
    assert torch.equal(a, a_sgd) and torch.equal(b, b_sgd)
    assert [g["lr"] for g in ours.param_groups] == [0.0625, 0.0125]


def test_a_parameter_without_gradient_is_left_alone_and_the_closure_loss_is_returned():
    a, b = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2))
    opt = MinusGradient([a, b], rule=torch.nn.Identity())

    def closure():
        opt.zero_grad()
        loss = a.sum()
        loss.backward()
        return loss

    assert opt.step(closure).item() == 2.0 and opt.step() is None
    assert a.tolist() == [-1.0, -1.0] and b.tolist() == [1.0, 1.0] and b not in opt.state


def test_state_dicts_without_lr_load_with_the_rule_as_trained():
    a = torch.nn.Parameter(torch.ones(2))
    opt = MinusGradient([a], rule=torch.nn.Identity(), lr=0.3)
    state = opt.state_dict()
    del state["param_groups"][0]["lr"]
    opt.load_state_dict(state)
    assert opt.param_groups[0]["lr"] == 1.0


@pytest.mark.parametrize("lr", [-0.1, float("nan"), float("inf"), "0.5", True])
def test_a_bad_multiplier_is_named(lr):
    with pytest.raises(ValueError, match=rf"^MinusGradient's lr multiplies the learned rule's update .* got {lr!r}"):
        MinusGradient([torch.nn.Parameter(torch.ones(1))], rule=torch.nn.Identity(), lr=lr)
    opt = MinusGradient([torch.nn.Parameter(torch.ones(1))], rule=torch.nn.Identity())
    with pytest.raises(ValueError, match="lr multiplies the learned rule's update"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.ones(1))], "lr": lr})
    assert check_multiplier(torch.tensor(0.5), "x") == 0.5


def test_exactly_one_source_and_loaded_rules_follow_the_parameters():
    assert one_source("Opt", {"rule": 1, "checkpoint": None}, "rule= or checkpoint=") == "rule"
    for given, named in (({"rule": None, "checkpoint": None}, "none"), ({"rule": 1, "checkpoint": "x"},
                                                                       r"\['rule', 'checkpoint'\]")):
        with pytest.raises(ValueError, match=rf"^Opt takes rule= or checkpoint=, exactly one of them; got {named}$"):
            one_source("Opt", given, "rule= or checkpoint=")
    opt = MinusGradient([torch.nn.Parameter(torch.ones(1, dtype=torch.float64))], rule=None)
    assert next(opt.placed(torch.nn.Linear(2, 1)).parameters()).dtype == torch.float64
