"""MT-net and T-net: MAML at identity T and full masks, masked units frozen, per-task masks, T, configs, presets."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from metaopt.algorithms import MAML, MTNet
from metaopt.algorithms.mtnet import MaskedSGD, MTNetOptions, TNetOptions, Transform, insert_transforms
from metaopt.engine.rules import StepInfo, sgd
from metaopt.options import ConfigError
from metaopt.problems.episode import Episode
from metaopt.problems.episode_task import EpisodeTask, default_loss
from metaopt.registry import BuildContext, entry
from metaopt.training.config import RunConfig, Section, load_preset
from metaopt.training.experiment import build_experiment
from tests.helpers import meta_grads, tiny_convnet, toy_classification_batch

# tiny_convnet's parameter names -> MT-net's (each Conv2d/Linear becomes Sequential(layer, Transform))
LAYERS = {"0.0.weight": "0.0.0.weight", "0.0.bias": "0.0.0.bias", "1.0.weight": "1.0.0.weight",
          "1.0.bias": "1.0.0.bias", "3.weight": "3.0.weight", "3.bias": "3.0.bias"}
BN = ("0.1.weight", "0.1.bias", "1.1.weight", "1.1.bias")
TRANSFORMS = ("0.0.1.weight", "1.0.1.weight", "3.1.weight")


def _set_logits(learner: MTNet, value: float) -> None:
    with torch.no_grad():
        for logit in learner.rule.logits.values():
            logit.fill_(value)


def _assert_maml(learner: MTNet) -> None:
    """Meta-loss and meta-gradients of ``learner`` (T = I, nothing masked) equal MAML's adapting conv/linear only."""
    batch = toy_classification_batch()
    loss, grads = meta_grads(learner, batch)
    expected_loss, expected = meta_grads(MAML(tiny_convnet(), inner_lr=0.3, inner_steps=2, adapt=list(LAYERS)), batch)
    torch.testing.assert_close(loss, expected_loss, rtol=1e-12, atol=0)
    assert len(expected) == len(LAYERS) + len(BN)
    for name, grad in expected.items():
        short = name.removeprefix("model.")
        torch.testing.assert_close(grads["model." + LAYERS.get(short, short)], grad, rtol=1e-12, atol=1e-15, msg=name)


def test_identity_t_and_all_ones_mask_is_maml() -> None:
    learner = MTNet(tiny_convnet(), inner_lr=0.3, inner_steps=2)
    assert set(learner.inner.adapted) == set(LAYERS.values())  # neither batch norm nor T adapts
    _set_logits(learner, 60.0)  # sigmoid(60 ± 14) rounds to 1 in float64: every sample is exactly 1
    _assert_maml(learner)


def test_tnet_with_identity_t_is_maml() -> None:
    learner = MTNet(tiny_convnet(), inner_lr=0.3, inner_steps=2, mask=None)
    assert type(learner.rule) is type(sgd(0.3))
    assert not any(name.startswith("rule.") for name, _ in learner.named_parameters())
    _assert_maml(learner)


def test_masked_units_do_not_move_in_the_inner_loop() -> None:
    learner = MTNet(tiny_convnet(), inner_lr=0.3, inner_steps=2)
    keep = {}
    with torch.no_grad():
        for key, logit in learner.rule.logits.items():
            keep[key] = torch.arange(len(logit)) % 2 == 0  # units 0, 2, ... adapt; 1, 3, ... are masked
            logit.copy_(torch.where(keep[key], 60.0, -60.0))
    params = dict(learner.model.named_parameters())
    task = EpisodeTask(learner.model, default_loss, *toy_classification_batch()[0].tensors())
    path = learner.inner.unroll(task, params, steps=2).params
    for name in LAYERS.values():
        moved = (path[-1][name] != path[0][name]).reshape(len(path[0][name]), -1).any(1)  # per output unit
        units = keep[name.rsplit(".", 1)[0].replace(".", "-")]
        assert not moved[~units].any(), name  # masked rows: exactly unchanged after two steps
        if name not in ("0.0.0.bias", "1.0.0.bias"):  # (a conv bias before batch norm has no gradient)
            assert moved[units].all(), name
    for name in BN + TRANSFORMS:  # outer loop only
        assert path[-1][name] is path[0][name], name


