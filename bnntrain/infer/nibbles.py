"""The dense binary conv on x86 with AVX2: popcounts read from a 16-entry table, four bits at a
time (VPSHUFB), twice the throughput of the word-at-a-time kernel of `kernels.py`.

Why. AVX2 has no vector popcount: a vectorized popcount of 64-bit words costs about nine
instructions per four words (xor, split into nibbles, two table look-ups, add, sum the bytes
into words). Here the xor is folded into the look-up: for an activation nibble x, the row
`POPCOUNTS[x]` holds popcount(x ^ m) for the 16 weight nibbles m, so one VPSHUFB with that row
as its table and 32 output channels' weight nibbles as its indices gives 32 popcounts of 4
bits, and one byte add accumulates them: two instructions per 128 binary MACs.

Layout. Activations are bytes, one per nibble, holding 16 x nibble (the byte offset of its
row in `POPCOUNTS`): `nib[n, y, x, 16 * word + m]` = 16 x (bits 4m to 4m + 3 of the packed
word), in a buffer padded by the conv's padding with zero bytes (`words_to_nibbles`). Weights
are nibbles `wn[ky, kx * nibbles + t, o]`, the output channels innermost and padded to a
multiple of 64 with zeros. A padded tap reads activation bits 0 and so counts popcount(w)
where it should count nothing: the kernel subtracts each padded tap's popcount of the weights
(`wpop`) at the positions that have one. The sums are the same integers as the word kernel's,
and the same epilogue (`kernels._finish`) makes the outputs, so they are equal bit for bit.

The work unit is six output positions (anywhere in the batch: each has its own offset) by 64
output channels: 12 byte accumulators in registers, emptied into 16-bit ones every 63 steps
(63 x 4 fits a byte). A layer whose sums could pass 2^16 (K over 65535) takes the word kernel.
"""
from __future__ import annotations

import platform

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils, config
from numba.extending import intrinsic

from .ir_loops import in_chunks
from .kernels import _ceil_div, _finish, _pack_position
from .layout import NIBBLE_BLOCK
from .nibble_packing import words_to_nibbles, write_nibbles, zero_border
from .tiles import _next_position, _position, _tile_offsets, _unit

# words_to_nibbles, packed_conv.py's way to this kernel's input, is part of this module's API.
__all__ = ["POPCOUNTS", "available", "binary_conv_nibbles", "nibble_peak", "tile_popcounts", "words_to_nibbles"]

POSITIONS = 6        # output positions per work unit
CHANNELS = NIBBLE_BLOCK  # output channels per work unit: two 32-byte look-ups
GROUP = 4           # tiles of positions a thread takes block by block (weights reused, outputs near)
CHUNK = 63           # steps a byte accumulator takes without overflow (4 per step)
POPCOUNTS = np.array([[bin(x ^ m).count("1") for m in range(16)] for x in range(16)], np.uint8).reshape(-1)


def available() -> bool:
    """Whether this CPU runs the nibble kernel.

    Returns:
        True on x86-64 with AVX2 (what LLVM reports for the host).
    """
    return _AVX2


def _host_has_avx2() -> bool:
    # What numba compiles for: the host's features, unless NUMBA_CPU_NAME / NUMBA_CPU_FEATURES
    # name others (a generic target has none), where VPSHUFB's intrinsic would not compile.
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    if config.CPU_FEATURES is not None:
        return "+avx2" in config.CPU_FEATURES.split(",")
    if config.CPU_NAME not in (None, "host"):
        return False
    from llvmlite import binding
    return bool(binding.get_host_cpu_features().get("avx2", False))


_AVX2 = _host_has_avx2()


_I8, _I16, _I32, _I64 = ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.IntType(64)
_V16, _V32, _W32 = ir.VectorType(_I8, 16), ir.VectorType(_I8, 32), ir.VectorType(_I16, 32)


def _mask(values: list[int]) -> ir.Constant:
    return ir.Constant(ir.VectorType(_I32, len(values)), values)


def _byte_array(t: types.Type, ndim: int) -> bool:
    return isinstance(t, types.Array) and t.dtype == types.uint8 and t.ndim == ndim and t.layout == "C"


