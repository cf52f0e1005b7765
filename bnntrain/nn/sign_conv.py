"""sign(x) followed by a convolution, as one autograd step that saves one byte per input.

Unfused, autograd keeps the sign's boolean mask (1 byte per element) and the convolution
keeps its +-1 input as floats (4 bytes). Here the sign bit and the straight-through mask
share one uint8 code, and the +-1 input is rebuilt from it in the backward pass: the
activation memory a binary conv holds for backward drops from 5 to 1 byte per element.
The gradients are exactly those of SteSign followed by F.conv2d.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .quantizers import sign

NEGATIVE_BIT, INSIDE_BIT = 1, 2  # sign(x) = -1; |x| < 1 (where the straight-through gradient passes)


class SignConv2d(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, stride: tuple, padding: tuple,
                dilation: tuple, groups: int) -> Tensor:
        code = (x.abs() < 1).to(torch.uint8).mul_(INSIDE_BIT).add_(torch.signbit(x))
        out = F.conv2d(sign(x), weight, bias, stride, padding, dilation, groups)
        ctx.save_for_backward(code, weight)
        ctx.conv = (stride, padding, dilation, groups)
        ctx.dtypes = (x.dtype, out.dtype, bias is not None)  # under autocast the conv may run in bf16
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        code, weight = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.conv
        x_dtype, dtype, has_bias = ctx.dtypes
        grad = grad.to(dtype)
        signs = (code & NEGATIVE_BIT).to(dtype).mul_(-2).add_(1)
        needs = ctx.needs_input_grad
        grad_in, grad_w, grad_b = torch.ops.aten.convolution_backward(
            grad, signs, weight.to(dtype), [weight.shape[0]] if has_bias else None, stride, padding, dilation,
            False, [0, 0], groups, [needs[0], needs[1], has_bias and needs[2]])
        if grad_in is not None:
            grad_in = grad_in.mul_((code >> 1).to(grad_in.dtype)).to(x_dtype)
        if grad_w is not None:
            grad_w = grad_w.to(weight.dtype)
        if grad_b is not None:
            grad_b = grad_b.to(dtype)
        return grad_in, grad_w, grad_b, None, None, None, None


class SurrogateSignConv2d(torch.autograd.Function):
    """sign(x) followed by a convolution for the estimators whose gradient needs x itself
    (ApproxSign, SignSwish): x is saved, not the +-1 tensor the convolution would keep as
    well, which the backward pass rebuilds from x. The gradients are exactly those of the
    estimator's sign followed by F.conv2d."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, stride: tuple, padding: tuple,
                dilation: tuple, groups: int, grad_fn) -> Tensor:
        out = F.conv2d(sign(x), weight, bias, stride, padding, dilation, groups)
        ctx.save_for_backward(x, weight)
        ctx.conv, ctx.grad_fn = (stride, padding, dilation, groups), grad_fn
        ctx.dtypes = (out.dtype, bias is not None)  # under autocast the conv may run in bf16
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, weight = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.conv
        dtype, has_bias = ctx.dtypes
        grad = grad.to(dtype)
        needs = ctx.needs_input_grad
        signs = sign(x)
        grad_in, grad_w, grad_b = torch.ops.aten.convolution_backward(
            grad, signs.to(dtype), weight.to(dtype), [weight.shape[0]] if has_bias else None, stride, padding,
            dilation, False, [0, 0], groups, [needs[0], needs[1], has_bias and needs[2]])
        if grad_in is not None:
            grad_in = ctx.grad_fn(x, grad_in.to(x.dtype), signs)
        if grad_w is not None:
            grad_w = grad_w.to(weight.dtype)
        if grad_b is not None:
            grad_b = grad_b.to(dtype)
        return grad_in, grad_w, grad_b, None, None, None, None, None
