"""Sign quantizers with straight-through estimators, selectable by name.

Every binary quantizer returns +1 for x >= 0 and -1 otherwise (sign(0) = +1, so a
binary tensor never holds zeros). They differ only in the gradient they pass back.
Each autograd Function saves the least its backward needs: a boolean mask where
the gradient is a clipped identity, the input itself only where the gradient's
shape depends on it. Activation memory, not compute, limits BNN batch sizes.
"""
from __future__ import annotations

import functools
import math
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


def approx_sign_grad(x: Tensor, grad: Tensor, signs: Tensor | None = None) -> Tensor:
    """Bi-Real Net's ApproxSign (a piecewise-quadratic sign): g * (2 - 2|x|) where |x| < 1,
    else 0 (2 at 0, 0 at |x| = 1: the official polynomial's). With sign(x) at hand, |x| is
    x * sign(x), exactly, and 2 - 2|x| one pass; then in place on that one temporary."""
    slope = torch.addcmul(_TWO.to(x.dtype), x, signs, value=-2) if signs is not None else x.abs().mul_(-2).add_(2)
    return slope.clamp_(min=0).mul_(grad)


_TWO = torch.tensor(2.0)


def swish_sign_grad(x: Tensor, grad: Tensor, signs: Tensor | None = None, *, beta: float) -> Tensor:
    """BNN+'s SignSwish: g * beta * (2 - beta x tanh(beta x / 2)) / (1 + cosh(beta x))."""
    bx = beta * x
    return grad * (beta * (2 - bx * torch.tanh(bx / 2)) / (1 + torch.cosh(bx)))


class ApproxSign(torch.autograd.Function):
    """sign(x) with Bi-Real Net's ApproxSign gradient (`approx_sign_grad`); saves x."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        ctx.save_for_backward(x)
        return sign(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        (x,) = ctx.saved_tensors
        return approx_sign_grad(x, grad)


class SwishSign(torch.autograd.Function):
    """sign(x) with BNN+'s SignSwish gradient (`swish_sign_grad`); saves x."""

    @staticmethod
    def forward(ctx, x: Tensor, beta: float) -> Tensor:
        ctx.save_for_backward(x)
        ctx.beta = beta
        return sign(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (x,) = ctx.saved_tensors
        return swish_sign_grad(x, grad, beta=ctx.beta), None


def surrogate_grad(quantizer: str, args: dict) -> Callable[[Tensor, Tensor], Tensor] | None:
    """The gradient formula of a sign estimator that needs x itself (None for ste_sign, whose
    gradient is a mask): what a binary conv fuses with its sign (sign_conv.py)."""
    if quantizer == "approx_sign":
        return approx_sign_grad
    if quantizer == "swish_sign":
        return functools.partial(swish_sign_grad, beta=args.get("beta", 5.0))
    return None


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


class ScaledSign(torch.autograd.Function):
    """The weight binarizer alpha * sign(w), alpha the per-output-channel mean |w| (held
    constant), in one pass forward and one or a few back. `unscaled=False` (larq's
    magnitude-aware sign): the product's gradient, alpha * g where |w| <= 1. `unscaled=True`
    (Bi-Real Net's and ReActNet's code): g where |w| < 1, the gradient of their
    clamp(w, -1, 1)."""

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


def channel_scale(w: Tensor) -> Tensor:
    """The per-output-channel mean |w| (XNOR-Net, Bi-Real), detached: one pass over w."""
    dims = tuple(range(1, w.dim()))
    return torch.linalg.vector_norm(w.detach(), ord=1, dim=dims, keepdim=True) / math.prod(w.shape[1:])


WEIGHT_GRADIENTS = ("scaled", "unscaled")


def binarize_weight(w: Tensor, scale: bool, gradient: str = "scaled") -> Tensor:
    """sign(w), optionally times the per-output-channel mean |w| (XNOR-Net, Bi-Real), whose
    gradient is `scaled` (larq) or `unscaled` (the official Bi-Real/ReActNet code): see
    ScaledSign. Without the scale, the clipped straight-through sign (WeightSign)."""
    if gradient not in WEIGHT_GRADIENTS:
        raise ConfigError(f"unknown model.weight_gradient '{gradient}'; expected one of: {', '.join(WEIGHT_GRADIENTS)}")
    if scale:
        return ScaledSign.apply(w, gradient == "unscaled")
    return WeightSign.apply(w)


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
