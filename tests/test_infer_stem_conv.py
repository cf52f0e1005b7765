"""bnntrain.infer's stem conv (infer/stem_conv.py): `direct_conv` sums each output as one fused
multiply-add chain from zero over its taps (row, column, channel), the bias added last, exactly
(against that formula in float64-emulated float32 arithmetic); that is PyTorch's order for
ResNet's and ReActNet-A's stems, whose outputs it gives bit for bit; other inputs stay PyTorch's."""
import numpy as np
import pytest
import torch
from torch import nn

from conftest import need
from test_infer_fused import exported

numba = need("numba", extra="infer")
from bnntrain import infer  # noqa: E402  (needs numba)
from bnntrain.infer import fused, pooling, stem  # noqa: E402

numba.set_num_threads(1)  # the suite's two workers share two cores


def conv_and_images(cin, cout, k, stride, pad, batch, size, bias=True):
    torch.manual_seed(cin * cout + k)
    conv = nn.Conv2d(cin, cout, k, stride, pad, bias=bias).eval()
    if bias:
        with torch.no_grad():
            conv.bias.normal_()
    x = torch.randn(batch, cin, size, size + 3, generator=torch.Generator().manual_seed(size))
    return conv, x.contiguous(memory_format=torch.channels_last)


def chain_formula(conv, x, channels_first=False):
    """Each output as a float32 fused multiply-add chain from zero over (ky, kx, c) (or (c, ky,
    kx)), the bias added last: a product of float32s is exact in float64, so rounding the
    float64 sum to float32 is the fused multiply-add (but for a double rounding no test case
    here meets)."""
    (kh, kw), (sh, sw), (ph, pw) = conv.kernel_size, conv.stride, conv.padding
    w = conv.weight.detach().double().numpy()
    xp = np.pad(x.detach().double().numpy(), ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    n, c, h, wd = x.shape
    oh, ow = (h + 2 * ph - kh) // sh + 1, (wd + 2 * pw - kw) // sw + 1
    acc = np.zeros((n, conv.out_channels, oh, ow), np.float32)
    taps = [(ky, kx, ci) for ky in range(kh) for kx in range(kw) for ci in range(c)]
    for ky, kx, ci in sorted(taps, key=lambda t: (t[2], t[0], t[1])) if channels_first else taps:
        window = xp[:, ci, ky:ky + sh * (oh - 1) + 1:sh, kx:kx + sw * (ow - 1) + 1:sw]
        acc = (acc.astype(np.float64) + w[None, :, ci, ky, kx, None, None] * window[:, None]).astype(np.float32)
    if conv.bias is not None:
        acc = acc + conv.bias.detach().numpy()[None, :, None, None]
    return torch.from_numpy(acc)


# (in, out, kernel, stride, padding, batch, size): ResNet-18's stem at a small size, ReActNet-A's,
# channels that fill no block of 16, one input channel, no padding, stride 1.
CASES = [(3, 64, 7, 2, 3, 1, 20), (3, 32, 3, 2, 1, 2, 17), (3, 20, 5, 1, 2, 1, 9), (1, 8, 3, 1, 1, 3, 6),
         (4, 16, 3, 2, 0, 1, 11)]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c)))
def test_direct_conv_is_the_chain_formula(case):
    conv, x = conv_and_images(*case)
    fast = stem.DirectConv2d(conv)
    with torch.inference_mode():
        got = fast._run(x)
    assert got.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(got.contiguous().view(torch.int32), chain_formula(conv, x).view(torch.int32))


def test_without_bias_and_the_order_matters():
    conv, x = conv_and_images(3, 16, 3, 1, 1, 1, 8, bias=False)
    with torch.inference_mode():
        got = stem.DirectConv2d(conv)._run(x)
    assert torch.equal(got, chain_formula(conv, x))
    # The same sums channel by channel differ in some bit: the test above can tell the orders apart.
    assert not torch.equal(got, chain_formula(conv, x, channels_first=True))


@pytest.mark.parametrize("case", [(3, 64, 7, 2, 3, 1, 32), (3, 32, 3, 2, 1, 2, 32)], ids=["resnet", "reactnet_a"])
def test_the_stems_run_in_numba_with_pytorchs_outputs(case):
    conv, x = conv_and_images(*case)
    fast = stem.DirectConv2d(conv)
    with torch.inference_mode():
        expected = conv(x)
        first, second = fast(x), fast(x)  # the first batch of a shape checks, the second runs the choice
    assert torch.equal(first, expected) and torch.equal(second, expected)
    assert list(fast.fast.values()) == [True]  # PyTorch sums these stems in the chain's order


