"""A downsampling shortcut (2 x 2 average pool, then a 1x1 conv with bias) in one numba call,
with PyTorch's float32 results bit for bit.

Why. At batch 1 PyTorch spends more time around such a conv than in it: oneDNN's 1x1 conv of
64 -> 128 channels at 28 x 28 runs in about 0.1 ms, the call takes about 0.17 ms (its primitive
described anew each call), and the pool before it is another call of its own. Here both run in
one pass, with the conv's sums in vector registers (`fma_tile`).

Exactness. A 1x1 conv's output is bias + sum over input channels of x x w, and the float32
result depends on the order of the sums. PyTorch's CPU backends sum in blocks along the input
channels: oneDNN's 1x1 kernels in one block, each output a chain of fused multiply-adds from
zero, the bias added last; MKL's sgemm (PyTorch's choice for some small inputs) in blocks of
128 channels, each block's chain from zero added to the running result, which starts as the
bias. `PooledPointwise` runs the one that gives PyTorch's own outputs for each input shape:
it tries these block lengths on the first batch of each shape and thread count, and keeps
PyTorch's module for a shape where none is equal in every bit. The pool is PyTorch's: the
four values summed row by row, divided by 4.
"""
from __future__ import annotations

import numpy as np
import torch
from numba import njit, prange
from torch import Tensor, nn

from .buffers import POOL
from .fma import CHANNELS, POSITIONS, fma_tile
from .kernels import _ceil_div

BLOCKS = (None, 128, 64, 256)  # block lengths tried (None: all input channels in one block)


