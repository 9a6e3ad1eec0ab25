"""Example teachers for ndc, as factories: ``ndc partition examples/models.py:resnet20``.

The definitions live in :mod:`ndc.zoo` so that ``ndc demo`` and the
benchmarks can use them after a plain install; this file is what a user's own
model file looks like: a module with functions that return an ``nn.Module``.
"""

from ndc.zoo import (  # noqa: F401
    bottleneck_resnet,
    cifar_resnet,
    densenet,
    mlp,
    mobilenetv2,
    resnet20,
    resnet20b,
    resnet50_like,
    resnet152_like,
    residual_mlp,
    vit,
)
