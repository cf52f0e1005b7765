"""FLOPs in pytorch-estimate-flops's convention: Real-to-Binary Net's cost count.

`bnntrain.complexity` counts FLOPs as Bi-Real Net and ReActNet do: the multiply-accumulates
of the real-valued conv and linear layers, nothing else. Real-to-Binary Net's authors counted
theirs with an adapted `1adrianb/pytorch-estimate-flops` (pthflops; brais-martinez/real2binary,
issue 3), whose rules also charge the network's other arithmetic. This module applies the
rules of pthflops's public counter (`pthflops/ops_fx.py`), per operation of one sample:

- a real conv or linear layer: its multiply-accumulates, plus one per output for a bias;
- BN: 2 per element; ReLU: 2 per element (the comparison counts);
- max pooling: k - 1 per output; average pooling: k per output (a mean: one per input; an
  adaptive one: the input's H x W per output); a matmul: its MACs;
- an element-wise addition or product: its output's elements x its operands.

Binary convs are BOPs, as in `count_costs`. PReLU, sigmoid, the sign and the other functions
are free, as pthflops has no rule for them. pthflops counts what `torch.fx` shows it: a torch.nn
module as one op, and the additions and products in the code of the modules that hold others
(blocks, gates). So do we: the arithmetic inside a module without submodules (a PReLU written
out, a quantizer) or inside a binary layer is that layer's own, not counted again. Unlike fx we
count an operation however it is spelled (`x.mean((2, 3))` is a global average pool, `+=` an
addition). Listed in `uncounted`, so that nothing is left out unseen: the functions seen in
blocks with no rule, and the additions and products inside layers of ours without submodules
(fx would trace into those and charge them; a torch.nn layer's are its own).
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from .nn.layers import BinaryMixin

# Function names (torch.add, Tensor.__add__, Tensor.add_, ...) by the rule that counts them.
ADD = {"add", "add_", "__add__", "__radd__", "__iadd__"}
MUL = {"mul", "mul_", "__mul__", "__rmul__", "__imul__"}
RELU = {"relu", "relu_"}
MEAN = {"mean", "adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d"}
MATMUL = {"matmul", "__matmul__"}
FREE = {"__get__", "size", "dim", "numel", "__getitem__", "view", "reshape", "flatten", "contiguous"}


@dataclass
class ElementwiseCount:
    """The FLOPs of one sample in pthflops's rules, by kind of operation.

    Attributes:
        by_kind: FLOPs per kind ("conv/linear", "batch_norm", "relu", "max_pool", "avg_pool",
            "add", "mul").
        uncounted: the functions called in blocks that no rule charges (pthflops's free ones).
    """

    by_kind: Counter = field(default_factory=Counter)
    uncounted: set[str] = field(default_factory=set)

    @property
    def flops(self) -> int:
        """All of them."""
        return sum(self.by_kind.values())


def _module_flops(module: nn.Module, inputs: tuple, out: Tensor) -> tuple[str, int] | None:
    """pthflops's rule for a torch.nn layer, or None where it has none (free)."""
    if isinstance(module, BinaryMixin) and module.input_bits == 1 and module.weight_bits == 1:
        return None  # BOPs
    if isinstance(module, nn.modules.conv._ConvNd):
        bias = out.numel() if module.bias is not None else 0
        return "conv/linear", out.numel() * math.prod(module.weight.shape[1:]) + bias
    if isinstance(module, nn.Linear):
        bias = out.numel() if module.bias is not None else 0
        return "conv/linear", out.numel() * module.in_features + bias
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return "batch_norm", 2 * out.numel()
    if isinstance(module, nn.ReLU):
        return "relu", 2 * out.numel()
    if isinstance(module, nn.modules.pooling._MaxPoolNd):
        return "max_pool", (_window(module.kernel_size, out) - 1) * out.numel()
    if isinstance(module, nn.modules.pooling._AvgPoolNd):
        return "avg_pool", _window(module.kernel_size, out) * out.numel()
    if isinstance(module, nn.modules.pooling._AdaptiveAvgPoolNd):  # pthflops: the input's H x W per output
        return "avg_pool", inputs[0].shape[-2] * inputs[0].shape[-1] * out.numel()
    return None


def _window(kernel: int | tuple[int, ...], out: Tensor) -> int:
    return kernel ** (out.dim() - 2) if isinstance(kernel, int) else math.prod(kernel)


class _BlockArithmetic(TorchFunctionMode):
    """Charges the additions, products, ReLUs and means called in the code of composite modules."""

    def __init__(self, count: ElementwiseCount, stack: list[nn.Module]) -> None:
        super().__init__()
        self.count, self.stack = count, stack

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not self.stack or _inside_binary(self.stack) or not isinstance(out, Tensor):
            return out  # outside the model, or a binary layer's own (its BOPs cover it)
        name = getattr(func, "__name__", str(func))
        inner = self.stack[-1]
        if next(inner.children(), None) is None:
            # A layer's own forward (no submodules): its arithmetic is the layer's. One of ours
            # (a PReLU written out) would be traced into by fx, which charges its additions and
            # products: listed, so that the count's rule for it is seen.
            if (name in ADD or name in MUL) and not type(inner).__module__.startswith("torch.nn"):
                self.count.uncounted.add(f"{type(inner).__name__}.{'add' if name in ADD else 'mul'}")
        elif name in MATMUL:
            self.count.by_kind["conv/linear"] += args[0].numel() * out.shape[-1]
        elif name in ADD or name in MUL:  # pthflops: elements x operands
            self.count.by_kind["add" if name in ADD else "mul"] += out.numel() * len(args)
        elif name in RELU:
            self.count.by_kind["relu"] += 2 * out.numel()
        elif name in MEAN:
            self.count.by_kind["avg_pool"] += args[0].numel()
        elif name not in FREE:
            self.count.uncounted.add(name)
        return out


def _inside_binary(stack: list[nn.Module]) -> bool:
    return any(isinstance(m, BinaryMixin) for m in stack)


def count_elementwise_flops(model: nn.Module, input_shape: tuple[int, ...]) -> ElementwiseCount:
    """The FLOPs of one sample of `input_shape` (C, H, W) in pthflops's rules, at the model's
    current precision (binary convs with binary inputs and weights are BOPs, left out).

    Args:
        model: the model; it runs once, in eval mode, on a sample of zeros (the meta device works).
        input_shape: the sample's shape (C, H, W).

    Returns:
        The count, by kind of operation.
    """
    count, stack, handles = ElementwiseCount(), [], []

    def enter(module: nn.Module, _inputs: tuple) -> None:
        stack.append(module)

    def leave(module: nn.Module, inputs: tuple, out: Tensor) -> None:
        stack.pop()
        if _inside_binary(stack):
            return  # a binary layer's quantizers and parts: its BOPs cover them
        charged = _module_flops(module, inputs, out)
        if charged is not None:
            count.by_kind[charged[0]] += charged[1]

    for module in model.modules():
        handles += [module.register_forward_pre_hook(enter), module.register_forward_hook(leave)]
    param = next(model.parameters())
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad(), _BlockArithmetic(count, stack):
            model(torch.zeros(1, *input_shape, device=param.device, dtype=param.dtype))
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    return count
