"""What the teacher's input is: a float tensor (images, features) or integer token ids.

Every stage that makes an input for the teacher or a student (shape
propagation, FLOP counts, export checks, latency) draws it through
:class:`InputSpec`, so a language model gets token ids in ``[0, vocab)`` where
an image model gets Gaussian noise. The plan records the spec
(``plan.tracer["input"]``), so later stages make the same kind of input.

>>> InputSpec.parse("int64", high=100).sample((2, 8), torch.Generator().manual_seed(0)).dtype
torch.int64
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from ndc.errors import NdcError

DTYPES = ("float32", "int64")


@dataclass(frozen=True)
class InputSpec:
    """``dtype`` of the input; ``high`` is the exclusive upper bound of integer inputs (the vocabulary size)."""

    dtype: str = "float32"
    high: int | None = None

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise NdcError(f"unsupported input dtype {self.dtype!r}; choose from: {', '.join(DTYPES)}")
        if self.is_integer and (not isinstance(self.high, int) or self.high < 1):
            raise NdcError(f"integer inputs need a vocabulary size (the exclusive upper bound of the ids), got {self.high!r}")

    @classmethod
    def parse(cls, dtype: str | None, high: int | None = None) -> "InputSpec":
        return cls(dtype or "float32", high if dtype == "int64" else None)

    @property
    def is_integer(self) -> bool:
        return self.dtype == "int64"

    @property
    def torch_dtype(self) -> torch.dtype:
        return torch.int64 if self.is_integer else torch.float32

    def sample(self, shape, generator: torch.Generator | None = None) -> torch.Tensor:
        """A random input of ``shape``: token ids uniform in ``[0, high)``, or standard normal floats."""
        shape = tuple(int(d) for d in shape)
        if self.is_integer:
            return torch.randint(0, int(self.high), shape, generator=generator)
        return torch.randn(shape, generator=generator)

    def zeros(self, shape) -> torch.Tensor:
        return torch.zeros(tuple(shape), dtype=self.torch_dtype)

    def to_json(self) -> dict:
        return {"dtype": self.dtype, **({"high": self.high} if self.is_integer else {})}

    @classmethod
    def from_json(cls, d: dict | None) -> "InputSpec":
        return cls(**d) if d else cls()


FLOAT = InputSpec()


def vocabulary_size(model: nn.Module) -> int | None:
    """The token vocabulary of a language model: its config's ``vocab_size``, else its first embedding's rows."""
    config = getattr(model, "config", None)
    size = getattr(config, "vocab_size", None)
    if isinstance(size, int) and size > 0:
        return size
    for m in model.modules():
        if isinstance(m, nn.Embedding):
            return m.num_embeddings
    return None


def integer_inputs(model: nn.Module, high: int | None = None) -> InputSpec:
    """The spec of token-id inputs for ``model``; one clear line when the vocabulary cannot be told."""
    high = high or vocabulary_size(model)
    if high is None:
        raise NdcError("--input-dtype int64: cannot tell the vocabulary size (no config.vocab_size and no nn.Embedding "
                       "in the model); token ids need an upper bound")
    return InputSpec("int64", high)
