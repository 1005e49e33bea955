"""Backbones: output shapes, layer layout and parameter counts of the published networks."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from metaopt.models import MLP, Conv4


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
