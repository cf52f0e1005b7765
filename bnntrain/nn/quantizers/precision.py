"""What a binary layer does to its input in a stage whose activations are not binary
(`stage.activations`): the stage sets these, never the model. They are not quantizers."""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from .base import sign


def leaky_clip(x: Tensor) -> Tensor:
    """Real-valued pre-training activation (trick 16): x for |x| <= 1, else 0.1 x + 0.9 sign(x).

    Args:
        x: the binary layer's input.

    Returns:
        A tensor of x's shape.
    """
    return torch.where(x.abs() <= 1, x, 0.1 * x + 0.9 * sign(x))


def clamp(x: Tensor) -> Tensor:
    """The second pre-training activation (trick 16): x clamped to [-1, 1].

    Args:
        x: the binary layer's input.

    Returns:
        A tensor of x's shape.
    """
    return x.clamp(-1, 1)


PRECISION_MODES: dict[str, Callable[[Tensor], Tensor]] = {"real": lambda x: x, "leaky_clip": leaky_clip,
                                                          "clamp": clamp, "tanh": torch.tanh}
"""What a binary layer applies to its input in a stage whose activations are not binary, by
`stage.activations`: `real` (the input as it is), `leaky_clip`, `clamp` or `tanh` (Real-to-Binary
Net's real-valued stage, larq-zoo's `r2b_fp`: tanh of the conv's input, its gradient 1 - tanh^2)."""
