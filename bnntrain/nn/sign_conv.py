"""An input quantizer's sign followed by a convolution, as one autograd step that keeps less
for the backward pass, in the form the quantizer declares (`Quantizer.fused`):

- "mask" (the gradient is g where a mask holds, e.g. the straight-through sign): unfused,
  autograd keeps the boolean mask (1 byte per element) and the convolution its +-1 input as
  floats (4 bytes). Here the sign bit and the mask share one uint8 code, and the +-1 input is
  rebuilt from it: 1 byte per element instead of 5.
- "input" (the gradient needs x, e.g. ApproxSign, SignSwish): x is kept, not x and the +-1
  tensor besides; the backward pass rebuilds the signs from x and calls the quantizer's formula.

Either way the gradients are exactly those of the quantizer followed by F.conv2d.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .quantizers import Quantizer, sign

NEGATIVE_BIT, INSIDE_BIT = 1, 2  # sign(x) = -1; the mask holds (where the gradient passes)


def _conv_backward(ctx, grad: Tensor, signs: Tensor, weight: Tensor) -> tuple[Tensor | None, ...]:
    """The convolution's gradients with respect to its +-1 input, weight and bias."""
    stride, padding, dilation, groups = ctx.conv
    dtype, has_bias = ctx.dtypes
    needs = ctx.needs_input_grad
    grad_in, grad_w, grad_b = torch.ops.aten.convolution_backward(
        grad.to(dtype), signs.to(dtype), weight.to(dtype), [weight.shape[0]] if has_bias else None, stride, padding,
        dilation, False, [0, 0], groups, [needs[0], needs[1], has_bias and needs[2]])
    if grad_w is not None:
        grad_w = grad_w.to(weight.dtype)
    if grad_b is not None:
        grad_b = grad_b.to(dtype)
    return grad_in, grad_w, grad_b


def _conv_forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, conv: tuple) -> Tensor:
    out = F.conv2d(sign(x), weight, bias, *conv)
    ctx.conv = conv
    ctx.dtypes = (out.dtype, bias is not None)  # under autocast the conv may run in bf16
    return out


class MaskSignConv2d(torch.autograd.Function):
    """For `fused = "mask"`: keeps one uint8 code per input (sign bit and mask)."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, stride: tuple, padding: tuple,
                dilation: tuple, groups: int, quantizer: Quantizer) -> Tensor:
        code = quantizer.mask(x).to(torch.uint8).mul_(INSIDE_BIT).add_(torch.signbit(x))
        ctx.save_for_backward(code, weight)
        ctx.x_dtype = x.dtype
        return _conv_forward(ctx, x, weight, bias, (stride, padding, dilation, groups))

    @staticmethod
    def backward(ctx, grad: Tensor):
        code, weight = ctx.saved_tensors
        signs = (code & NEGATIVE_BIT).to(ctx.dtypes[0]).mul_(-2).add_(1)
        grad_in, grad_w, grad_b = _conv_backward(ctx, grad, signs, weight)
        if grad_in is not None:
            grad_in = grad_in.mul_((code >> 1).to(grad_in.dtype)).to(ctx.x_dtype)
        return grad_in, grad_w, grad_b, None, None, None, None, None


class InputSignConv2d(torch.autograd.Function):
    """For `fused = "input"`: keeps x, and calls the quantizer's `gradient(x, g, signs)`."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, stride: tuple, padding: tuple,
                dilation: tuple, groups: int, quantizer: Quantizer) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.gradient = quantizer.gradient
        return _conv_forward(ctx, x, weight, bias, (stride, padding, dilation, groups))

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, weight = ctx.saved_tensors
        signs = sign(x)
        grad_in, grad_w, grad_b = _conv_backward(ctx, grad, signs, weight)
        if grad_in is not None:
            grad_in = ctx.gradient(x, grad_in.to(x.dtype), signs)
        return grad_in, grad_w, grad_b, None, None, None, None, None


# What each declared form fuses into; a quantizer with no form (None) runs unfused.
FUSED_SIGN_CONVS: dict[str, type[torch.autograd.Function]] = {"mask": MaskSignConv2d, "input": InputSignConv2d}
