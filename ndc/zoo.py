"""Model families ndc is tested and benchmarked on, written in plain PyTorch (no torchvision).

Every factory returns a freshly initialised ``nn.Module`` in eval mode's
default (train) state; pass it to ndc as ``ndc.zoo:resnet20`` or, from a
checkout, ``examples/models.py:resnet20``.

* :func:`resnet20` -- CIFAR ResNetV1-20 (He et al. 2016), option A (zero-pad)
  shortcuts as in the paper; :func:`resnet20b` with option B (1x1 conv) shortcuts.
* :func:`bottleneck_resnet` -- ResNet-50-style bottleneck network for 32x32 inputs;
  :func:`resnet152_like` has ResNet-152's block layout (3, 8, 36, 3).
* :func:`mobilenetv2` -- inverted residuals with depthwise convolutions.
* :func:`densenet` -- dense blocks that concatenate every layer's output.
* :func:`vit` -- a small vision transformer (attention, LayerNorm, MLP, residuals).
* :func:`mlp` -- a plain multi-layer perceptron; :func:`residual_mlp` -- a deep
  residual MLP, used to benchmark the analysis on very long graphs.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "resnet20",
    "resnet20b",
    "cifar_resnet",
    "demo_teacher",
    "bottleneck_resnet",
    "resnet50_like",
    "resnet152_like",
    "mobilenetv2",
    "densenet",
    "vit",
    "mlp",
    "residual_mlp",
    "FAMILIES",
]


# ----------------------------------------------------------------- CIFAR ResNetV1


class PadShortcut(nn.Module):
    """Option A shortcut: subsample by 2 and zero-pad the new channels (no parameters)."""

    def __init__(self, pad: int):
        super().__init__()
        self.pad = pad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))


class BasicBlock(nn.Module):
    def __init__(self, inp: int, planes: int, stride: int = 1, shortcut: str = "A"):
        super().__init__()
        self.conv1 = nn.Conv2d(inp, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or inp != planes:
            if shortcut == "A":
                self.shortcut = PadShortcut((planes - inp) // 2)
            else:
                self.shortcut = nn.Sequential(nn.Conv2d(inp, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out = out + self.shortcut(x)
        return F.relu(out)


class CifarResNet(nn.Module):
    def __init__(self, depth: int = 20, num_classes: int = 10, in_channels: int = 3, width: int = 16, shortcut: str = "A"):
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError("CIFAR ResNet depth must be 6n+2")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        layers, inp = [], width
        for stage, planes in enumerate((width, 2 * width, 4 * width)):
            blocks = []
            for i in range(n):
                stride = 2 if stage > 0 and i == 0 else 1
                blocks.append(BasicBlock(inp, planes, stride, shortcut))
                inp = planes
            layers.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = layers
        self.fc = nn.Linear(inp, num_classes)
        _init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.fc(x)


def cifar_resnet(depth: int = 20, num_classes: int = 10, in_channels: int = 3, width: int = 16, shortcut: str = "A") -> CifarResNet:
    """CIFAR ResNetV1 of depth 6n+2 (8, 14, 20, 32, 56, ...)."""
    return CifarResNet(depth, num_classes, in_channels, width, shortcut)


def resnet20(num_classes: int = 10, in_channels: int = 3) -> CifarResNet:
    """CIFAR ResNetV1-20 with option A shortcuts: 0.27M parameters, 9 residual blocks."""
    return CifarResNet(20, num_classes, in_channels, shortcut="A")


def demo_teacher() -> CifarResNet:
    """The teacher of ``ndc demo``: ResNet-14 (six residual blocks, 8 base channels) for 1 x 28 x 28 images."""
    return CifarResNet(14, num_classes=10, in_channels=1, width=8)


def resnet20b(num_classes: int = 10, in_channels: int = 3) -> CifarResNet:
    """CIFAR ResNetV1-20 with option B (projection) shortcuts."""
    return CifarResNet(20, num_classes, in_channels, shortcut="B")


# ----------------------------------------------------------- bottleneck ResNet


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inp: int, planes: int, stride: int = 1):
        super().__init__()
        out = planes * self.expansion
        self.conv1 = nn.Conv2d(inp, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or inp != out:
            self.downsample = nn.Sequential(nn.Conv2d(inp, out, 1, stride, bias=False), nn.BatchNorm2d(out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        out += identity
        return self.relu(out)


class BottleneckResNet(nn.Module):
    def __init__(self, layers=(3, 4, 6, 3), num_classes: int = 10, in_channels: int = 3, width: int = 16):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        inp, stages = width, []
        for i, n in enumerate(layers):
            planes = width * 2**i
            blocks = []
            for j in range(n):
                blocks.append(Bottleneck(inp, planes, 2 if i > 0 and j == 0 else 1))
                inp = planes * Bottleneck.expansion
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(inp, num_classes)
        _init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def bottleneck_resnet(layers=(3, 4, 6, 3), num_classes: int = 10, in_channels: int = 3, width: int = 16) -> BottleneckResNet:
    """A ResNet with bottleneck blocks for 32x32 inputs."""
    return BottleneckResNet(tuple(layers), num_classes, in_channels, width)


def resnet50_like(num_classes: int = 10, in_channels: int = 3) -> BottleneckResNet:
    """ResNet-50's block layout (3, 4, 6, 3), narrow (base width 16) for CIFAR-sized inputs."""
    return BottleneckResNet((3, 4, 6, 3), num_classes, in_channels, 16)


