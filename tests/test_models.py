"""Backbones: output shapes, layer layout and parameter counts of the published networks, and their registry entries."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from metaopt.models import MLP, Conv4, Conv4Options, MLPOptions, build_conv4, build_mlp
from metaopt.options import ConfigError
from metaopt.problems.episode import Episode
from metaopt.registry import entry
from metaopt.training.config import Section


def count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("in_channels, image_size, hidden, strided", [(1, 28, 8, False), (3, 84, 4, False),
                                                                      (1, 28, 8, True)],
                         ids=["omniglot", "mini-imagenet", "omniglot-strided"])
def test_conv4_shapes(in_channels: int, image_size: int, hidden: int, strided: bool) -> None:
    torch.manual_seed(0)
    model = Conv4(in_channels, num_classes=5, hidden=hidden, image_size=image_size, strided=strided)
    assert model(torch.randn(2, in_channels, image_size, image_size)).shape == (2, 5)


def test_conv4_parameter_counts() -> None:
    # 64 filters, Omniglot: conv 1*64*9+64, three convs 64*64*9+64, four batch norms 2*64, head 64*5+5
    assert count(Conv4(1, 5, hidden=64, image_size=28)) == 640 + 3 * 36928 + 4 * 128 + 325
    # 32 filters, miniImageNet: the feature map is 5x5 after four poolings of 84
    assert count(Conv4(3, 5, hidden=32, image_size=84)) == (3 * 32 * 9 + 32) + 3 * (32 * 32 * 9 + 32) + 4 * 64 + (
        32 * 25 * 5 + 5)
    layers = [type(m) for m in Conv4(hidden=8)[0]]
    assert layers == [nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.MaxPool2d]
    assert nn.MaxPool2d not in [type(m) for m in Conv4(hidden=8, strided=True).modules()]


def test_conv4_rejects_too_small_images() -> None:
    with pytest.raises(ValueError, match="image_size=8 is too small"):
        Conv4(image_size=8)


def test_mlp_layout() -> None:
    model = MLP(1, 1)
    assert [type(m) for m in model] == [nn.Linear, nn.ReLU, nn.Linear, nn.ReLU, nn.Linear]
    assert [(m.in_features, m.out_features) for m in model if isinstance(m, nn.Linear)] == [(1, 40), (40, 40), (40, 1)]
    assert [type(m) for m in MLP(3, 2, hidden=())] == [nn.Linear]
    assert MLP(3, 2, hidden=(5,))(torch.zeros(4, 3)).shape == (4, 2)


def sample_batch(example_shape: tuple[int, ...], ways: int | None = 5, targets: int = 1, tasks: int = 2) -> Episode:
    """A batch of ``tasks`` episodes with examples of ``example_shape``: ``ways`` classes, or regression targets."""
    if ways is None:
        support_y, query_y = torch.randn(tasks, 4, targets), torch.randn(tasks, 6, targets)
    else:
        support_y, query_y = torch.arange(ways).repeat(tasks, 1), torch.arange(ways).repeat(tasks, 2)
    return Episode(torch.rand(tasks, support_y.shape[1], *example_shape), support_y,
                   torch.rand(tasks, query_y.shape[1], *example_shape), query_y, batched=True)


def test_registered_models_are_sized_for_a_sample_batch() -> None:
    assert (entry("model", "mlp").options, entry("model", "mlp").build) == (MLPOptions, build_mlp)
    assert (entry("model", "conv4").options, entry("model", "conv4").build) == (Conv4Options, build_conv4)
    images = sample_batch((3, 20, 20), ways=4)
    section = Section.from_dict("model", {"name": "conv4", "filters": 6})
    conv = section.entry.build(section.options, images)
    assert isinstance(conv, Conv4) and conv(images.query_x[0]).shape == (8, 4)
    assert conv[0][0].in_channels == 3 and conv[0][0].out_channels == 6 and conv[-1].in_features == 6  # 20 -> 1
    strided = build_conv4(Conv4Options(filters=4, strided=True), images)
    assert nn.MaxPool2d not in [type(m) for m in strided.modules()] and strided(images.support_x[1]).shape == (4, 4)
    omniglot = build_conv4(Conv4Options(), sample_batch((1, 28, 28)))
    assert count(omniglot) == count(Conv4(1, 5, hidden=64, image_size=28)), "the defaults: MAML's Omniglot network"

    vectors = sample_batch((3,), ways=None, targets=2)
    section = Section.from_dict("model", {"name": "mlp", "hidden": [7]})
    mlp = section.entry.build(section.options, vectors)
    assert isinstance(mlp, MLP) and mlp(vectors.query_x[0]).shape == (6, 2)
    assert [(m.in_features, m.out_features) for m in mlp if isinstance(m, nn.Linear)] == [(3, 7), (7, 2)]
    classifier = build_mlp(MLPOptions(), sample_batch((5,), ways=3))
    assert [(m.in_features, m.out_features) for m in classifier if isinstance(m, nn.Linear)] == [(5, 40), (40, 40),
                                                                                                (40, 3)]


def test_mismatched_inputs_are_refused_with_the_fix() -> None:
    with pytest.raises(ConfigError, match=r"^model 'mlp' takes vectors, but the tasks give examples of shape "
                                          r"\(1, 28, 28\); use model 'conv4'$"):
        entry("model", "mlp").build(MLPOptions(), sample_batch((1, 28, 28)))
    with pytest.raises(ConfigError, match=r"^model 'conv4' takes square images \[channels, side, side\], but the "
                                          r"tasks give examples of shape \(1,\); use model 'mlp'$"):
        entry("model", "conv4").build(Conv4Options(), sample_batch((1,), ways=None))
    with pytest.raises(ConfigError, match=r"examples of shape \(3, 28, 14\); use model 'mlp'"):
        build_conv4(Conv4Options(), sample_batch((3, 28, 14)))


def test_model_options_are_checked() -> None:
    with pytest.raises(ConfigError, match="^'filters' is not an option of model 'mlp'; its options are hidden$"):
        Section.from_dict("model", {"name": "mlp", "filters": 8})
    with pytest.raises(ConfigError, match="^'hidden' is not an option of model 'conv4'; its options are filters, "
                                          "strided$"):
        Section.from_dict("model", {"name": "conv4", "hidden": 8})
    with pytest.raises(ConfigError, match=r"option 'hidden' must hold layer sizes >= 1, got \[40, 0\]"):
        MLPOptions(hidden=(40, 0))
    with pytest.raises(ConfigError, match="option 'filters' must be > 0, got 0"):
        Section.from_dict("model", {"name": "conv4", "filters": 0})
