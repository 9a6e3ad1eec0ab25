"""Running the teacher between two boundaries: the one way every stage does it.

The teacher is a sequence of neighbourhood modules (``parts``); part ``k``
maps boundary ``k`` to boundary ``k + 1``. Distillation feeds, Student
Search and the noise probe all run stretches of it, and keep some of the
boundary values for later. A part may write into its input (an in-place ReLU
at a neighbourhood's start), so the rule is:

* the tensor passed in is never modified;
* every value returned stays as it was computed, whatever later parts do:
  each part that follows a kept value gets a copy of it.

>>> values = run_parts(parts, x, keep=True)        # doctest: +SKIP
>>> values[0] is x, len(values) == len(parts) + 1  # doctest: +SKIP
(True, True)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn


@torch.no_grad()
def run_parts(parts: Sequence[nn.Module], x: torch.Tensor, start: int = 0, stop: int | None = None, *,
              keep: bool = False) -> torch.Tensor | list[torch.Tensor]:
    """``parts[start:stop]`` applied in turn to ``x`` (the value at boundary ``start``), without gradients.

    Returns the value at boundary ``stop``; with ``keep``, the list
    ``[x, value at start + 1, ..., value at stop]``. Copies are made only
    where a part could otherwise overwrite a value the caller holds: the
    input, and with ``keep`` every intermediate value.
    """
    stop = len(parts) if stop is None else stop
    values = [x]
    h = x
    for k in range(start, stop):
        h = parts[k](h.clone() if keep or k == start else h)
        if keep:
            values.append(h)
    return values if keep else h
