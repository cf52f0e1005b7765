"""The numba kernels that pack signs: x + threshold >= 0 as bits, 64 channels to a uint64
word, NHWC (see kernels.py for the layout), from NCHW or channels-last float32 input, and the
vector compare that packs a whole word.
"""
from __future__ import annotations

import sys

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic


@intrinsic
def sign_bits64(typingctx, values, thresholds, first):
    """The 64 sign bits of values[first:first + 64] + thresholds[:64] (bit b set where
    value + threshold >= 0), as one uint64: a vector compare whose 64 results are the word's
    bits (LLVM: vcmpps and vmovmskps on AVX2, NEON compares and narrowing on ARM64). Both
    arrays float32 and contiguous; values[first:first + 64] and thresholds[:64] must exist."""
    if not all(isinstance(a, types.Array) and a.dtype == types.float32 and a.ndim == 1 and a.layout == "C"
               for a in (values, thresholds)):
        return None  # a strided or other array would be read wrongly: not typed, so not compiled
    if sys.byteorder != "little":  # bit b of the bitcast is element b on little-endian targets only
        return None

    def codegen(context, builder, signature, args):
        vec = ir.VectorType(ir.FloatType(), 64)
        vals = context.make_array(signature.args[0])(context, builder, args[0])
        thrs = context.make_array(signature.args[1])(context, builder, args[1])
        start = builder.gep(vals.data, [args[2]])
        v = builder.load(builder.bitcast(start, vec.as_pointer()), align=4)
        t = builder.load(builder.bitcast(thrs.data, vec.as_pointer()), align=4)
        bits = builder.fcmp_ordered(">=", builder.fadd(v, t), ir.Constant(vec, None))
        return builder.bitcast(bits, ir.IntType(64))

    return types.uint64(values, thresholds, types.intp), codegen


@njit(cache=True, parallel=True)
def pack_nchw(x, threshold, groups, words_per_group, out):
    """x: float32 [N, C, H, W] (C-contiguous); threshold: float32 [C], added before the sign;
    out: uint64 [N, H, W, groups * words_per_group], overwritten."""
    n_, c_, h_, w_ = x.shape
    per_group = c_ // groups
    for row in prange(n_ * h_):
        n = row // h_
        y = row - n * h_
        for i in range(w_):
            for j in range(out.shape[3]):
                out[n, y, i, j] = 0
        for c in range(c_):
            g = c // per_group
            cc = c - g * per_group
            word = g * words_per_group + cc // 64
            shift = np.uint64(cc % 64)
            t = threshold[c]
            for i in range(w_):
                bit = np.uint64(1) if x[n, c, y, i] + t >= np.float32(0) else np.uint64(0)
                out[n, y, i, word] |= bit << shift


@njit(cache=True, parallel=True)
def pack_nhwc(x, threshold, groups, words_per_group, out):
    """x: float32 [N, H, W, C] (C-contiguous: a channels-last tensor); otherwise as pack_nchw.
    A full word is one vector compare (`sign_bits64`); a part word bit by bit."""
    n_, h_, w_, c_ = x.shape
    per_group = c_ // groups
    for row in prange(n_ * h_):
        n = row // h_
        y = row - n * h_
        for i in range(w_):
            pixel = x[n, y, i]
            for g in range(groups):
                for k in range(words_per_group):
                    first = g * per_group + 64 * k
                    count = min(64, (g + 1) * per_group - first)
                    if count == 64:
                        word = sign_bits64(pixel, threshold[first:], first)
                    else:
                        xs = pixel[first:first + count]
                        ts = threshold[first:first + count]
                        word = np.uint64(0)
                        for b in range(count):
                            word |= np.uint64(xs[b] + ts[b] >= np.float32(0)) << np.uint64(b)
                    out[n, y, i, g * words_per_group + k] = word
