"""The sign estimators for a binary layer's input: the forward is sign(x); the gradient is the
estimator's. Each saves the least its backward needs: a boolean mask where the gradient is
a clipped identity, x itself only where the gradient's shape depends on it. Activation
memory, not compute, limits BNN batch sizes."""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor

from .base import INPUT_QUANTIZERS, Quantizer, registered, sign


class MaskedSign(torch.autograd.Function):
    """sign(x) with the gradient g where mask(x) holds, else 0; saves the boolean mask."""

    @staticmethod
    def forward(ctx, x: Tensor, mask: Callable[[Tensor], Tensor]) -> Tensor:
        ctx.save_for_backward(mask(x))
        return sign(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (inside,) = ctx.saved_tensors
        return grad * inside, None


class SurrogateSign(torch.autograd.Function):
    """sign(x) with a surrogate gradient formula of x; saves x."""

    @staticmethod
    def forward(ctx, x: Tensor, gradient: Callable[[Tensor, Tensor], Tensor]) -> Tensor:
        ctx.save_for_backward(x)
        ctx.gradient = gradient
        return sign(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (x,) = ctx.saved_tensors
        return ctx.gradient(x, grad), None


class SignEstimator(Quantizer):
    """The base of the sign estimators: forward is sign(x), the values -1 and +1; a subclass
    states the gradient."""

    packable = True

    def values(self, x: Tensor) -> Tensor:
        return torch.tensor([-1.0, 1.0], dtype=x.dtype, device=x.device)


class MaskedSignEstimator(SignEstimator):
    """sign(x) whose gradient is g where `mask(x)` holds, else 0: a subclass states `mask`.
    It keeps the boolean mask for the backward pass (in a binary conv, one byte per input
    with the sign)."""

    fused = "mask"

    def forward(self, x: Tensor) -> Tensor:
        return MaskedSign.apply(x, self.mask)


class SurrogateSignEstimator(SignEstimator):
    """sign(x) whose gradient is `gradient(x, g)`, a formula of x that a subclass states. It
    keeps x for the backward pass."""

    fused = "input"

    def forward(self, x: Tensor) -> Tensor:
        return SurrogateSign.apply(x, self.gradient)


@registered(INPUT_QUANTIZERS, "ste_sign")
class SteSign(MaskedSignEstimator):
    """The collection's BinActive: gradient g where |x| < 1, else 0; or, with a `clip_value`,
    larq's `SteSign(clip_value)`: g where |x| <= clip_value (QuickNet's 1.25).

    Args:
        clip_value: None (the collection's |x| < 1) or where larq's gradient stops, the bound
            included.
    """

    def __init__(self, clip_value: float | None = None) -> None:
        super().__init__()
        self.clip_value = clip_value

    def arguments(self) -> dict[str, Any]:
        # The collection's estimator is its name alone, as before the argument existed.
        return {} if self.clip_value is None else {"clip_value": self.clip_value}

    def mask(self, x: Tensor) -> Tensor:
        return x.abs() < 1 if self.clip_value is None else x.abs() <= self.clip_value


@registered(INPUT_QUANTIZERS, "approx_sign")
class ApproxSign(SurrogateSignEstimator):
    """Bi-Real Net's ApproxSign (a piecewise-quadratic sign): g * (2 - 2|x|) where |x| < 1,
    else 0 (2 at 0, 0 at |x| = 1: the official polynomial's)."""

    def gradient(self, x: Tensor, grad: Tensor, signs: Tensor | None = None) -> Tensor:
        # With sign(x) at hand, |x| is x * sign(x), exactly, and 2 - 2|x| one pass; then in
        # place on that one temporary. (The 2 is made here, not once at import: a module the
        # registry imports while a model is built on the meta device would make it a meta tensor.)
        two = torch.full((), 2.0, dtype=x.dtype)
        slope = torch.addcmul(two, x, signs, value=-2) if signs is not None else x.abs().mul_(-2).add_(2)
        return slope.clamp_(min=0).mul_(grad)


@registered(INPUT_QUANTIZERS, "swish_sign")
class SwishSign(SurrogateSignEstimator):
    """BNN+'s SignSwish: g * beta * (2 - beta x tanh(beta x / 2)) / (1 + cosh(beta x)).

    Args:
        beta: the sharpness of the gradient's peak at 0 (BNN+'s default, 5).
    """

    def __init__(self, beta: float = 5.0) -> None:  # BNN+'s default beta
        super().__init__()
        self.beta = beta

    def arguments(self) -> dict[str, Any]:
        return {"beta": self.beta}

    def gradient(self, x: Tensor, grad: Tensor, signs: Tensor | None = None) -> Tensor:
        bx = self.beta * x
        return grad * (self.beta * (2 - bx * torch.tanh(bx / 2)) / (1 + torch.cosh(bx)))
