"""A loop shape the kernels' LLVM IR (`nibbles.tile_popcounts`, `fma.fma_tile`) shares:
a count of steps taken in chunks of at most a given length, each chunk with accumulators of its
own (bytes that must not overflow; PyTorch's blocks of sums)."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

from llvmlite import ir
from numba.core import cgutils


@contextmanager
def in_chunks(builder: ir.IRBuilder, steps: ir.Value, chunk: ir.Value) -> Iterator[tuple[ir.Value, ir.Value]]:
    """Emit a loop over `steps` (i64) in chunks of at most `chunk` (i64): the body, emitted
    inside the `with`, runs once per chunk with (its first step, its number of steps).

    Args:
        builder: the IR builder, positioned where the loop goes.
        steps: how many steps in all.
        chunk: the most steps a chunk takes.

    Yields:
        (first step, steps in this chunk), both i64.
    """
    one = ir.Constant(steps.type, 1)
    chunks = builder.sdiv(builder.add(steps, builder.sub(chunk, one)), chunk)
    with cgutils.for_range(builder, chunks) as loop:
        first = builder.mul(loop.index, chunk)
        count = builder.sub(steps, first)
        yield first, builder.select(builder.icmp_signed("<", count, chunk), count, chunk)
