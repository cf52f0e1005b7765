"""bnntrain.infer's output buffers (bnntrain/infer/buffers.py): reused from one call to the next
once nothing refers to them, never while a caller still holds an output, a view of it or the
packed signs travelling with it."""
import numpy as np
import pytest
import torch

from bnntrain.tools import export
from conftest import need
from test_infer import CONVS, binary_layer, inputs
from test_infer_fused import exported

numba = need("numba", extra="infer")
from bnntrain import infer  # noqa: E402  (needs numba)
from bnntrain.infer.buffers import MAX_PER_SHAPE, BufferPool  # noqa: E402
from bnntrain.infer.fused import FusedBinaryBlock  # noqa: E402

numba.set_num_threads(1)


def packed_layer():
    layer = binary_layer(*CONVS["3x3, 64 channels, padding 1"][:7])
    # Channels-last in and out: the output tensor is a view of the kernel's buffer (an NCHW
    # output is a copy).
    return infer.PackedBinaryConv2d(layer), layer, inputs(64, 9, 7).contiguous(memory_format=torch.channels_last)


def test_a_held_output_is_never_overwritten_and_a_dropped_one_is_reused():
    packed, layer, x = packed_layer()
    with torch.no_grad():
        first = packed(x)
        a1, kept = first.data_ptr(), first.clone()
        second = packed(-x)  # `first` is still held: a buffer of its own
        a2 = second.data_ptr()
        assert a1 != a2 and torch.equal(first, kept) and torch.equal(second, layer(-x))
        view = second[1:]  # a view holds the buffer too
        del second
        third = packed(x)
        assert third.data_ptr() not in (a1, a2) and torch.equal(view, layer(-x)[1:])
        del view, first
        fourth = packed(-x)  # the buffers of `first` and `second` are free again: the first is taken
        assert fourth.data_ptr() == a1 and torch.equal(fourth, layer(-x))
        del fourth
        assert packed(x).data_ptr() == a1  # dropped, then handed out again
        assert torch.equal(third, layer(x))


def test_features_kept_from_an_earlier_call_stay_as_they_were(tmp_path):
    """A forward hook keeps every fused block's output of the first batch; the second batch
    (other images, same shapes) must not write over them."""
    path = exported(tmp_path, "reactnet18")
    model = infer.load(path)
    kept = []
    blocks = [m for m in model.modules() if isinstance(m, FusedBinaryBlock)]
    assert blocks
    hooks = [b.register_forward_hook(lambda m, a, out: kept.append(out)) for b in blocks]
    x1, x2 = torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        model(x1)
        first = [t.clone() for t in kept]
        model(x2)
        for hook in hooks:
            hook.remove()
        assert len({t.data_ptr() for t in kept}) == len(kept) == 2 * len(blocks)  # each its own memory
        assert all(torch.equal(a, b) for a, b in zip(kept[:len(first)], first))
        assert not all(torch.equal(a, b) for a, b in zip(kept[:len(first)], kept[len(first):]))
        reference = export.load(path).to(memory_format=torch.channels_last)
        for x in (x1, x2, x1):  # and the outputs stay the export's, call after call
            assert torch.equal(model(x), reference(x.contiguous(memory_format=torch.channels_last)))


def test_the_pool_keeps_a_few_arrays_of_a_shape():
    pool = BufferPool()
    held = [pool.empty((2, 3), np.float32) for _ in range(MAX_PER_SHAPE + 2)]
    assert len({a.ctypes.data for a in held}) == MAX_PER_SHAPE + 2  # all distinct while held
    assert pool.nbytes() == MAX_PER_SHAPE * 24
    pooled = {a.ctypes.data for a in held[:MAX_PER_SHAPE]}
    del held
    again = [pool.empty((2, 3), np.float32) for _ in range(MAX_PER_SHAPE)]
    assert {a.ctypes.data for a in again} == pooled
    assert pool.empty((2, 3), np.float64).dtype == np.float64 and pool.empty((3, 2), np.float32).shape == (3, 2)


@pytest.mark.parametrize("shape", [(1, 8), (5, 7, 3)])
def test_a_pooled_array_handed_out_is_held_by_whoever_got_it(shape):
    pool = BufferPool()
    a = pool.empty(shape, np.uint64)
    b = pool.empty(shape, np.uint64)
    assert a.ctypes.data != b.ctypes.data
