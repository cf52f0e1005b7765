"""The real-valued stem conv (few input channels, a large kernel: ResNet's 3 -> 64 7x7) in numba,
with PyTorch's float32 results bit for bit.

Why. At 224 px the stem conv is a quarter of a binary ResNet-18's time at batch 1. oneDNN runs
it at about 70% of the CPU's multiply-add peak, and PyTorch's call allocates its 3 MB output
anew each time; `direct_conv` keeps its sums in vector registers (`fma.fma_rows`, six
positions by 16 channels) and writes a reused buffer.

Exactness. oneDNN sums each output of such a conv as one chain of fused multiply-adds from
zero over its taps in the order (row, column, input channel), and adds the bias last (found by
fitting its outputs: every output matched). A tap in the zero padding adds nothing either way:
a chain from zero is never -0.0, so adding a product of zero leaves it as it is. Where PyTorch
sums otherwise (another backend, another shape), the first batch of each shape and thread
count shows it and `DirectConv2d` keeps PyTorch's conv for it.
"""
from __future__ import annotations

import numpy as np
import torch
from numba import njit, prange
from torch import Tensor, nn

from .buffers import POOL
from .fma import CHANNELS, POSITIONS, fma_rows
from .kernels import _ceil_div, _next_position, _position

MAX_IN_CHANNELS = 8  # the convs whose order was checked: an image's channels
GROUP = 8            # tiles a thread takes block by block