def test_gradients_reach_every_t_and_the_mask_logits() -> None:
    learner = MTNet(tiny_convnet(), inner_lr=0.3, inner_steps=2)
    _, grads = meta_grads(learner, toy_classification_batch())
    for name in TRANSFORMS:
        assert grads["model." + name].abs().sum() > 0, name
    assert set(learner.rule.logits) == {"0-0-0", "1-0-0", "3-0"}
    for key in learner.rule.logits:
        assert grads[f"rule.logits.{key}"].abs().sum() > 0, key


def test_t_gradient_matches_finite_differences() -> None:
    """With a fixed all-ones mask the meta-loss is deterministic: d/dT against central differences."""
    learner = MTNet(tiny_convnet(), inner_lr=0.3, inner_steps=2)
    _set_logits(learner, 60.0)
    with torch.no_grad():  # T away from the identity, so the test sees T inside the inner loop too
        for name in TRANSFORMS:
            learner.model.get_parameter(name).add_(0.1 * torch.randn_like(learner.model.get_parameter(name)))
    batch = toy_classification_batch(tasks=2)
    _, grads = meta_grads(learner, batch)
    eps = 1e-6
    for name, index in [("0.0.1.weight", (0, 1)), ("1.0.1.weight", (2, 2)), ("3.1.weight", (1, 0))]:
        t = learner.model.get_parameter(name)
        with torch.no_grad():
            t[index] += eps
            up = learner.meta_loss(batch)[0].item()
            t[index] -= 2 * eps
            down = learner.meta_loss(batch)[0].item()
            t[index] += eps
        assert grads["model." + name][index].item() == pytest.approx((up - down) / (2 * eps), rel=1e-5, abs=1e-9)


def test_masks_are_drawn_once_per_task_and_reused_by_every_step(monkeypatch: pytest.MonkeyPatch) -> None:
    learner = MTNet(tiny_convnet(), inner_lr=0.3, inner_steps=2, strategy="loop")
    drawn, used = [], []
    init, step = MaskedSGD.init, MaskedSGD.step

    def counting_init(self: MaskedSGD, params: dict) -> dict:
        drawn.append(init(self, params))
        return drawn[-1]

    def recording_step(self: MaskedSGD, params: dict, grads: dict, state: dict, info: StepInfo) -> tuple:
        used.append((state, info.t))
        return step(self, params, grads, state, info)

    monkeypatch.setattr(MaskedSGD, "init", counting_init)
    monkeypatch.setattr(MaskedSGD, "step", recording_step)
    learner.meta_loss(toy_classification_batch(tasks=3))
    assert len(drawn) == 3
    assert [t for _, t in used] == [0, 1] * 3
    for task, masks in enumerate(drawn):  # both steps of task i use the masks drawn for it
        assert used[2 * task][0] is masks and used[2 * task + 1][0] is masks


@pytest.mark.parametrize("strategy", ["loop", "vmap"])
def test_each_task_draws_its_own_masks(strategy: str) -> None:
    episode = toy_classification_batch(tasks=1)[0]
    batch = Episode.stack([episode] * 4)
    learner = MTNet(tiny_convnet(), inner_lr=0.3, inner_steps=2, strategy=strategy)
    losses = learner.task_outputs(batch).losses.detach()  # logits 0: each unit adapts with p = 0.5, per task
    assert len(set(losses.tolist())) > 1, losses
    _set_logits(learner, 60.0)  # the same mask for every task: the same task gives the same loss
    losses = learner.task_outputs(batch).losses.detach()
    torch.testing.assert_close(losses, losses[:1].expand(4), rtol=1e-12, atol=0)


def test_a_unit_mask_is_one_sample_shared_by_weight_and_bias() -> None:
    learner = MTNet(tiny_convnet(channels=8), inner_lr=0.3)
    params = dict(learner.model.named_parameters())
    masks = learner.rule.init({name: params[name] for name in learner.inner.adapted})
    for layer in ("0.0.0", "1.0.0", "3.0"):
        weight, bias = masks[f"{layer}.weight"].round(), masks[f"{layer}.bias"].round()
        assert torch.equal(weight, bias.reshape(weight.shape[:1] + (1,) * (weight.dim() - 1)).expand_as(weight)), \
            (layer, weight.flatten(1)[:, 0].tolist(), bias.tolist())


