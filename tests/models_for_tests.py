"""Small models with awkward corners, shared by the tests (importable as a factory file)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ndc.zoo import ViT


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


class PreNormLayer(nn.Module):
    """A pre-norm transformer layer on ``nn.MultiheadAttention``: the attention stays a leaf returning ``(out, None)``."""

    def __init__(self, dim: int = 32, heads: int = 4):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, 2 * dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(2 * dim, dim)

    def forward(self, x):
        y = self.norm1(x)
        x = x + self.attn(y, y, y, need_weights=False)[0]
        return x + self.fc2(self.act(self.fc1(self.norm2(x))))


class MHAEncoder(nn.Module):
    """Tokens (B, 6, 8) -> 5 logits through two pre-norm layers: the model of the issue's first report."""

    input_shape = (1, 6, 8)

    def __init__(self, dim: int = 32, depth: int = 2):
        super().__init__()
        self.embed = nn.Linear(8, dim)
        self.layers = nn.Sequential(*[PreNormLayer(dim) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 5)

    def forward(self, x):
        return self.head(self.norm(self.layers(self.embed(x))).mean(1))


def mha_encoder():
    return MHAEncoder()


class Chain(nn.Module):
    """A VGG-style chain: no residual block anywhere."""

    input_shape = (1, 3, 8, 8)

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                                      nn.MaxPool2d(2), nn.Conv2d(8, 16, 3, padding=1), nn.ReLU())
        self.classifier = nn.Linear(16 * 4 * 4, 4)

    def forward(self, x):
        return self.classifier(self.features(x).flatten(1))


def chain():
    return Chain()


class TupleOut(nn.Module):
    """Returns ``(logits, features)``."""

    input_shape = (1, 8)

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16))
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        h = self.body(x)
        return self.head(h), h


class DictOut(TupleOut):
    """Returns ``{"features": ..., "logits": ...}``."""

    def forward(self, x):
        h = self.body(x)
        return {"features": h, "logits": self.head(h)}


def tuple_out():
    return TupleOut()


def dict_out():
    return DictOut()


class ModelOutputOut(TupleOut):
    """Returns a Hugging Face ``SequenceClassifierOutput`` (``logits`` and ``hidden_states``)."""

    def forward(self, x):
        from transformers.modeling_outputs import SequenceClassifierOutput

        h = self.body(x)
        return SequenceClassifierOutput(logits=self.head(h), hidden_states=(h,))


def model_output():
    return ModelOutputOut()


class TokenClassifier(nn.Module):
    """Token ids (B, N) below 20 -> 3 logits: an embedding, one residual block, a head."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(20, 16)
        self.block = nn.Sequential(nn.LayerNorm(16), nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16))
        self.head = nn.Linear(16, 3)

    def forward(self, ids):
        h = self.embed(ids)
        h = h + self.block(h)
        return self.head(h.mean(1))


def token_classifier():
    return TokenClassifier()

def tiny_resnet_momentum_zero():
    """tiny_resnet with every batch norm at momentum 0, as models converted by MMdnn (torchcrepe's CREPE) carry."""
    model = tiny_resnet()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = 0.0
    return model


class LoopedViT(ViT):
    """The zoo's ViT with its blocks in an nn.ModuleList called one by one (timm's style): the list itself is never
    called, so only its children appear in the traced modules' stacks. ``block()`` makes each block (the zoo's
    transformer block by default); other keywords are the ViT's."""

    def __init__(self, block=None, **vit):
        super().__init__(**vit)
        self.blocks = nn.ModuleList(list(self.blocks) if block is None else [block() for _ in self.blocks])

    def forward(self, x):
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x)[:, 0])