@intrinsic
def tile_popcounts(typingctx, act, offsets, table, weights, first, stride, rows, run, row_step, out):
    """For six output positions and 64 output channels, the sum over `rows` rows of `run`
    steps of popcount(activation nibble ^ weight nibble), into out (uint16 [6, 64]).

    Position p's nibble at step t of row r is act[offsets[p] + r x row_step + t]; channel o's
    is weights[first + (r x run + t) x stride + o]. act, table (POPCOUNTS), weights: uint8,
    1-D, contiguous; offsets: int64 [6]."""
    if not (_byte_array(act, 1) and _byte_array(table, 1) and _byte_array(weights, 1)
            and isinstance(offsets, types.Array) and offsets.dtype == types.int64
            and isinstance(out, types.Array) and out.dtype == types.uint16 and out.ndim == 2 and out.layout == "C"):
        return None
    signature = types.void(act, offsets, table, weights, types.intp, types.intp, types.intp, types.intp,
                           types.intp, out)

    def codegen(context, builder, sig, args):
        a_arr, o_arr, t_arr, w_arr = (context.make_array(sig.args[i])(context, builder, args[i]) for i in range(4))
        out_arr = context.make_array(sig.args[9])(context, builder, args[9])
        first, stride, rows, run, row_step = args[4:9]
        pshufb = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_V32, [_V32, _V32]),
                                                "llvm.x86.avx2.pshuf.b")
        starts = [builder.gep(a_arr.data, [builder.load(builder.gep(o_arr.data, [ir.Constant(_I64, p)]))])
                  for p in range(POSITIONS)]
        groups = CHANNELS // 32
        wide = [[cgutils.alloca_once_value(builder, ir.Constant(_W32, None)) for _ in range(groups)]
                for _ in range(POSITIONS)]
        narrow = [[cgutils.alloca_once(builder, _V32) for _ in range(groups)] for _ in range(POSITIONS)]
        with cgutils.for_range(builder, rows) as row_loop:
            row = row_loop.index
            row_acts = [builder.gep(s, [builder.mul(row, row_step)]) for s in starts]
            row_weights = builder.gep(w_arr.data, [builder.add(first, builder.mul(builder.mul(row, run), stride))])
            with in_chunks(builder, run, ir.Constant(_I64, CHUNK)) as (t0, steps):
                for acc in (a for accs in narrow for a in accs):
                    builder.store(ir.Constant(_V32, None), acc)
                with cgutils.for_range(builder, steps) as step_loop:
                    t = builder.add(t0, step_loop.index)
                    w_at = builder.gep(row_weights, [builder.mul(t, stride)])
                    index = [builder.load(builder.bitcast(builder.gep(w_at, [ir.Constant(_I64, 32 * g)]),
                                                          _V32.as_pointer()), align=1) for g in range(groups)]
                    for p in range(POSITIONS):
                        x = builder.zext(builder.load(builder.gep(row_acts[p], [t])), _I64)
                        half = builder.load(builder.bitcast(builder.gep(t_arr.data, [x]), _V16.as_pointer()), align=1)
                        look_up = builder.shuffle_vector(half, half, _mask(list(range(16)) * 2))
                        for g in range(groups):
                            counts = builder.call(pshufb, [look_up, index[g]])
                            builder.store(builder.add(builder.load(narrow[p][g]), counts), narrow[p][g])
                for p in range(POSITIONS):
                    for g in range(groups):
                        widened = builder.zext(builder.load(narrow[p][g]), _W32)
                        builder.store(builder.add(builder.load(wide[p][g]), widened), wide[p][g])
        for p in range(POSITIONS):
            for g in range(groups):
                at = builder.gep(out_arr.data, [ir.Constant(_I64, p * CHANNELS + 32 * g)])
                builder.store(builder.load(wide[p][g]), builder.bitcast(at, _W32.as_pointer()), align=2)
        return context.get_dummy_value()

    return signature, codegen


