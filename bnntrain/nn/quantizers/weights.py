"""The binarizers of a binary layer's latent weights."""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from ...registry import choose
from .base import WEIGHT_QUANTIZERS, Quantizer, registered
from .estimators import MaskedSignEstimator


@registered(WEIGHT_QUANTIZERS, "sign")
class WeightSign(MaskedSignEstimator):
    """sign(w) with the clipped straight-through gradient: g where |w| <= clip_value (larq's
    `SteSign(clip_value)` as a kernel quantizer; QuickNet's is 1.25).

    Args:
        clip_value: where the gradient stops, the bound included.
    """

    def __init__(self, clip_value: float = 1.0) -> None:
        super().__init__()
        self.clip_value = clip_value

    def arguments(self) -> dict[str, Any]:
        # At the default, its name alone, as before the argument existed.
        return {} if self.clip_value == 1.0 else {"clip_value": self.clip_value}

    def mask(self, w: Tensor) -> Tensor:
        return w.abs() <= self.clip_value


def channel_scale(w: Tensor) -> Tensor:
    """The per-output-channel mean |w| (XNOR-Net, Bi-Real), detached: one pass over w."""
    dims = tuple(range(1, w.dim()))
    return torch.linalg.vector_norm(w.detach(), ord=1, dim=dims, keepdim=True) / math.prod(w.shape[1:])


class ScaledSignFunction(torch.autograd.Function):
    """alpha * sign(w) in one pass forward and one or a few back (see ScaledSign)."""

    @staticmethod
    def forward(ctx, w: Tensor, unscaled: bool) -> Tensor:
        alpha = channel_scale(w)
        ctx.save_for_backward(w, alpha)
        ctx.unscaled = unscaled
        return torch.copysign(alpha, w)  # alpha with w's sign bit: alpha * sign(w)

    @staticmethod
    def backward(ctx, grad: Tensor):
        w, alpha = ctx.saved_tensors
        if ctx.unscaled:
            return torch.ops.aten.hardtanh_backward(grad, w, -1.0, 1.0), None  # g where -1 < w < 1
        return torch.where(w.abs() <= 1, grad * alpha, 0.0), None


SCALED_SIGN_GRADIENTS = ("scaled", "unscaled")


@registered(WEIGHT_QUANTIZERS, "scaled_sign")
class ScaledSign(Quantizer):
    """alpha * sign(w), alpha the per-output-channel mean |w| (held constant). Its gradient:
    `scaled` (larq's magnitude-aware sign), the product's, alpha * g where |w| <= 1;
    `unscaled` (Bi-Real Net's and ReActNet's code), g where |w| < 1, the gradient of their
    clamp(w, -1, 1). The scale depends on the whole tensor: no fused form.

    Args:
        gradient: `scaled` or `unscaled`.

    Raises:
        ValueError: another gradient (`UnknownChoice`).
    """

    channel_scaled = True
    packable = True  # sign(w)'s signs, scaled per output channel

    def __init__(self, gradient: str = "scaled") -> None:
        super().__init__()
        self.gradient_mode = choose("model.weight_quantizer.gradient", gradient, SCALED_SIGN_GRADIENTS)

    def arguments(self) -> dict[str, Any]:
        return {"gradient": self.gradient_mode}

    def values(self, w: Tensor) -> Tensor:
        alpha = channel_scale(w).unsqueeze(-1)
        return torch.cat([-alpha, alpha], dim=-1)

    def forward(self, w: Tensor) -> Tensor:
        return ScaledSignFunction.apply(w, self.gradient_mode == "unscaled")