def test_weight_masks_have_the_shape_of_every_adapted_parameter() -> None:
    learner = MTNet(tiny_convnet(), mask="weight")
    params = dict(learner.model.named_parameters())
    assert {k: tuple(v.shape) for k, v in learner.rule.logits.items()} == \
        {name.replace(".", "-"): tuple(params[name].shape) for name in LAYERS.values()}
    assert all(v.dtype == torch.float64 for v in learner.rule.logits.values())
    masks = learner.rule.init({name: params[name] for name in LAYERS.values()})
    assert masks.keys() == set(LAYERS.values())
    for name, mask in masks.items():  # hard samples (1 up to the rounding of the straight-through 1 + s - s)
        assert mask.shape == params[name].shape, name
        torch.testing.assert_close(mask, (mask > 0.5).to(mask.dtype), rtol=0, atol=1e-15)


def test_unit_mask_shapes_and_invalid_options() -> None:
    learner = MTNet(tiny_convnet(), mask="unit")
    assert {k: tuple(v.shape) for k, v in learner.rule.logits.items()} == {"0-0-0": (3,), "1-0-0": (3,), "3-0": (3,)}
    assert all(torch.equal(v, torch.zeros_like(v)) for v in learner.rule.logits.values())
    with pytest.raises(ValueError, match="mask must be one of"):
        MTNet(tiny_convnet(), mask="channel")
    with pytest.raises(ValueError, match="learning rate"):
        MTNet(tiny_convnet(), inner_lr=0.0)


def test_transform_is_a_1x1_convolution_on_maps_and_a_matrix_on_vectors() -> None:
    t = Transform(4).double()
    assert torch.equal(t.weight, torch.eye(4, dtype=torch.float64))
    with torch.no_grad():
        t.weight.copy_(torch.randn(4, 4, dtype=torch.float64))
    maps = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    torch.testing.assert_close(t(maps), F.conv2d(maps, t.weight.reshape(4, 4, 1, 1)))
    torch.testing.assert_close(t(maps), torch.einsum("oi,bihw->bohw", t.weight, maps))
    vectors = torch.randn(3, 4, dtype=torch.float64)
    torch.testing.assert_close(t(vectors), vectors @ t.weight.T)


def test_insert_transforms_wraps_every_conv_and_linear_once() -> None:
    model = insert_transforms(tiny_convnet())
    wrapped = [name for name, m in model.named_modules() if isinstance(m, Transform)]
    assert wrapped == ["0.0.1", "1.0.1", "3.1"]
    assert [model.get_submodule(n).weight.shape[0] for n in wrapped] == [3, 3, 3]
    assert all(model.get_submodule(n).weight.dtype == torch.float64 for n in wrapped)
    x = torch.randn(4, 1, 8, 8, dtype=torch.float64)
    torch.testing.assert_close(model(x), tiny_convnet()(x), rtol=1e-12, atol=0)  # T = I: the same function


def test_config_builders_make_mtnet_and_tnet() -> None:
    def config(algorithm: dict) -> RunConfig:
        return RunConfig.from_dict({"data": {"name": "sinusoid", "meta_batch": 2},
                                    "model": {"name": "mlp", "hidden": [8]},
                                    "algorithm": {"inner_steps": 1, "inner_lr": 0.05, **algorithm}})

    mtnet = build_experiment(config({"name": "mtnet"})).learner
    assert sorted(n for n, m in mtnet.model.named_modules() if isinstance(m, Transform)) == ["0.1", "2.1"]
    assert isinstance(mtnet.rule, MaskedSGD) and mtnet.rule.mask == "unit"
    assert {k: tuple(v.shape) for k, v in mtnet.rule.logits.items()} == {"0-0": (8,), "2-0": (1,)}
    assert mtnet.rule.lr == 0.05
    assert mtnet.inner.adapted == ("0.0.weight", "0.0.bias", "2.0.weight", "2.0.bias")
    weight = build_experiment(config({"name": "mtnet"}).replace(algorithm={"mask": "weight"})).learner
    assert weight.rule.mask == "weight" and tuple(weight.rule.logits["0-0-weight"].shape) == (8, 1)
    tnet = build_experiment(config({"name": "tnet"})).learner
    assert type(tnet.rule) is type(sgd(0.05)) and tnet.rule.lr == 0.05
    assert sorted(n for n, m in tnet.model.named_modules() if isinstance(m, Transform)) == ["0.1", "2.1"]
    assert tnet.inner.adapted == mtnet.inner.adapted
    x = torch.linspace(-3, 3, 10).reshape(2, 5, 1)
    loss, _ = tnet.meta_loss(Episode(x, torch.sin(x), x, torch.sin(x), batched=True))
    assert torch.isfinite(loss)


