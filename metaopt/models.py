"""Backbones of the meta-learning literature: Conv4 for images, an MLP for regression.

Both are registered models (``"conv4"``, ``"mlp"``) with their options; a run builds its model
sized for a sample batch of its tasks (inputs and number of classes or targets).

Example:
    >>> import torch
    >>> Conv4(in_channels=1, num_classes=5, hidden=64)(torch.randn(2, 1, 28, 28)).shape
    torch.Size([2, 5])
    >>> MLP(1, 1, hidden=(40, 40))(torch.randn(7, 1)).shape
    torch.Size([7, 1])
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from torch import nn

from metaopt.options import ConfigError, Options
from metaopt.problems.episode import Episode
from metaopt.registry import register_model

__all__ = ["MLP", "Conv4", "Conv4Options", "MLPOptions", "build_conv4", "build_mlp"]


class Conv4(nn.Sequential):
    """Four blocks of [3x3 conv, batch norm, ReLU, 2x2 down-sampling], then a linear classifier.

    The network of Vinyals et al. (2016) as used by MAML (Finn et al. 2017, §5.2): 64 filters on
    Omniglot, 32 on miniImageNet (48 in MAML++). ``strided=True`` is MAML's Omniglot variant:
    stride-2 convolutions instead of max-pooling, and the feature map averaged over its
    positions before the classifier (cbfinn/maml ``utils.py``, ``forward_conv``).

    Args:
        in_channels: image channels (1 for Omniglot, 3 for miniImageNet).
        num_classes: outputs of the classifier (the ways).
        hidden: filters per convolution.
        image_size: side of the square input (28 Omniglot, 84 miniImageNet).
        strided: stride-2 convolutions and global average pooling instead of max-pooling.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 5, hidden: int = 64, image_size: int = 28,
                 strided: bool = False) -> None:
        blocks: list[nn.Module] = []
        size = image_size
        for i in range(4):
            block = [nn.Conv2d(in_channels if i == 0 else hidden, hidden, 3, stride=2 if strided else 1, padding=1),
                     nn.BatchNorm2d(hidden), nn.ReLU()]
            if not strided:
                block.append(nn.MaxPool2d(2))
            blocks.append(nn.Sequential(*block))
            size = (size + 1) // 2 if strided else size // 2
        if size < 1:
            raise ValueError(f"image_size={image_size} is too small for four down-sampling blocks")
        if strided:
            blocks.append(nn.AdaptiveAvgPool2d(1))
            size = 1
        super().__init__(*blocks, nn.Flatten(), nn.Linear(hidden * size * size, num_classes))


class MLP(nn.Sequential):
    """Fully connected network with ReLU between layers (MAML's sinusoid regressor: 40-40).

    Args:
        in_features, out_features: input and output sizes.
        hidden: sizes of the hidden layers.
    """

    def __init__(self, in_features: int, out_features: int, hidden: Sequence[int] = (40, 40)) -> None:
        sizes = [in_features, *hidden, out_features]
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
            layers.append(nn.Linear(a, b))
            if i < len(sizes) - 2:
                layers.append(nn.ReLU())
        super().__init__(*layers)


def _sizes(example: Episode) -> tuple[tuple[int, ...], int]:
    """The shape of one input and the number of outputs (classes, or target features) of a sample batch."""
    outputs = example.ways if example.is_classification else example.query_y.shape[-1]
    return tuple(example.support_x.shape[2:]), outputs


@dataclass(frozen=True)
class MLPOptions(Options):
    """A fully connected network for vector inputs.

    Args:
        hidden: hidden layer sizes (MAML's sinusoid regressor: 40, 40).
    """

    hidden: tuple[int, ...] = (40, 40)

    def check(self) -> None:
        super().check()
        if any(size < 1 for size in self.hidden):
            raise ConfigError(f"option 'hidden' must hold layer sizes >= 1, got {list(self.hidden)}")


@dataclass(frozen=True)
class Conv4Options(Options):
    """The four-block convolutional network for square images.

    Args:
        filters: channels of each convolution (64 Omniglot, 32 miniImageNet, 48 MAML++ miniImageNet).
        strided: down-sample with stride-2 convolutions instead of max-pooling (MAML's Omniglot network).
    """

    positive = ("filters",)
    filters: int = 64
    strided: bool = False


@register_model("mlp", MLPOptions)
def build_mlp(options: MLPOptions, example: Episode) -> MLP:
    """MLP with ReLU between layers, for vector inputs."""
    features, outputs = _sizes(example)
    if len(features) != 1:
        raise ConfigError(f"model 'mlp' takes vectors, but the tasks give examples of shape {features}; use model "
                          "'conv4'")
    return MLP(features[0], outputs, hidden=options.hidden)


@register_model("conv4", Conv4Options)
def build_conv4(options: Conv4Options, example: Episode) -> Conv4:
    """Conv4 of Vinyals et al. 2016 as used by MAML, for square images."""
    features, outputs = _sizes(example)
    if len(features) != 3 or features[1] != features[2]:
        raise ConfigError(f"model 'conv4' takes square images [channels, side, side], but the tasks give examples "
                          f"of shape {features}; use model 'mlp'")
    return Conv4(features[0], outputs, hidden=options.filters, image_size=features[1], strided=options.strided)
