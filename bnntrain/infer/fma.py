"""Float32 sums of products in vector registers, in a given order, for the real-valued convs
run in numba (`shortcut.py`'s 1x1 conv, `stem_conv.py`'s stem): six output positions by 16
output channels, each output one chain of fused multiply-adds (`llvm.fma`) per block of terms.
A float32 sum depends on its order, so these give PyTorch's results bit for bit only where
they sum in its order; their callers check that on real inputs.

Operands: x, w: float32, 1-D, contiguous; offsets: int64 [POSITIONS], the positions' first
terms in x; term t of a position is x[offsets[p] + t], its weights for the 16 channels
w[first + t x stride : + 16].
"""
from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from .ir_loops import in_chunks

POSITIONS = 6   # output positions per tile
CHANNELS = 16   # output channels per tile: two vectors of 8

_F = ir.FloatType()
_V8 = ir.VectorType(_F, 8)
_I64 = ir.IntType(64)


def _float_arrays(*arrays: types.Type) -> bool:
    return all(isinstance(a, types.Array) and a.dtype == types.float32 and a.layout == "C" for a in arrays)


def _vector_at(builder: ir.IRBuilder, pointer: ir.Value, index: ir.Value) -> ir.Value:
    return builder.bitcast(builder.gep(pointer, [index]), _V8.as_pointer())


def _tile_start(context, builder, sig, args):
    # The arrays' data pointers, the positions' first terms, and zeroed accumulators.
    x_arr, o_arr, w_arr = (context.make_array(sig.args[i])(context, builder, args[i]) for i in range(3))
    starts = [builder.gep(x_arr.data, [builder.load(builder.gep(o_arr.data, [ir.Constant(_I64, p)]))])
              for p in range(POSITIONS)]
    accs = [[cgutils.alloca_once_value(builder, ir.Constant(_V8, None)) for _ in range(CHANNELS // 8)]
            for _ in range(POSITIONS)]
    fma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_V8, [_V8] * 3), "llvm.fma.v8f32")
    return w_arr.data, starts, accs, fma


def _fma_step(builder: ir.IRBuilder, fma, starts: list, t: ir.Value, w: ir.Value, at: ir.Value, accs: list) -> None:
    # One term for every tile output: acc = fma(x[start_p + t], w[at : at + 16], acc).
    weights = [builder.load(_vector_at(builder, w, builder.add(at, ir.Constant(_I64, 8 * v))), align=4)
               for v in range(CHANNELS // 8)]
    splat = ir.Constant(ir.VectorType(ir.IntType(32), 8), [0] * 8)
    for p in range(POSITIONS):
        value = builder.insert_element(ir.Constant(_V8, None), builder.load(builder.gep(starts[p], [t])),
                                       ir.Constant(ir.IntType(32), 0))
        value = builder.shuffle_vector(value, value, splat)
        for v in range(CHANNELS // 8):
            builder.store(builder.call(fma, [value, weights[v], builder.load(accs[p][v])]), accs[p][v])


def _store_tile(context, builder, array_type, array, vectors: list) -> None:
    # vectors[p][v] (pointers to <8 x float>) to out[p, 8v : 8v + 8] (float32 [POSITIONS, CHANNELS]).
    out = context.make_array(array_type)(context, builder, array)
    for p in range(POSITIONS):
        for v in range(CHANNELS // 8):
            at = _vector_at(builder, out.data, ir.Constant(_I64, p * CHANNELS + 8 * v))
            builder.store(builder.load(vectors[p][v]), at, align=4)


@intrinsic
def fma_tile(typingctx, x, offsets, w, first, stride, steps, block, bias, out):
    """Starting from bias[first mod stride + o], for each block of `block` terms of `steps`,
    out += the fused multiply-add chain from zero over the block (PyTorch's blocks of sums);
    out: float32 [POSITIONS, CHANNELS]."""
    if not (_float_arrays(x, w, bias, out) and isinstance(offsets, types.Array) and offsets.dtype == types.int64):
        return None
    signature = types.void(x, offsets, w, types.intp, types.intp, types.intp, types.intp, bias, out)

    def codegen(context, builder, sig, args):
        w_data, starts, accs, fma = _tile_start(context, builder, sig, args)
        first, stride, steps, block = args[3:7]
        b_arr = context.make_array(sig.args[7])(context, builder, args[7])
        bias_at = builder.srem(first, stride)
        results = [[cgutils.alloca_once_value(builder, builder.load(_vector_at(
            builder, b_arr.data, builder.add(bias_at, ir.Constant(_I64, 8 * v))), align=4))
            for v in range(CHANNELS // 8)] for _ in range(POSITIONS)]
        with in_chunks(builder, steps, block) as (t0, count):
            for acc in (a for row in accs for a in row):
                builder.store(ir.Constant(_V8, None), acc)
            with cgutils.for_range(builder, count) as loop:
                t = builder.add(t0, loop.index)
                _fma_step(builder, fma, starts, t, w_data, builder.add(first, builder.mul(t, stride)), accs)
            for p in range(POSITIONS):
                for v in range(CHANNELS // 8):
                    total = builder.fadd(builder.load(accs[p][v]), builder.load(results[p][v]))
                    builder.store(total, results[p][v])
        _store_tile(context, builder, sig.args[8], args[8], results)
        return context.get_dummy_value()

    return signature, codegen


@intrinsic
def fma_rows(typingctx, x, offsets, w, first, stride, rows, run, row_step, out):
    """One fused multiply-add chain from zero over `rows` rows of `run` terms: term t of row r
    of position p is x[offsets[p] + r x row_step + t], its weights w[first + (r x run + t) x
    stride : + 16] (a conv's taps row by row); out: float32 [POSITIONS, CHANNELS], the sums."""
    if not (_float_arrays(x, w, out) and isinstance(offsets, types.Array) and offsets.dtype == types.int64):
        return None
    signature = types.void(x, offsets, w, types.intp, types.intp, types.intp, types.intp, types.intp, out)

    def codegen(context, builder, sig, args):
        w_data, starts, accs, fma = _tile_start(context, builder, sig, args)
        first, stride, rows, run, row_step = args[3:8]
        with cgutils.for_range(builder, rows) as row_loop:
            row = row_loop.index
            row_starts = [builder.gep(s, [builder.mul(row, row_step)]) for s in starts]
            row_first = builder.add(first, builder.mul(builder.mul(row, run), stride))
            with cgutils.for_range(builder, run) as loop:
                t = loop.index
                _fma_step(builder, fma, row_starts, t, w_data, builder.add(row_first, builder.mul(t, stride)), accs)
        _store_tile(context, builder, sig.args[8], args[8], accs)
        return context.get_dummy_value()

    return signature, codegen