@njit(cache=True, parallel=True)
def pooled_pointwise(x, w, bias, block, pooled, out, parts):
    """out = conv1x1(avg_pool2d(x, 2)) + bias, NHWC: x float32 [N, H, W, C]; w float32 [C, O
    rounded up to CHANNELS] and bias [the same], zeros past O; block: input channels per block of
    sums; pooled: float32 [N x OH x OW, C], written; out: float32 [N, OH, OW, O]."""
    n_, h_, w_, c_ = x.shape
    oh, ow, og = out.shape[1], out.shape[2], out.shape[3]
    rows = x.reshape(n_ * h_, w_ * c_)
    channels = np.uintp(c_)
    for row in prange(n_ * oh):  # PyTorch's average: the four summed row by row, then / 4
        top = rows[(row // oh) * h_ + 2 * (row % oh)]
        bottom = rows[(row // oh) * h_ + 2 * (row % oh) + 1]
        for ox in range(ow):
            into = pooled[row * ow + ox]
            left = np.uintp(2 * ox) * channels
            right = left + channels
            for c in range(channels):
                total = top[left + c] + top[right + c]
                total = total + bottom[left + c]
                total = total + bottom[right + c]
                into[c] = total / np.float32(4)
    positions = n_ * oh * ow
    tiles = _ceil_div(positions, POSITIONS)
    wide = w.shape[1]
    units = tiles * (wide // CHANNELS)
    flat, weights, outputs = pooled.reshape(-1), w.reshape(-1), out.reshape(-1)
    parts = max(1, min(units, parts))
    for part in prange(parts):
        offsets = np.empty(POSITIONS, np.int64)
        result = np.empty((POSITIONS, CHANNELS), np.float32)
        for unit in range(part * units // parts, (part + 1) * units // parts):
            tile = unit // (wide // CHANNELS)
            o0 = (unit - tile * (wide // CHANNELS)) * CHANNELS
            width = np.uintp(min(CHANNELS, og - o0))
            for j in range(POSITIONS):
                offsets[j] = min(tile * POSITIONS + j, positions - 1) * c_
            fma_tile(flat, offsets, weights, o0, wide, c_, block, bias, result)
            for j in range(min(POSITIONS, positions - tile * POSITIONS)):
                at = np.uintp((tile * POSITIONS + j) * og + o0)
                for i in range(width):
                    outputs[at + i] = result[j, i]


def fits(shortcut: nn.Module) -> bool:
    """Whether `PooledPointwise` can run a shortcut.

    Args:
        shortcut: a block's shortcut module.

    Returns:
        True for an nn.Sequential of a 2 x 2 average pool (stride 2, no padding) and a 1x1
            conv with bias, Identity layers aside.
    """
    if not isinstance(shortcut, nn.Sequential):
        return False
    layers = [m for m in shortcut if not isinstance(m, nn.Identity)]
    if len(layers) != 2 or type(layers[0]) is not nn.AvgPool2d or type(layers[1]) is not nn.Conv2d:
        return False
    pool, conv = layers
    return (pool.kernel_size in (2, (2, 2)) and pool.stride in (2, (2, 2)) and pool.padding in (0, (0, 0))
            and pool.divisor_override is None and conv.kernel_size == (1, 1)
            and conv.stride == (1, 1) and conv.padding == (0, 0) and conv.groups == 1 and conv.bias is not None
            and conv.padding_mode == "zeros" and conv.weight.dtype == torch.float32)


class PooledPointwise(nn.Module):
    """A `fits` shortcut run by `pooled_pointwise` wherever that gives its outputs bit for bit
    (see the module's docstring); channels-last float32 CPU input, otherwise the shortcut.

    Args:
        shortcut: the shortcut, kept for the first batch of each shape and as the fallback.
    """

    def __init__(self, shortcut: nn.Sequential) -> None:
        super().__init__()
        self.shortcut = shortcut
        self.train(shortcut.training)
        conv = [m for m in shortcut if isinstance(m, nn.Conv2d)][0]
        out_channels, in_channels = conv.weight.shape[:2]
        wide = _ceil_div(out_channels, CHANNELS) * CHANNELS
        weight = np.zeros((in_channels, wide), np.float32)
        weight[:, :out_channels] = conv.weight.detach().float().reshape(out_channels, in_channels).t().numpy()
        bias = np.zeros(wide, np.float32)
        bias[:out_channels] = conv.bias.detach().float().numpy()
        self.weight, self.bias = weight, bias
        self.out_channels = out_channels
        # With ceil_mode, an odd side has a last window of its own divisor: such inputs stay PyTorch's.
        self.even_only = [m for m in shortcut if isinstance(m, nn.AvgPool2d)][0].ceil_mode
        self.block: dict[tuple, int | None] = {}  # by input shape and threads: the block length, None: PyTorch

    def forward(self, x: Tensor) -> Tensor:
        if (self.training or x.dtype != torch.float32 or x.device.type != "cpu" or x.dim() != 4
                or not x.is_contiguous(memory_format=torch.channels_last) or x.requires_grad):
            return self.shortcut(x)
        key = (tuple(x.shape), torch.get_num_threads())
        if key not in self.block:
            return self._choose(x, key)
        block = self.block[key]
        return self.shortcut(x) if block is None else self._run(x, block)

    def nhwc(self, x: Tensor) -> np.ndarray | None:
        """The output as an array, for a fused block that adds it in its kernel: no tensor made,
        no hooks run.

        Args:
            x: the shortcut's input.

        Returns:
            float32 NHWC, where the numba path runs for x; None otherwise (call the module).
        """
        if (self.training or x.dtype != torch.float32 or x.device.type != "cpu" or x.dim() != 4
                or not x.is_contiguous(memory_format=torch.channels_last) or x.requires_grad):
            return None
        block = self.block.get((tuple(x.shape), torch.get_num_threads()))
        return None if block is None else self._run_nhwc(x, block)

    def _run(self, x: Tensor, block: int) -> Tensor:
        return torch.from_numpy(self._run_nhwc(x, block)).permute(0, 3, 1, 2)

    def _run_nhwc(self, x: Tensor, block: int) -> np.ndarray:
        n, c, h, w = x.shape
        out = POOL.empty((n, h // 2, w // 2, self.out_channels), np.float32)  # reused once no one holds it
        pooled = POOL.empty((n * (h // 2) * (w // 2), c), np.float32)  # scratch, reused across calls
        pooled_pointwise(x.detach().permute(0, 2, 3, 1).numpy(), self.weight, self.bias, block, pooled, out,
                         torch.get_num_threads())
        return out

    def _choose(self, x: Tensor, key: tuple) -> Tensor:
        expected = self.shortcut(x)
        self.block[key] = None
        odd = x.shape[2] % 2 or x.shape[3] % 2
        if x.shape[2] >= 2 and x.shape[3] >= 2 and not (odd and self.even_only):
            for block in BLOCKS:
                length = x.shape[1] if block is None else block
                if torch.equal(self._run(x, length).view(torch.int32), expected.view(torch.int32)):  # every bit
                    self.block[key] = length
                    break
        return expected


def speed_up_shortcuts(model: nn.Module) -> int:
    """Run each `fits` shortcut of the model's fused blocks as a PooledPointwise, in place.

    Args:
        model: a packed model after `fuse_blocks`.

    Returns:
        How many shortcuts were swapped.
    """
    from .fused import FusedBinaryBlock  # it imports the packed layer, which imports numba's kernels
    swapped = 0
    for block in model.modules():
        if isinstance(block, FusedBinaryBlock) and fits(block.block.shortcut):
            block.block.shortcut = PooledPointwise(block.block.shortcut)
            swapped += 1
    return swapped