TNET_OPTIONS = ("first_order", "checkpoint_steps", "inner_steps", "eval_inner_steps", "strategy", "bn_policy",
                "inner_lr")


def test_registered_options_build_mtnet_and_tnet_and_refuse_others() -> None:
    """The "mtnet" and "tnet" entries build from their options; neither takes adapt (it adapts the layers' weights)."""
    batch = toy_classification_batch()
    found = entry("algorithm", "mtnet")
    assert found.options is MTNetOptions and tuple(MTNetOptions.field_names()) == (*TNET_OPTIONS, "mask")
    learner = found.build(MTNetOptions(inner_lr=0.3, inner_steps=2), BuildContext(tiny_convnet(), batch))
    assert isinstance(learner, MTNet) and isinstance(learner.rule, MaskedSGD) and learner.rule.mask == "unit"
    assert learner.rule.lr == 0.3 and set(learner.inner.adapted) == set(LAYERS.values())
    _set_logits(learner, 60.0)
    _assert_maml(learner)  # T = I and every unit adapting: MAML on the conv/linear layers
    weight = found.build(MTNetOptions(mask="weight"), BuildContext(tiny_convnet(), batch))
    assert weight.rule.mask == "weight" and tuple(weight.rule.logits["3-0-weight"].shape) == (3, 12)
    tnet_entry = entry("algorithm", "tnet")
    assert tnet_entry.options is TNetOptions and tuple(TNetOptions.field_names()) == TNET_OPTIONS
    tnet = tnet_entry.build(TNetOptions(inner_lr=0.3, inner_steps=2), BuildContext(tiny_convnet(), batch))
    assert type(tnet.rule) is type(sgd(0.3)) and tnet.rule.lr == 0.3
    _assert_maml(tnet)
    for name, listed, options in (("mtnet", ", ".join((*TNET_OPTIONS, "mask")), ("adapt", "mtnet_mask", "driver")),
                                  ("tnet", ", ".join(TNET_OPTIONS), ("adapt", "mask"))):
        for option in options:
            with pytest.raises(ConfigError, match=rf"^'{option}'( \(did you mean '\w+'\?\))? is not an option of "
                                                  rf"algorithm '{name}'; its options are {listed}$"):
                Section.from_dict("algorithm", {"name": name, option: 1})
    with pytest.raises(ConfigError, match=r"option 'mask' must be one of \('unit', 'weight'\), got 'channel'"):
        Section.from_dict("algorithm", {"name": "mtnet", "mask": "channel"})


@pytest.mark.parametrize(("name", "ways", "lr", "steps", "eval_steps"),
                         [("mtnet-omniglot-5w1s", 5, 0.4, 1, 10), ("mtnet-omniglot-20w1s", 20, 0.1, 1, 10),
                          ("mtnet-miniimagenet-5w1s", 5, 0.01, 5, 10)])
def test_presets(name: str, ways: int, lr: float, steps: int, eval_steps: int) -> None:
    config = load_preset(name)
    algorithm, data = config.algorithm.options, config.data.options
    assert config.algorithm.name == "mtnet" and algorithm.mask == "unit" and not algorithm.first_order
    assert (data.ways, data.shots, algorithm.inner_lr, algorithm.inner_steps, algorithm.eval_inner_steps) == \
        (ways, 1, lr, steps, eval_steps)
    assert config.data.name == ("omniglot" if "omniglot" in name else "miniimagenet")
