"""Small models with awkward corners, shared by the tests (importable as a factory file)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class Branchy(nn.Module):
    """Python control flow on tensor values: torch.fx cannot trace this module."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        if x.sum() > 0:
            return self.conv(x)
        return -self.conv(x)


class WithBranchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = Branchy()
        self.c = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        return self.c(F.relu(self.b(F.relu(self.a(x)))))


class RootBranch(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)

    def forward(self, x):
        if x.mean() > 0:  # untraceable at the root
            x = x * 2
        return self.conv(x)


class OptionalArg(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 4)

    def forward(self, x, mask=None, scale: float = 1.0):
        if mask is not None:
            x = x * mask
        return self.fc(x) * scale


class Block(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return F.relu(x + self.conv2(F.relu(self.conv1(x))))


class ShapeAcross(nn.Module):
    """Reads the batch size at the top and uses it after two blocks: must not block the cuts."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.block1 = Block(4)
        self.block2 = Block(4)
        self.fc = nn.Linear(4 * 8 * 8, 3)

    def forward(self, x):
        b = x.size(0)
        channels = x.shape[1]
        x = self.block2(self.block1(self.stem(x)))
        return self.fc(x.reshape(b, -1)) + channels * 0


class InplaceInput(nn.Module):
    """Block whose first op writes into its input in place."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 1)
        self.conv = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        x = self.stem(x)
        y = F.relu(x, inplace=True)  # writes into x: the skip below sees relu(x)
        return x + self.conv(y)


def with_branchy():
    return WithBranchy()


def root_branch():
    return RootBranch()


def optional_arg():
    return OptionalArg()


def shape_across():
    return ShapeAcross()


def resnet20_5classes():
    from ndc.zoo import resnet20

    return resnet20(num_classes=5)


def not_a_module():
    return 42


def tiny_resnet():
    """ResNet-8 with 8 base channels: three residual blocks, for fast pipeline tests at 3x16x16."""
    from ndc.zoo import cifar_resnet

    return cifar_resnet(depth=8, width=8)


class LongNames(nn.Module):
    """A residual block under a module name longer than a file name may be (255 bytes)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.add_module("block_" + "very_long_module_name_" * 14, Block(8))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))

    def forward(self, x):
        x = F.relu(self.stem(x))
        block = getattr(self, "block_" + "very_long_module_name_" * 14)
        return self.head(block(x))


def long_names() -> nn.Module:
    return LongNames()


class HeadMLP(nn.Module):
    """An MLP on 16-vectors: two hidden layers of 32, and a head of ``outputs`` (through a sigmoid when asked)."""

    def __init__(self, outputs: int, sigmoid: bool):
        super().__init__()
        self.fc1 = nn.Linear(16, 32)
        self.fc2 = nn.Linear(32, 32)
        self.head = nn.Linear(32, outputs)
        self.sigmoid = sigmoid

    def forward(self, x):
        out = self.head(F.relu(self.fc2(F.relu(self.fc1(x)))))
        return torch.sigmoid(out) if self.sigmoid else out


def sigmoid_mlp():
    """Five independent yes/no outputs (multi-label), probabilities from a sigmoid inside the model."""
    return HeadMLP(5, sigmoid=True)


def regression_mlp():
    """Three real-valued outputs, no activation: a regression head."""
    return HeadMLP(3, sigmoid=False)


def tiny_resnet_momentum_zero():
    """tiny_resnet with every batch norm at momentum 0, as models converted by MMdnn (torchcrepe's CREPE) carry."""
    model = tiny_resnet()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = 0.0
    return model
