"""The numba kernels of `bnntrain.infer`: bit packing (in packing.py), the XNOR-popcount
convolution, and a popcount throughput microbenchmark. Pure Python compiled by numba's LLVM
at first use (and cached on disk, `cache=True`), so nothing needs a C compiler; the same
source compiles on x86-64 and ARM64.

Layout. Activations are packed NHWC: `a[n, y, x, word]`, uint64, bit `c % 64` of word
`c // 64` set where the sign of channel c is +1 (x >= 0), a grouped conv's groups each
starting on a word of their own, the bits past the last channel 0. Weights are packed
`w[group, ky, kx, word, out]` with the output channel innermost, so that one input word is
compared with many output channels' words in a row: the inner loop `acc[o] +=
popcount(a ^ w[..., o])` runs over contiguous memory, and LLVM vectorizes it (AVX-512
VPOPCNTQ where the CPU has it, NEON `cnt` on ARM64).

Exactness. With +-1 operands, sum(a * w) over K of them is K - 2 * popcount(a xor w).
PyTorch pads the +-1 input with zeros, so a tap outside the image contributes nothing: the
kernel loops over the valid taps of each output position only and takes K = valid taps x
input channels per group (bits past the last channel are 0 in both operands and never
differ). The integer is exact; the output is `scale * integer + bias` in float32.
"""
from __future__ import annotations

import numpy as np
from numba import get_num_threads, njit, prange, types
from llvmlite import ir
from numba.extending import intrinsic, overload

from .packing import pack_nchw, pack_nhwc, sign_bits64

# The packing kernels (packing.py) are part of this module's API, as packed_conv.py calls them.
__all__ = ["binary_conv", "binary_conv_dense", "fma", "pack_nchw", "pack_nhwc", "popcount", "popcount_peak",
           "sign_bits64", "small_to_float64", "threads"]


def threads() -> int:
    """The threads the kernels run on (numba's setting for the calling thread)."""
    return get_num_threads()


