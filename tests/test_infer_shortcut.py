"""bnntrain.infer's downsampling shortcut (infer/shortcut.py): average pool and 1x1 conv in one
numba call give PyTorch's outputs bit for bit, on the shapes of ResNet-18's shortcuts and on
awkward ones, and a shape where no block length matches stays PyTorch's."""
import pytest
import torch
from torch import nn

from conftest import need
from test_infer_fused import exported

numba = need("numba", extra="infer")
from bnntrain import infer  # noqa: E402  (needs numba)
from bnntrain.infer import shortcut  # noqa: E402

numba.set_num_threads(1)  # the suite's two workers share two cores


def downsample(cin, cout, ceil_mode=False):
    torch.manual_seed(cin + cout)
    layers = nn.Sequential(nn.AvgPool2d(2, 2, ceil_mode=ceil_mode), nn.Conv2d(cin, cout, 1), nn.Identity()).eval()
    with torch.no_grad():
        layers[1].bias.normal_()
    return layers.to(memory_format=torch.channels_last)


def images(batch, channels, size):
    x = torch.randn(batch, channels, size, size, generator=torch.Generator().manual_seed(size))
    return x.contiguous(memory_format=torch.channels_last)


# (batch, in, out, size): ResNet-18's three shortcuts at 224 px (PyTorch runs the last at batch 1
# as MKL's sgemm, the others as oneDNN's 1x1 conv), and channels that fill no vector (the last
# shape: PyTorch sums it in an order of its own).
SHAPES = [(1, 64, 128, 56), (1, 128, 256, 28), (1, 256, 512, 14), (2, 256, 512, 14), (3, 96, 200, 9), (1, 20, 7, 6)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_equals_pytorch_bit_for_bit(shape):
    batch, cin, cout, size = shape
    layers = downsample(cin, cout)
    fast = shortcut.PooledPointwise(layers)
    x = images(batch, cin, size)
    with torch.inference_mode():
        expected = layers(x)
        first, second = fast(x), fast(x)  # the first batch of a shape chooses, the second runs the choice
    assert torch.equal(first, expected) and torch.equal(second, expected)
    assert second.is_contiguous(memory_format=torch.channels_last)
    # The numba path ran wherever PyTorch sums in one of the orders it knows (all but the last
    # shape here, whose backend sums otherwise: that one stays PyTorch's).
    assert (list(fast.block.values()) == [None]) == (shape == SHAPES[-1])
    if (batch, cin, size) == (1, 64, 56):  # oneDNN's 1x1 kernel: one block
        assert list(fast.block.values()) == [cin]


def test_the_order_of_the_sums_is_checked():
    """Blocks of 16 channels are not PyTorch's order: their outputs differ, which is why each
    shape is checked before its numba path runs."""
    layers = downsample(64, 128)
    fast = shortcut.PooledPointwise(layers)
    x = images(1, 64, 56)
    with torch.inference_mode():
        assert torch.equal(fast._run(x, 64), layers(x))
        assert not torch.equal(fast._run(x, 16), layers(x))


def test_pytorch_runs_what_the_kernel_does_not():
    layers = downsample(16, 32, ceil_mode=True)
    fast = shortcut.PooledPointwise(layers)
    with torch.inference_mode():
        training = downsample(16, 32).train()
        assert shortcut.PooledPointwise(training).training  # a training shortcut: PyTorch's, whatever the input
        odd = images(1, 16, 9)  # ceil_mode's last window has a divisor of its own
        assert torch.equal(fast(odd), layers(odd)) and list(fast.block.values()) == [None]
        even = images(1, 16, 8)
        assert torch.equal(fast(even), layers(even)) and list(fast.block.values())[-1] == 16
        nchw = torch.randn(1, 16, 8, 8)
        assert torch.equal(fast(nchw), layers(nchw))
    assert not shortcut.fits(nn.Sequential(nn.AvgPool2d(3, 2), nn.Conv2d(16, 32, 1)))
    assert not shortcut.fits(nn.Sequential(nn.AvgPool2d(2, 2), nn.Conv2d(16, 32, 1, bias=False)))
    assert not shortcut.fits(nn.Sequential(nn.AvgPool2d(2, 2), nn.Conv2d(16, 32, 3)))


def test_fused_blocks_take_the_array_unless_a_hook_watches(tmp_path):
    """`nhwc` hands a fused block the output as an array, once the first batch of a shape has
    chosen the numba path; a hook on the shortcut makes the block call the module instead."""
    layers = downsample(64, 128)
    fast = shortcut.PooledPointwise(layers)
    x = images(1, 64, 12)
    with torch.inference_mode():
        assert fast.nhwc(x) is None  # not chosen yet
        expected = fast(x)
        assert torch.equal(torch.from_numpy(fast.nhwc(x)).permute(0, 3, 1, 2), expected)
        assert fast.nhwc(x.contiguous()) is None
    model = infer.load(exported(tmp_path, "reactnet18"))
    block = model.stages[1][0]
    assert isinstance(block.block.shortcut, shortcut.PooledPointwise)
    batch = torch.randn(2, 3, 32, 32)
    seen = []
    with torch.inference_mode():
        reference = model(batch)
        block.block.shortcut.register_forward_hook(lambda m, args, out: seen.append(out.shape))
        assert torch.equal(model(batch), reference) and len(seen) == 1
