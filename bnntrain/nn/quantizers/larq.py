"""Two of larq's quantizers (github.com/larq/larq, `larq/quantizers.py` and `larq/math.py`),
as larq computes them: `SteHeaviside` (0/1 activations) and `MagnitudeAwareSign` (Bi-Real
Net's scaled weights)."""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .base import INPUT_QUANTIZERS, WEIGHT_QUANTIZERS, Quantizer, registered
from .weights import ScaledSign


class Heaviside(torch.autograd.Function):
    """1 where x > 0, else 0, forward; g where |x| <= clip_value (or everywhere, for None)
    backward. Saves the boolean mask, as the straight-through signs do."""

    @staticmethod
    def forward(ctx, x: Tensor, clip_value: float | None) -> Tensor:
        ctx.save_for_backward(None if clip_value is None else x.abs() <= clip_value)
        return (x > 0).to(x.dtype)  # larq's heaviside: sign(relu(x)), 0 at x = 0

    @staticmethod
    def backward(ctx, grad: Tensor):
        (inside,) = ctx.saved_tensors
        return (grad if inside is None else grad * inside), None


@registered(INPUT_QUANTIZERS, "ste_heaviside")
class SteHeaviside(Quantizer):
    """larq's `SteHeaviside`: 1 where x > 0, else 0 (0 at x = 0, as larq's `math.heaviside`),
    with the straight-through gradient g where |x| <= clip_value (larq's `_clipped_gradient`).

    Its values are 0 and 1, not +-1: the packed export refuses it, and a binary conv does
    not fuse it (the fused forms compute sign(x)).

    Args:
        clip_value: where the gradient stops (larq's default, 1.0); None passes it everywhere.
    """

    def __init__(self, clip_value: float | None = 1.0) -> None:
        super().__init__()
        self.clip_value = clip_value

    def arguments(self) -> dict[str, Any]:
        return {"clip_value": self.clip_value}

    def values(self, x: Tensor) -> Tensor:
        return torch.tensor([0.0, 1.0], dtype=x.dtype, device=x.device)

    def forward(self, x: Tensor) -> Tensor:
        return Heaviside.apply(x, self.clip_value)


@registered(WEIGHT_QUANTIZERS, "magnitude_aware_sign")
class MagnitudeAwareSign(ScaledSign):
    """larq's `MagnitudeAwareSign`: alpha sign(w), alpha the per-output-channel mean |w| held
    constant (`stop_gradient`), whose gradient is alpha g where |w| <= 1 (alpha times its
    `ste_sign`'s). That is `scaled_sign` with `gradient: scaled`, which this is, under larq's
    name; larq's `clip_value` is kept at its default, 1.0. larq's sign is +1 at w = -0.0,
    where this one, like every binary quantizer here, keeps the sign bit.
    """

    def __init__(self) -> None:
        super().__init__(gradient="scaled")

    def arguments(self) -> dict[str, Any]:
        return {}
