"""The nibble kernel's input: the signs of the next layer's input as a byte per four channels
(16 x the nibble, the byte offset of its row in `nibbles.POPCOUNTS`), in a buffer padded by
that layer's padding with zero bytes; from packed words (`words_to_nibbles`), or written by a
block's output pass for the next block (`write_nibbles`).
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from .packing import sign_bits64


@njit(cache=True, inline="always")
def _spread(half):
    # The eight nibbles of a 32-bit value, one per byte (nibble k in byte k), times 16.
    t = (half | (half << np.uint64(16))) & np.uint64(0x0000FFFF0000FFFF)
    t = (t | (t << np.uint64(8))) & np.uint64(0x00FF00FF00FF00FF)
    t = (t | (t << np.uint64(4))) & np.uint64(0x0F0F0F0F0F0F0F0F)
    return t << np.uint64(4)


@njit(cache=True, inline="always")
def _nibble_bytes(out, y, x, j0, word):
    # The 16 nibbles of `word` as bytes (16 x nibble) at out[n, y, x, j0:], those that fit.
    cn = out.shape[2]
    for half in range(2):
        first = j0 + 8 * half
        if first >= cn:
            break
        bytes8 = _spread((word >> np.uint64(32 * half)) & np.uint64(0xFFFFFFFF))
        for b in range(min(8, cn - first)):
            out[y, x, first + b] = np.uint8((bytes8 >> np.uint64(8 * b)) & np.uint64(0xFF))


@njit(cache=True, inline="always")
def write_nibbles(out, threshold, nib, wide, n, y, x, o0, o1, pad_h, pad_w):
    """The signs of out[n, y, x, o0:o1] + threshold (o0 a multiple of 64, o1 - o0 <= 64) as
    the nibble bytes of the next layer's padded input `nib`; `wide`: nib's bytes as uint64
    (empty where its positions are no whole number of them), for a whole block 2 stores."""
    count = o1 - o0
    if count == 64:
        word = sign_bits64(out[n, y, x], threshold[o0:], o0)
        if wide.shape[0] > 0:
            _, hp, wp, cn = nib.shape
            at = (((n * hp + y + pad_h) * wp + x + pad_w) * cn + o0 // 4) // 8
            wide[at] = _spread(word & np.uint64(0xFFFFFFFF))
            wide[at + 1] = _spread(word >> np.uint64(32))
            return
    else:
        word = np.uint64(0)
        for b in range(count):
            word |= np.uint64(out[n, y, x, o0 + b] + threshold[o0 + b] >= np.float32(0)) << np.uint64(b)
    _nibble_bytes(nib[n], y + pad_h, x + pad_w, o0 // 4, word)


@njit(cache=True)
def zero_border(nib, pad_h, pad_w):
    """Zero the border (pad_h rows, pad_w columns) of padded nibble bytes [N, H', W', nibbles]."""
    n_, hp, wp, cn = nib.shape
    for n in range(n_):
        for y in range(hp):
            edge_row = y < pad_h or y >= hp - pad_h
            for x in range(wp):
                if edge_row or x < pad_w or x >= wp - pad_w:
                    for j in range(cn):
                        nib[n, y, x, j] = 0


@njit(cache=True, parallel=True)
def words_to_nibbles(words, pad_h, pad_w, out):
    """Packed words [N, H, W, CW] -> nibble bytes [N, H + 2 pad_h, W + 2 pad_w, nibbles] (16 x
    each of the first `nibbles` nibbles), the border zero."""
    n_, h_, w_, cw = words.shape
    zero_border(out, pad_h, pad_w)
    for row in prange(n_ * h_):
        n = row // h_
        y = row - n * h_
        for x in range(w_):
            for k in range(cw):
                _nibble_bytes(out[n], y + pad_h, x + pad_w, 16 * k, words[n, y, x, k])
