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
count shows it and `stem.DirectConv2d` keeps PyTorch's conv for it.

`conv_max_pool` also runs the max-pool after such a conv in the same pass (the conv's output,
3 MB per image at 224 px, then never goes to memory), with PyTorch's pooling rule.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from .fma import CHANNELS, POSITIONS, fma_rows
from .kernels import _ceil_div
from .nibble_packing import write_nibbles, zero_border
from .pooling import take
from .tiles import _next_position, _position, _tile_offsets, _unit

GROUP = 8            # tiles a thread takes block by block


@njit(cache=True, parallel=True)
def pad_input(x, pad_h, pad_w, padded):
    """padded = x (float32 NHWC) in a border of pad_h rows and pad_w columns of zeros."""
    n_, h_, w_, c_ = x.shape
    hp, wp = padded.shape[1], padded.shape[2]
    rows, into = x.reshape(n_ * h_, w_ * c_), padded.reshape(n_ * hp, wp * c_)
    left, right = pad_w * c_, (pad_w + w_) * c_
    for row in prange(n_ * hp):
        y = row % hp - pad_h
        if 0 <= y < h_:
            into[row, :left] = 0
            into[row, left:right] = rows[(row // hp) * h_ + y]
            into[row, right:] = 0
        else:
            into[row] = 0


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
    pad_input(x, pad_h, pad_w, padded)
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
            block, first = _unit(unit, GROUP, blocks, tiles, POSITIONS)
            count = min(POSITIONS, positions - first)
            _tile_offsets(offsets, first, count, oh, ow, hp, wp, stride_h, stride_w, c_)
            fma_rows(flat, offsets, weights, block * taps * CHANNELS, CHANNELS, kh, kw * c_, wp * c_, sums)
            o0 = block * CHANNELS
            n, oy, ox = _position(first, oh * ow, ow)
            for j in range(count):
                for i in range(min(CHANNELS, og - o0)):
                    out[n, oy, ox, o0 + i] = sums[j, i] + bias[o0 + i]
                n, oy, ox = _next_position(n, oy, ox, oh, ow)


@njit(cache=True, parallel=True)
def conv_max_pool(x, w, bias, kh, kw, stride_h, stride_w, pad_h, pad_w, pool, pool_stride, pool_pad, padded, ring,
                  out, threshold, nib, parts):
    """max_pool2d(direct_conv's output) with PyTorch's rule (`pooling.take`), bit for bit, with
    no conv output in memory: each thread computes the conv rows its pooled rows need, row by
    row, into its share of `ring` (float32 [parts, pool, OW, O rounded up]: conv row y in slot
    y mod pool) and pools them from there (in cache) into out (float32 [N, POH, POW, O]).
    With a non-empty `nib`, the signs of out + threshold go there too, as the next layer's
    nibble input (`nibble_packing.write_nibbles`). The other arguments are direct_conv's and
    max_pool_nhwc's."""
    n_, h_, w_, c_ = x.shape
    pad_input(x, pad_h, pad_w, padded)
    hand_on = nib.shape[0] > 0
    nib_h, nib_w = (nib.shape[1] - out.shape[1]) // 2, (nib.shape[2] - out.shape[2]) // 2
    wide = np.empty(0, np.uint64)
    if hand_on:
        zero_border(nib, nib_h, nib_w)
        if nib.shape[3] % 8 == 0:
            wide = nib.reshape(-1).view(np.uint64)
    hp, wp = padded.shape[1], padded.shape[2]
    oh, ow = (hp - kh) // stride_h + 1, (wp - kw) // stride_w + 1
    poh = out.shape[1]
    blocks, taps = w.shape[0], w.shape[1]
    flat, weights = padded.reshape(-1), w.reshape(-1)
    rows = n_ * poh
    parts = max(1, min(rows, parts))
    for part in prange(parts):
        offsets = np.empty(POSITIONS, np.int64)
        sums = np.empty((POSITIONS, CHANNELS), np.float32)
        conv_rows = ring[part]
        done_n, done_y = -1, -1  # the last conv row computed
        for r in range(part * rows // parts, (part + 1) * rows // parts):
            n = r // poh
            y0 = (r - n * poh) * pool_stride - pool_pad
            y1, y0 = min(oh, y0 + pool), max(0, y0)
            for y in range(y0, y1):
                if n == done_n and y <= done_y:
                    continue
                into = conv_rows[y % pool]
                for block in range(blocks):  # a block's weights stay in L1 for the row
                    o0 = block * CHANNELS
                    for first in range(0, ow, POSITIONS):
                        count = min(POSITIONS, ow - first)
                        for j in range(POSITIONS):  # spare lanes repeat the last position
                            offsets[j] = ((n * hp + y * stride_h) * wp + (first + min(j, count - 1)) * stride_w) * c_
                        fma_rows(flat, offsets, weights, block * taps * CHANNELS, CHANNELS, kh, kw * c_, wp * c_, sums)
                        for j in range(count):
                            for i in range(CHANNELS):
                                into[first + j, o0 + i] = sums[j, i] + bias[o0 + i]
                done_n, done_y = n, y
            py = r - n * poh
            _pool_row(conv_rows, y0, y1, pool, pool_stride, pool_pad, out[n, py])
            if hand_on:
                for px in range(out.shape[2]):
                    for o0 in range(0, out.shape[3], 64):
                        write_nibbles(out, threshold, nib, wide, n, py, px, o0, min(out.shape[3], o0 + 64), nib_h, nib_w)


@njit(cache=True, inline="always")
def _pool_row(conv_rows, y0, y1, pool, stride, pad, dst):
    # One pooled row from conv rows y0 to y1 (slot y mod pool of conv_rows [pool, OW, O+]):
    # PyTorch's scan, row by row from -inf, a 3 x 3 window unrolled (vectorized over channels).
    ow, og = conv_rows.shape[1], dst.shape[1]
    top, middle, bottom = conv_rows[y0 % pool], conv_rows[(y0 + 1) % pool], conv_rows[(y0 + 2) % pool]
    for px in range(dst.shape[0]):
        x0 = px * stride - pad
        x1, x0 = min(ow, x0 + pool), max(0, x0)
        into = dst[px]
        if pool == 3 and y1 - y0 == 3 and x1 - x0 == 3:
            left, centre, right = top[x0], top[x0 + 1], top[x0 + 2]
            for c in range(og):
                into[c] = take(right[c], take(centre[c], take(left[c], np.float32(-np.inf))))
            left, centre, right = middle[x0], middle[x0 + 1], middle[x0 + 2]
            for c in range(og):
                into[c] = take(right[c], take(centre[c], take(left[c], into[c])))
            left, centre, right = bottom[x0], bottom[x0 + 1], bottom[x0 + 2]
            for c in range(og):
                into[c] = take(right[c], take(centre[c], take(left[c], into[c])))
        else:
            for c in range(og):
                best = np.float32(-np.inf)
                for y in range(y0, y1):
                    for xx in range(x0, x1):
                        best = take(conv_rows[y % pool, xx, c], best)
                into[c] = best