@njit(cache=True, parallel=True)
def binary_conv_nibbles(nib, wn, wpop, table, kw, scale, bias, stride_h, stride_w, pad_h, pad_w, in_channels, out,
                        post, residual, mode, next_threshold, signs, next_nib, parts, group):
    """binary_conv_dense's result (the same arguments but `block`, and the same outputs bit for
    bit) from nibble activations `nib` (words_to_nibbles, padded by pad_h, pad_w) and nibble
    weights `wn`, `wpop` (nibble_weights); table: POPCOUNTS. With a non-empty `next_nib`
    (uint8 [N, OH + 2 ph, OW + 2 pw, nibbles], the next layer's padded input), the next
    layer's signs go there as nibble bytes (`write_nibbles`) instead of `signs`. The work is cut in `parts` (the
    threads), each a contiguous share of the units, ordered channel block first, so that it reads one block's weights
    (a few tens of kilobytes) for many positions in a row."""
    n_, hp, wp, cn = nib.shape
    blocks, kh, run, _ = wn.shape
    h_, w_ = hp - 2 * pad_h, wp - 2 * pad_w
    oh, ow, og = out.shape[1], out.shape[2], out.shape[3]
    plane = oh * ow
    positions = n_ * plane
    tiles = _ceil_div(positions, 6)
    units = tiles * blocks
    act = nib.reshape(-1)
    weights = wn.reshape(-1)
    pack_next = next_threshold.shape[0] > 0
    next_pad_h = (next_nib.shape[1] - oh) // 2
    next_pad_w = (next_nib.shape[2] - ow) // 2
    as_nibbles = pack_next and next_nib.shape[0] > 0
    wide = np.empty(0, np.uint64)
    if as_nibbles:
        zero_border(next_nib, next_pad_h, next_pad_w)
        if next_nib.shape[3] % 8 == 0:
            wide = next_nib.reshape(-1).view(np.uint64)
    parts = max(1, min(units, parts))
    for part in prange(parts):
        offsets = np.empty(6, np.int64)
        sums = np.empty((6, 64), np.uint16)
        acc = np.empty(64, np.int32)
        for unit in range(part * units // parts, (part + 1) * units // parts):
            block, first = _unit(unit, group, blocks, tiles, 6)
            o0 = block * 64
            width = min(64, og - o0)
            count = min(6, positions - first)
            _tile_offsets(offsets, first, count, oh, ow, hp, wp, stride_h, stride_w, cn)
            tile_popcounts(act, offsets, table, weights, block * kh * run * 64, 64, kh, run, wp * cn, sums)
            n, oy, ox = _position(first, plane, ow)
            for j in range(count):
                for i in range(width):
                    acc[i] = np.int32(sums[j, i])
                y0 = oy * stride_h - pad_h
                x0 = ox * stride_w - pad_w
                ky0, ky1 = max(0, -y0), min(kh, h_ - y0)
                kx0, kx1 = max(0, -x0), min(kw, w_ - x0)
                if ky0 > 0 or ky1 < kh or kx0 > 0 or kx1 < kw:  # padded taps counted popcount(w): take it back
                    for ky in range(kh):
                        for kx in range(kw):
                            if ky < ky0 or ky >= ky1 or kx < kx0 or kx >= kx1:
                                for i in range(width):
                                    acc[i] -= wpop[ky, kx, o0 + i]
                k = max(0, ky1 - ky0) * max(0, kx1 - kx0) * in_channels
                _finish(acc[:width], k, scale, bias, post, residual, mode, out, n, oy, ox, np.uintp(o0))
                if as_nibbles:
                    write_nibbles(out, next_threshold, next_nib, wide, n, oy, ox, o0, o0 + width, next_pad_h,
                                  next_pad_w)
                elif pack_next:
                    _pack_position(out, next_threshold, signs, n, oy, ox, o0, o0 + width)
                n, oy, ox = _next_position(n, oy, ox, oh, ow)


@njit(cache=True, parallel=True)
def nibble_peak(act, weights, table, reps, out):
    """The nibble kernel's microbenchmark: its inner loop (`tile_popcounts`, 4 rows of 48
    steps, six positions by 64 channels) `reps` times over per thread, every operand in L1;
    out, uint16 [threads, 6, 64], receives each thread's last sums. 4 x 6 x 64 x 192 binary
    MACs a repetition."""
    for t in prange(out.shape[0]):
        offsets = np.arange(6).astype(np.int64) * 48
        for _ in range(reps):
            tile_popcounts(act, offsets, table, weights, 0, 64, 4, 48, 0, out[t])