def test_other_inputs_run_the_conv():
    conv, x = conv_and_images(3, 16, 3, 1, 1, 1, 8)
    fast = stem.DirectConv2d(conv)
    with torch.inference_mode():
        nchw = x.contiguous()
        assert torch.equal(fast(nchw), conv(nchw)) and fast.fast == {}
        with pytest.raises(RuntimeError, match="should be the same"):  # the conv's own error: it ran
            fast(x.double())
        assert fast.fast == {}
    assert not stem.fits(nn.Conv2d(16, 16, 3)) and not stem.fits(nn.Conv2d(3, 16, 3, groups=1, dilation=2))
    assert not stem.fits(nn.Conv2d(3, 16, 3, padding="same"))
    # ResNet's 7x7 stem runs in numba; a 3x3 one (27 taps per output) stays oneDNN's, the faster there.
    assert stem.fits(nn.Conv2d(3, 64, 7, 2, 3)) and not stem.fits(nn.Conv2d(3, 32, 3, 2, 1))


@pytest.mark.parametrize("window", [(3, 2, 1), (2, 2, 0), (3, 1, 1)], ids=["resnet", "2x2", "stride1"])
def test_max_pool_after_the_conv_keeps_pytorchs_rule(window):
    """Conv and max-pool in one pass: NaNs of distinct payloads (the last of a window wins),
    infinities and signed zeros pass a 1x1 conv of weight 1 and bias -0.0 as they are."""
    conv = nn.Conv2d(1, 20, 1)
    with torch.no_grad():
        conv.weight.fill_(1.0)
        conv.bias.fill_(-0.0)
    values = torch.randn(2, 1, 9, 11, generator=torch.Generator().manual_seed(3))
    bits = values.view(torch.int32)
    bits[0, 0, 0, :4] = torch.tensor([0x7FC00001, 0x7FC00002, 0x7FC00003, 0x7FC00004], dtype=torch.int32)  # NaNs
    bits[0, 0, 3, 3:6] = torch.tensor([0x7FC00005, 0x7FC00006, 0x7FC00007], dtype=torch.int32)  # inside a window
    values[0, 0, 2, 2:5] = torch.tensor([float("inf"), -float("inf"), -0.0])
    values[1, 0, 4, 4:8] = torch.tensor([-0.0, 0.0, 0.0, -0.0])
    x = values.contiguous(memory_format=torch.channels_last)
    pool = pooling.FastMaxPool2d(nn.MaxPool2d(*window))
    fused = stem.DirectConvMaxPool(conv, pool)
    with torch.inference_mode():
        expected = pool.pool(conv(x))
        got = fused._run(x)
    assert torch.equal(got.contiguous().view(torch.int32), expected.contiguous().view(torch.int32))
    assert torch.isnan(expected).any()  # the NaNs reached the pool


def test_load_leaves_a_small_stem_conv_to_pytorch(tmp_path):
    path = exported(tmp_path, "reactnet18", 32)  # the CIFAR stem: a 3x3 conv
    chunked = infer.load(path).stem
    assert isinstance(chunked, stem.ChunkedStem) and type(chunked.stem[0]) is nn.Conv2d


def test_load_runs_an_imagenet_stem_with_its_max_pool(tmp_path):
    """The conv and its max-pool in one module, which packs the first block's signs in its pass;
    a hook that changes the stem's output in place stops that hand-over."""
    path = exported(tmp_path, "birealnet18", 64, "model.stem=imagenet")
    model = infer.load(path)
    layers = list(model.stem.stem)
    assert isinstance(layers[0], stem.DirectConvMaxPool)
    assert not any(isinstance(m, (nn.MaxPool2d, pooling.FastMaxPool2d)) for m in layers[1:])  # the pool runs in it
    first = next(m for m in model.modules() if isinstance(m, fused.FusedBinaryBlock))
    assert layers[0].next_layer is first.conv
    reference = infer.load(path, fuse=False)
    x = torch.randn(3, 3, 64, 64)
    with torch.inference_mode():
        assert torch.equal(model(x), reference(x)) and torch.equal(model(x), reference(x))
        assert hasattr(model.stem(x.contiguous(memory_format=torch.channels_last)), "packed_signs")
        layers[0].register_forward_hook(lambda m, args, out: out.add_(0.5))
        reference.stem[-1].register_forward_hook(lambda m, args, out: out.add_(0.5))  # its max-pool
        assert torch.equal(model(x), reference(x))
    checked = list(layers[0].fast.values())
    assert checked and all(checked)