def resnet152_like(num_classes: int = 10, in_channels: int = 3) -> BottleneckResNet:
    """ResNet-152's block layout (3, 8, 36, 3): a graph of ResNet-152's size."""
    return BottleneckResNet((3, 8, 36, 3), num_classes, in_channels, 16)


# ----------------------------------------------------------------- MobileNetV2


class InvertedResidual(nn.Module):
    def __init__(self, inp: int, oup: int, stride: int, expand: int):
        super().__init__()
        hidden = inp * expand
        self.use_res = stride == 1 and inp == oup
        layers: list[nn.Module] = []
        if expand != 1:
            layers += [nn.Conv2d(inp, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6(inplace=True)]
        layers += [
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU6(inplace=True),
            nn.Conv2d(hidden, oup, 1, bias=False),
            nn.BatchNorm2d(oup),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_res:
            return x + self.conv(x)
        return self.conv(x)


class MobileNetV2(nn.Module):
    # (expand, channels, repeats, stride): MobileNetV2's table, scaled for 32x32 inputs.
    CONFIG = ((1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 2, 2), (6, 96, 2, 1))

    def __init__(self, num_classes: int = 10, in_channels: int = 3, width_mult: float = 0.5):
        super().__init__()
        c = lambda ch: max(8, int(round(ch * width_mult / 8)) * 8)  # noqa: E731
        inp = c(32)
        self.stem = nn.Sequential(nn.Conv2d(in_channels, inp, 3, 1, 1, bias=False), nn.BatchNorm2d(inp), nn.ReLU6(inplace=True))
        blocks = []
        for t, ch, n, s in self.CONFIG:
            out = c(ch)
            for i in range(n):
                blocks.append(InvertedResidual(inp, out, s if i == 0 else 1, t))
                inp = out
        self.features = nn.Sequential(*blocks)
        last = c(320)
        self.head = nn.Sequential(nn.Conv2d(inp, last, 1, bias=False), nn.BatchNorm2d(last), nn.ReLU6(inplace=True))
        self.classifier = nn.Linear(last, num_classes)
        _init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.head(self.features(self.stem(x)))
        return self.classifier(x.mean((2, 3)))


def mobilenetv2(num_classes: int = 10, in_channels: int = 3, width_mult: float = 0.5) -> MobileNetV2:
    """A MobileNetV2-style network: inverted residual blocks with depthwise convolutions."""
    return MobileNetV2(num_classes, in_channels, width_mult)


# -------------------------------------------------------------------- DenseNet


class DenseLayer(nn.Module):
    def __init__(self, inp: int, growth: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(inp)
        self.conv1 = nn.Conv2d(inp, 4 * growth, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(4 * growth)
        self.conv2 = nn.Conv2d(4 * growth, growth, 3, 1, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(F.relu(self.bn1(x)))
        out = self.conv2(F.relu(self.bn2(out)))
        return torch.cat([x, out], 1)


class Transition(nn.Module):
    def __init__(self, inp: int, out: int):
        super().__init__()
        self.bn = nn.BatchNorm2d(inp)
        self.conv = nn.Conv2d(inp, out, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(self.conv(F.relu(self.bn(x))), 2)


class DenseNet(nn.Module):
    def __init__(self, blocks=(4, 4, 4), growth: int = 12, num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        ch = 2 * growth
        self.conv1 = nn.Conv2d(in_channels, ch, 3, 1, 1, bias=False)
        stages: list[nn.Module] = []
        for i, n in enumerate(blocks):
            layers = []
            for _ in range(n):
                layers.append(DenseLayer(ch, growth))
                ch += growth
            stages.append(nn.Sequential(*layers))
            if i < len(blocks) - 1:
                stages.append(Transition(ch, ch // 2))
                ch //= 2
        self.features = nn.Sequential(*stages)
        self.bn = nn.BatchNorm2d(ch)
        self.fc = nn.Linear(ch, num_classes)
        _init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(self.conv1(x))
        x = F.adaptive_avg_pool2d(F.relu(self.bn(x)), 1)
        return self.fc(torch.flatten(x, 1))


def densenet(blocks=(4, 4, 4), growth: int = 12, num_classes: int = 10, in_channels: int = 3) -> DenseNet:
    """A DenseNet-BC-style network: every dense layer concatenates its output to its input."""
    return DenseNet(tuple(blocks), growth, num_classes, in_channels)


# -------------------------------------------------------------------- ViT


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.scale = (dim // heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(B, N, C))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class TransformerBlock(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: int = 4):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, dim * mlp_ratio)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    def __init__(self, image: int = 32, patch: int = 4, dim: int = 64, depth: int = 4, heads: int = 4, num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        self.patch_embed = nn.Conv2d(in_channels, dim, patch, patch)
        tokens = (image // patch) ** 2
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, tokens + 1, dim) * 0.02)
        self.blocks = nn.Sequential(*[TransformerBlock(dim, heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1) + self.pos_embed
        x = self.norm(self.blocks(x))
        return self.head(x[:, 0])


def vit(image: int = 32, patch: int = 4, dim: int = 64, depth: int = 4, heads: int = 4, num_classes: int = 10, in_channels: int = 3) -> ViT:
    """A small vision transformer: each block is two residual sub-blocks (attention, MLP)."""
    return ViT(image, patch, dim, depth, heads, num_classes, in_channels)


# -------------------------------------------------------------------- MLPs


def mlp(in_features: int = 3 * 32 * 32, hidden=(256, 128), num_classes: int = 10) -> nn.Sequential:
    """A plain MLP: flatten, then Linear/ReLU layers (no residuals)."""
    layers: list[nn.Module] = [nn.Flatten()]
    for h in hidden:
        layers += [nn.Linear(in_features, h), nn.ReLU()]
        in_features = h
    layers.append(nn.Linear(in_features, num_classes))
    return nn.Sequential(*layers)


class ResidualMLPBlock(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, dim)
        self.fc2 = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(F.relu(self.fc1(x)))


class ResidualMLP(nn.Module):
    def __init__(self, blocks: int, dim: int, in_features: int, num_classes: int):
        super().__init__()
        self.inp = nn.Linear(in_features, dim)
        self.blocks = nn.Sequential(*[ResidualMLPBlock(dim) for _ in range(blocks)])
        self.out = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.blocks(self.inp(x.flatten(1))))


def residual_mlp(blocks: int = 1000, dim: int = 16, in_features: int = 64, num_classes: int = 10) -> ResidualMLP:
    """A deep residual MLP (``blocks`` residual blocks), for benchmarking the analysis."""
    return ResidualMLP(blocks, dim, in_features, num_classes)


# --------------------------------------------------------------------- init


def _init(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.Linear):
            nn.init.kaiming_uniform_(m.weight, a=math.sqrt(5))


# family name -> (factory, input shape); the families every stage is tested on.
FAMILIES = {
    "resnet20": (resnet20, (1, 3, 32, 32)),
    "resnet20b": (resnet20b, (1, 3, 32, 32)),
    "bottleneck": (lambda: bottleneck_resnet((1, 1, 1, 1)), (1, 3, 32, 32)),
    "mobilenetv2": (mobilenetv2, (1, 3, 32, 32)),
    "densenet": (lambda: densenet((2, 2, 2)), (1, 3, 32, 32)),
    "vit": (lambda: vit(depth=2), (1, 3, 32, 32)),
    "mlp": (lambda: mlp(3 * 8 * 8, (32, 16)), (1, 3, 8, 8)),
}