@njit(cache=True, parallel=True)
def direct_conv(x, w, bias, kh, kw, stride_h, stride_w, pad_h, pad_w, padded, out, parts):
    """out = conv2d(x, w) + bias, NHWC, in the order of the module's docstring. x: float32
    [N, H, W, C]; w: float32 [O / CHANNELS rounded up, KH x KW x C, CHANNELS] (taps row by row
    in each block of channels, zeros past O); bias: float32 [O rounded up]; padded: scratch
    [N, H + 2 pad_h, W + 2 pad_w, C], written; out: float32 [N, OH, OW, O]; the work in
    `parts` (the threads), each a contiguous share of the units (tiles of positions by blocks
    of channels), block by block within groups of GROUP tiles so that a block's weights stay
    in L1."""
    n_, h_, w_, c_ = x.shape
    hp, wp = padded.shape[1], padded.shape[2]
    oh, ow, og = out.shape[1], out.shape[2], out.shape[3]
    rows, into = x.reshape(n_ * h_, w_ * c_), padded.reshape(n_ * hp, wp * c_)
    left, right = pad_w * c_, (pad_w + w_) * c_
    for row in prange(n_ * hp):  # the input, in a zero border
        y = row % hp - pad_h
        if 0 <= y < h_:
            into[row, :left] = 0
            into[row, left:right] = rows[(row // hp) * h_ + y]
            into[row, right:] = 0
        else:
            into[row] = 0
    blocks, taps = w.shape[0], w.shape[1]
    positions = n_ * oh * ow
    tiles = _ceil_div(positions, POSITIONS)
    units = tiles * blocks
    flat, weights = padded.reshape(-1), w.reshape(-1)
    parts = max(1, min(units, parts))
    for part in prange(parts):
        offsets = np.empty(POSITIONS, np.int64)
        sums = np.empty((POSITIONS, CHANNELS), np.float32)
        for unit in range(part * units // parts, (part + 1) * units // parts):
            span = unit // (GROUP * blocks)
            size = min(GROUP, tiles - span * GROUP)
            rest = unit - span * GROUP * blocks
            block = rest // size
            first = (span * GROUP + rest - block * size) * POSITIONS
            count = min(POSITIONS, positions - first)
            n, oy, ox = _position(first, oh * ow, ow)
            for j in range(POSITIONS):
                if j < count:
                    offsets[j] = ((n * hp + oy * stride_h) * wp + ox * stride_w) * c_
                    n, oy, ox = _next_position(n, oy, ox, oh, ow)
                else:  # a last tile's spare lanes repeat its last position
                    offsets[j] = offsets[count - 1]
            fma_rows(flat, offsets, weights, block * taps * CHANNELS, CHANNELS, kh, kw * c_, wp * c_, sums)
            o0 = block * CHANNELS
            n, oy, ox = _position(first, oh * ow, ow)
            for j in range(count):
                for i in range(min(CHANNELS, og - o0)):
                    out[n, oy, ox, o0 + i] = sums[j, i] + bias[o0 + i]
                n, oy, ox = _next_position(n, oy, ox, oh, ow)


def fits(conv: nn.Module) -> bool:
    """Whether `DirectConv2d` can run a conv: a float32 nn.Conv2d of at most MAX_IN_CHANNELS
    inputs, one group, no dilation, zero padding given as numbers."""
    return (type(conv) is nn.Conv2d and conv.in_channels <= MAX_IN_CHANNELS and conv.groups == 1
            and conv.dilation == (1, 1) and conv.padding_mode == "zeros" and not isinstance(conv.padding, str)
            and conv.weight.dtype == torch.float32)


class DirectConv2d(nn.Module):
    """A `fits` conv run by `direct_conv` wherever that gives its outputs bit for bit (checked
    on the first batch of each shape and thread count); channels-last float32 CPU input,
    otherwise the conv itself.

    Args:
        conv: the conv, kept for those checks and as the fallback.
    """

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        self.conv = conv
        self.train(conv.training)
        out_channels = conv.out_channels
        wide = _ceil_div(out_channels, CHANNELS) * CHANNELS
        taps = conv.weight.detach().float().permute(2, 3, 1, 0).reshape(-1, out_channels)  # (ky, kx, c) by o
        weight = np.zeros((taps.shape[0], wide), np.float32)
        weight[:, :out_channels] = taps.numpy()
        # Block-major: each block of CHANNELS channels' weights contiguous, tap by tap.
        self.weight = np.ascontiguousarray(weight.reshape(-1, wide // CHANNELS, CHANNELS).transpose(1, 0, 2))
        self.bias = np.zeros(wide, np.float32)
        if conv.bias is not None:
            self.bias[:out_channels] = conv.bias.detach().float().numpy()
        self.fast: dict[tuple, bool] = {}  # by input shape and threads: whether direct_conv gives the conv's outputs

    def forward(self, x: Tensor) -> Tensor:
        if (self.training or x.dtype != torch.float32 or x.device.type != "cpu" or x.dim() != 4
                or not x.is_contiguous(memory_format=torch.channels_last) or x.requires_grad):
            return self.conv(x)
        key = (tuple(x.shape), torch.get_num_threads())
        fast = self.fast.get(key)
        if fast is None:
            expected = self.conv(x)
            self.fast[key] = torch.equal(self._run(x).view(torch.int32), expected.view(torch.int32))  # every bit
            return expected
        return self._run(x) if fast else self.conv(x)

    def _run(self, x: Tensor) -> Tensor:
        conv = self.conv
        n, c, h, w = x.shape
        (kh, kw), (sh, sw), (ph, pw) = conv.kernel_size, conv.stride, conv.padding
        oh, ow = (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1
        out = POOL.empty((n, oh, ow, conv.out_channels), np.float32)  # reused once no one holds it
        padded = POOL.empty((n, h + 2 * ph, w + 2 * pw, c), np.float32)
        direct_conv(x.detach().permute(0, 2, 3, 1).numpy(), self.weight, self.bias, kh, kw, sh, sw, ph, pw,
                    padded, out, torch.get_num_threads())
        return torch.from_numpy(out).permute(0, 3, 1, 2)


def speed_up_stem_convs(model: nn.Module) -> int:
    """Run each `fits` conv of the model's `stem` (an nn.Sequential) as a DirectConv2d, in place.

    Args:
        model: a packed inference model.

    Returns:
        How many convs were swapped.
    """
    stem = getattr(model, "stem", None)
    if not isinstance(stem, nn.Sequential):
        return 0
    swapped = 0
    for i, layer in enumerate(stem):
        if fits(layer):
            stem[i] = DirectConv2d(layer)
            swapped += 1
    return swapped
