"""bnntrain.infer's max-pool (infer/pooling.py): PyTorch's outputs bit for bit, NaNs, infinities
and signed zeros included, for the ResNet stem's pool and other windows."""
import pytest
import torch
from torch import nn

from conftest import need

numba = need("numba", extra="infer")
from bnntrain.infer import pooling  # noqa: E402  (needs numba)

numba.set_num_threads(1)  # the suite's two workers share two cores


def awkward(batch, channels, size):
    """Random values with NaNs, infinities and signed zeros where windows meet them."""
    x = torch.randn(batch, channels, size, size, generator=torch.Generator().manual_seed(size))
    x[:, 0, 1, 1] = float("nan")
    payloads = torch.tensor([0x7FC00001, 0x7FC00002, 0xFFC00003, 0x7FA00004], dtype=torch.int64).to(torch.int32)
    x[:, 1, 2:4, 2:4] = payloads.view(torch.float32).view(2, 2)  # several NaNs in a window: the last wins (its bits)
    x[:, 2] = -0.0
    x[:, 2, ::2, ::3] = 0.0  # ties of -0.0 and +0.0: the first seen stays
    x[:, 3] = float("-inf")
    x[:, 4, 0, :] = float("inf")
    return x.contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("kernel,stride,padding,size", [(3, 2, 1, 16), (3, 2, 1, 15), (2, 2, 0, 10), (3, 1, 1, 7),
                                                        (5, 2, 2, 9)])
def test_equals_pytorch_bit_for_bit(kernel, stride, padding, size):
    pool = nn.MaxPool2d(kernel, stride, padding)
    fast = pooling.FastMaxPool2d(pool)
    x = awkward(2, 70, size)  # 70 channels: no whole number of vectors
    with torch.inference_mode():
        expected = pool(x)
        first, second = fast(x), fast(x)
    assert list(fast.checked.values()) == [True]
    for got in (first, second):
        assert torch.equal(got.view(torch.int32), expected.view(torch.int32))
        assert got.is_contiguous(memory_format=torch.channels_last)


def test_pytorch_runs_what_the_kernel_does_not():
    pool = nn.MaxPool2d(3, 2, 1)
    fast = pooling.FastMaxPool2d(pool)
    x = torch.randn(1, 8, 9, 9)  # NCHW
    assert torch.equal(fast(x), pool(x)) and not fast.checked
    assert not pooling.fits(nn.MaxPool2d(3, 2, 1, ceil_mode=True))
    assert not pooling.fits(nn.MaxPool2d(3, 2, 1, dilation=2))
    assert not pooling.fits(nn.MaxPool2d((3, 2), 2))
    assert pooling.fits(nn.MaxPool2d((3, 3), (2, 2), (1, 1)))
