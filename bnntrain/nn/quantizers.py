"""Sign quantizers with straight-through estimators, selectable by name.

Every binary quantizer returns +1 for x >= 0 and -1 otherwise (sign(0) = +1, so a
binary tensor never holds zeros). They differ only in the gradient they pass back.
Each autograd Function saves the least its backward needs: a boolean mask where
the gradient is a clipped identity, the input itself only where the gradient's
shape depends on it. Activation memory, not compute, limits BNN batch sizes.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from ..errors import ConfigError
from ..registry import Registry


def sign(x: Tensor) -> Tensor:
    """+1 or -1 by the sign bit of x, in x's dtype: sign(0) = +1, so a binary tensor holds no
    zeros. (IEEE's negative zero, which only a product with a negative factor yields, maps to
    -1.) copysign is one pass over memory, several times faster than a compare-and-select."""
    return torch.copysign(torch.ones((), dtype=x.dtype, device=x.device), x)


class SteSign(torch.autograd.Function):
    """The collection's BinActive: gradient g where |x| < 1, else 0."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        ctx.save_for_backward(x.abs() < 1)
        return sign(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        (inside,) = ctx.saved_tensors
        return grad * inside


class ApproxSign(torch.autograd.Function):
    """Bi-Real Net's piecewise-quadratic approximation: g * (2 - 2|x|) where |x| < 1."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        ctx.save_for_backward(x)
        return sign(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        (x,) = ctx.saved_tensors
        return grad * (2 - 2 * x.abs()).clamp_(min=0)


class SwishSign(torch.autograd.Function):
    """BNN+'s SignSwish: g * beta * (2 - beta x tanh(beta x / 2)) / (1 + cosh(beta x))."""

    @staticmethod
    def forward(ctx, x: Tensor, beta: float) -> Tensor:
        ctx.save_for_backward(x)
        ctx.beta = beta
        return sign(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (x,) = ctx.saved_tensors
        bx = ctx.beta * x
        slope = ctx.beta * (2 - bx * torch.tanh(bx / 2)) / (1 + torch.cosh(bx))
        return grad * slope, None


class WeightSign(torch.autograd.Function):
    """Weight binarizer: sign with the clipped straight-through gradient (g where |w| <= 1)."""

    @staticmethod
    def forward(ctx, w: Tensor) -> Tensor:
        ctx.save_for_backward(w.abs() <= 1)
        return sign(w)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        (inside,) = ctx.saved_tensors
        return grad * inside


class MagnitudeSign(torch.autograd.Function):
    """The weight binarizer of Bi-Real Net's and ReActNet's official code: forward
    alpha * sign(w), alpha the per-output-channel mean |w| (detached); backward g where
    |w| < 1 (the gradient of their clamp(w, -1, 1)), not multiplied by alpha."""

    @staticmethod
    def forward(ctx, w: Tensor) -> Tensor:
        ctx.save_for_backward(w.abs() < 1)
        return sign(w) * channel_scale(w)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        (inside,) = ctx.saved_tensors
        return grad * inside


def channel_scale(w: Tensor) -> Tensor:
    """The per-output-channel mean |w| (XNOR-Net, Bi-Real), detached."""
    return w.detach().abs().mean(dim=tuple(range(1, w.dim())), keepdim=True)


WEIGHT_GRADIENTS = ("scaled", "unscaled")


def binarize_weight(w: Tensor, scale: bool, gradient: str = "scaled") -> Tensor:
    """sign(w), optionally times the per-output-channel mean |w| (XNOR-Net, Bi-Real).

    The scale is detached in both estimators. `scaled` (larq's magnitude-aware sign): the
    product's gradient, alpha * g where |w| <= 1. `unscaled` (Bi-Real Net's and ReActNet's
    official code): g where |w| < 1.
    """
    if gradient not in WEIGHT_GRADIENTS:
        raise ConfigError(f"unknown model.weight_gradient '{gradient}'; expected one of: {', '.join(WEIGHT_GRADIENTS)}")
    if scale and gradient == "unscaled":
        return MagnitudeSign.apply(w)
    b = WeightSign.apply(w)
    return b * channel_scale(w) if scale else b


def leaky_clip(x: Tensor) -> Tensor:
    """Real-valued pre-training activation (trick 16): x for |x| <= 1, else 0.1 x + 0.9 sign(x)."""
    return torch.where(x.abs() <= 1, x, 0.1 * x + 0.9 * sign(x))


def clamp(x: Tensor) -> Tensor:
    """The second pre-training activation (trick 16): x clamped to [-1, 1]."""
    return x.clamp(-1, 1)


# The sign estimators a model's binary layers choose from (`model.quantizer`): the forward is
# always sign(x); they differ in the gradient.
SIGN_ESTIMATORS: Registry[Callable[..., Callable[[Tensor], Tensor]]] = Registry("model.quantizer")


@SIGN_ESTIMATORS.register("ste_sign")
def _ste_sign() -> Callable[[Tensor], Tensor]:
    return SteSign.apply


@SIGN_ESTIMATORS.register("approx_sign")
def _approx_sign() -> Callable[[Tensor], Tensor]:
    return ApproxSign.apply


@SIGN_ESTIMATORS.register("swish_sign")
def _swish_sign(beta: float = 5.0) -> Callable[[Tensor], Tensor]:  # BNN+'s default beta
    return lambda x: SwishSign.apply(x, beta)


# What a binary layer does to its input in a stage whose activations are not binary
# (`stage.activations`): the stage sets these, never the model.
PRECISION_MODES: dict[str, Callable[[Tensor], Tensor]] = {"real": lambda x: x, "leaky_clip": leaky_clip,
                                                          "clamp": clamp}