@intrinsic
def popcount(typingctx, x):
    """LLVM's ctpop on an integer: one POPCNT (VPOPCNTQ, NEON cnt once vectorized)."""
    if not isinstance(x, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        return builder.ctpop(args[0])

    return x(x), codegen


@intrinsic
def fma(typingctx, a, b, c):
    """LLVM's fused multiply-add on float32, a x b + c rounded once: the arithmetic of
    PyTorch's CPU batch norm (its vectorized kernels use fmadd), reproduced bit for bit."""
    if not all(isinstance(t, types.Float) for t in (a, b, c)):
        return None

    def codegen(context, builder, signature, args):
        return builder.fma(*args)

    return a(a, b, c), codegen


@intrinsic
def small_to_float64(typingctx, x):
    """A uint64 below 2^52 as float64, exactly, in two vector instructions: its bits under
    the exponent of 2^52, read as a float64, minus 2^52. (AVX2 has no uint64-to-float
    conversion: LLVM's general one splits the word in halves, three times the work.)"""
    if x != types.uint64:
        return None

    def codegen(context, builder, signature, args):
        magic = ir.Constant(ir.IntType(64), 0x4330000000000000)  # the bits of 2.0 ** 52
        shifted = builder.bitcast(builder.or_(args[0], magic), ir.DoubleType())
        return builder.fsub(shifted, ir.Constant(ir.DoubleType(), 2.0 ** 52))

    return types.float64(x), codegen


def binary_sum(k, count):
    """K - 2 x popcount as float32, exactly: the value of a sum of K +-1 products."""
    return np.float32(k - 2 * int(count))


@overload(binary_sum, inline="always")
def _binary_sum(k, count):
    # Exact either way: k and count are whole numbers far below 2^24. A uint64 goes through
    # float64 (AVX2 converts no uint64 to float32); an int32 converts in one instruction.
    if count == types.uint64:
        return lambda k, count: np.float32(np.float64(k) - 2.0 * small_to_float64(count))
    if count == types.int32:
        return lambda k, count: np.float32(k) - np.float32(2.0) * np.float32(count)
    return None


@njit(cache=True)
def _ceil_div(a, b):
    return -((-a) // b)


@njit(cache=True, parallel=True)
def binary_conv(a, w, scale, bias, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, in_per_group, out):
    """The general binary conv (any groups and dilation):
    out[n, oy, ox, g * Og + o] = scale * (K - 2 * popcount(a xor w) over the valid taps) + bias.

    a: uint64 [N, H, W, G * CWg] (packed activations); w: uint64 [G, KH, KW, CWg, Og];
    scale, bias: float32 [G * Og]; out: float32 [N, OH, OW, G * Og], NHWC.
    Rows of output positions (n, oy) are spread over the threads."""
    n_, h_, w_, _ = a.shape
    groups, kh, kw, cwg, og = w.shape
    oh, ow = out.shape[1], out.shape[2]
    for row in prange(n_ * oh):
        n = row // oh
        oy = row - n * oh
        acc = np.empty(og, np.uint64)
        y0 = oy * stride_h - pad_h
        ky0 = max(0, _ceil_div(-y0, dil_h))
        ky1 = min(kh, _ceil_div(h_ - y0, dil_h))
        for ox in range(ow):
            x0 = ox * stride_w - pad_w
            kx0 = max(0, _ceil_div(-x0, dil_w))
            kx1 = min(kw, _ceil_div(w_ - x0, dil_w))
            k = max(0, ky1 - ky0) * max(0, kx1 - kx0) * in_per_group
            for g in range(groups):
                for o in range(og):
                    acc[o] = 0
                for ky in range(ky0, ky1):
                    iy = y0 + ky * dil_h
                    for kx in range(kx0, kx1):
                        ix = x0 + kx * dil_w
                        for j in range(cwg):
                            word = a[n, iy, ix, g * cwg + j]
                            for o in range(og):
                                acc[o] += popcount(word ^ w[g, ky, kx, j, o])
                base = g * og
                for o in range(og):
                    mac = np.float32(np.float64(k) - 2.0 * np.float64(acc[o]))
                    out[n, oy, ox, base + o] = scale[base + o] * mac + bias[base + o]


@njit(cache=True, inline="always")
def _finish(acc, k, scale, bias, post, residual, mode, out, n, oy, ox, o0):
    # One output position's values, channels o0 (unsigned) to o0 + len(acc), from their
    # popcounts: scale x (k - 2 x popcount) + bias, then what follows the conv in its block,
    # where fused (fused.py): mode 0 nothing; 1 the block's BN and shortcut addition,
    # BN(value) + residual, as PyTorch computes them (BN as fma(value, alpha, beta)); 2 then
    # ReActNet's RPReLU, prelu(y + shift_in) + shift_out. post: float32 [5, O], rows alpha,
    # beta, shift_in, slope, shift_out. acc: uint64 or int32 popcounts (binary_sum). The mode
    # is tested outside the channel loops, so that each loop vectorizes.
    if mode == 0:
        for i in range(np.uintp(acc.shape[0])):
            o = o0 + i
            out[n, oy, ox, o] = scale[o] * binary_sum(k, acc[i]) + bias[o]
    elif mode == 1:
        for i in range(np.uintp(acc.shape[0])):
            o = o0 + i
            value = scale[o] * binary_sum(k, acc[i]) + bias[o]
            out[n, oy, ox, o] = fma(value, post[0, o], post[1, o]) + residual[n, oy, ox, o]
    else:
        for i in range(np.uintp(acc.shape[0])):
            o = o0 + i
            value = scale[o] * binary_sum(k, acc[i]) + bias[o]
            y = fma(value, post[0, o], post[1, o]) + residual[n, oy, ox, o] + post[2, o]
            slope = post[3, o]
            out[n, oy, ox, o] = (y if y > np.float32(0) else slope * y) + post[4, o]


@njit(cache=True, inline="always")
def _pack_position(out, threshold, signs, n, y, x, o0, o1):
    # pack_nhwc for one output position's channels o0 to o1 (one group, o0 a multiple of 64),
    # from the values just written.
    for k in range(o0 // 64, _ceil_div(o1, 64)):
        first = 64 * k
        count = min(64, o1 - first)
        if count == 64:
            signs[n, y, x, k] = sign_bits64(out[n, y, x], threshold[first:], first)
        else:
            word = np.uint64(0)
            for b in range(count):
                word |= np.uint64(out[n, y, x, first + b] + threshold[first + b] >= np.float32(0)) << np.uint64(b)
            signs[n, y, x, k] = word


@njit(cache=True, parallel=True)
def binary_conv_dense(a, w, scale, bias, stride_h, stride_w, pad_h, pad_w, in_channels, out,
                      post, residual, mode, next_threshold, signs, block):
    """binary_conv for the common case, one group and no dilation, faster: a tap row's words
    (kx x CW) are contiguous in `a` and in `w`, so each row of taps is one flat loop, and
    interior output positions go four at a time, each weight word loaded once for the four.
    With `mode` 1 or 2, each output then passes through its block's BN, shortcut addition
    (and RPReLU) in the same pass (`_finish`; residual: float32 NHWC like out); with mode 0
    `post` and `residual` are unused (pass empty arrays). With a non-empty `next_threshold`
    (float32 [O]), the signs of out + next_threshold are packed into `signs` (uint64
    [N, OH, OW, ceil(O / 64)]) as pack_nhwc would pack them for the next binary layer.
    The threads share out rows of output positions and, in `block`s of output channels (a
    multiple of 64, or O), the channels: a 7 x 7 map at batch 1 has too few rows for an even
    share.

    a: uint64 [N, H, W, CW]; w: uint64 [KH, KW * CW, O]; out: float32 [N, OH, OW, O]."""
    n_, h_, w_, cw = a.shape
    kh, run, og = w.shape
    kw = run // cw
    oh, ow = out.shape[1], out.shape[2]
    rows = a.reshape(n_, h_, w_ * cw)
    pack_next = next_threshold.shape[0] > 0
    step = stride_w * cw  # words between the inputs of neighbouring output positions
    blocks = _ceil_div(og, block)
    for unit in prange(n_ * oh * blocks):
        row = unit // blocks
        o0 = (unit - row * blocks) * block
        o1 = min(og, o0 + block)
        # Unsigned, so that w's index needs no negative-index wrap-around (which would keep the
        # inner loop from vectorizing).
        wo = np.uintp(o0)
        width = np.uintp(o1 - o0)
        n = row // oh
        oy = row - n * oh
        acc = np.empty((4, o1 - o0), np.uint64)
        y0 = oy * stride_h - pad_h
        ky0 = max(0, -y0)
        ky1 = min(kh, h_ - y0)
        ox = 0
        while ox < ow:
            x0 = ox * stride_w - pad_w
            kx0 = max(0, -x0)
            kx1 = min(kw, w_ - x0)
            k = max(0, ky1 - ky0) * max(0, kx1 - kx0) * in_channels
            t0 = kx0 * cw
            t1 = kx1 * cw
            first = (x0 + kx0) * cw - t0  # rows[n, iy, first + t] meets w[ky, t]
            if ox + 3 < ow and kx0 == 0 and kx1 == kw and x0 + 3 * stride_w + kw <= w_:
                for i in range(o1 - o0):
                    acc[0, i] = 0
                    acc[1, i] = 0
                    acc[2, i] = 0
                    acc[3, i] = 0
                for ky in range(ky0, ky1):
                    iy = y0 + ky
                    for t in range(t0, t1):
                        a0 = rows[n, iy, first + t]
                        a1 = rows[n, iy, first + step + t]
                        a2 = rows[n, iy, first + 2 * step + t]
                        a3 = rows[n, iy, first + 3 * step + t]
                        for i in range(width):
                            wv = w[ky, t, wo + i]
                            acc[0, i] += popcount(a0 ^ wv)
                            acc[1, i] += popcount(a1 ^ wv)
                            acc[2, i] += popcount(a2 ^ wv)
                            acc[3, i] += popcount(a3 ^ wv)
                for p in range(4):
                    _finish(acc[p], k, scale, bias, post, residual, mode, out, n, oy, ox + p, wo)
                    if pack_next:
                        _pack_position(out, next_threshold, signs, n, oy, ox + p, o0, o1)
                ox += 4
            else:
                for i in range(o1 - o0):
                    acc[0, i] = 0
                for ky in range(ky0, ky1):
                    iy = y0 + ky
                    for t in range(t0, t1):
                        a0 = rows[n, iy, first + t]
                        for i in range(width):
                            acc[0, i] += popcount(a0 ^ w[ky, t, wo + i])
                _finish(acc[0], k, scale, bias, post, residual, mode, out, n, oy, ox, wo)
                if pack_next:
                    _pack_position(out, next_threshold, signs, n, oy, ox, o0, o1)
                ox += 1


@njit(cache=True, parallel=True)
def popcount_peak(words, weights, reps, out):
    """The popcount microbenchmark: binary_conv_dense's inner loop (four words against each
    weight word: acc[p, o] += popcount(words[t, 4 j + p] ^ weights[j, o])) with every operand
    in L1, `reps` times over per thread; `out`, uint64 [threads, 4, O], receives each thread's
    accumulators. 64 binary MACs per word."""
    og = weights.shape[1]
    for t in prange(out.shape[0]):
        acc = np.zeros((4, og), np.uint64)
        for _ in range(reps):
            for j in range(weights.shape[0]):
                a0 = words[t, 4 * j]
                a1 = words[t, 4 * j + 1]
                a2 = words[t, 4 * j + 2]
                a3 = words[t, 4 * j + 3]
                for o in range(og):
                    wv = weights[j, o]
                    acc[0, o] += popcount(a0 ^ wv)
                    acc[1, o] += popcount(a1 ^ wv)
                    acc[2, o] += popcount(a2 ^ wv)
                    acc[3, o] += popcount(a3 ^ wv)
        for p in range(4):
            for o in range(og):
                out[t, p, o] = acc[p, o]
