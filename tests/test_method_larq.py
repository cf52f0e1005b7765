"""larq's SteHeaviside (`ste_heaviside`) and MagnitudeAwareSign (`magnitude_aware_sign`) against
larq's `larq/quantizers.py` and `larq/math.py`, written out below in torch as they are there."""
import pytest
import torch
from torch import nn

from bnntrain.errors import UserError
from bnntrain.nn import BinaryConv2d
from bnntrain.nn.quantizers import INPUT_QUANTIZERS, WEIGHT_QUANTIZERS, build_quantizer
from bnntrain.tools.export.inference import to_inference

TOL = {"rtol": 0, "atol": 1e-12}


def clipped_gradient(x, dy, clip_value):
    """larq's _clipped_gradient."""
    if clip_value is None:
        return dy
    return torch.where(x.abs() <= clip_value, dy, torch.zeros_like(dy))


class LarqFunction(torch.autograd.Function):
    """A larq quantizer: a forward and the clipped gradient of its `custom_gradient`."""

    @staticmethod
    def forward(ctx, x, forward, clip_value):
        ctx.save_for_backward(x)
        ctx.clip_value = clip_value
        return forward(x)

    @staticmethod
    def backward(ctx, dy):
        (x,) = ctx.saved_tensors
        return clipped_gradient(x, dy, ctx.clip_value), None, None


def larq_heaviside(x):
    return torch.sign(torch.relu(x))  # math.heaviside


def larq_sign(x):
    return torch.sign(torch.sign(x) + 0.1)  # math.sign


def larq_ste_heaviside(x, clip_value=1.0):
    return LarqFunction.apply(x, larq_heaviside, clip_value)


def larq_magnitude_aware_sign(w, clip_value=1.0):
    """MagnitudeAwareSign.call in torch's (out, in, h, w) layout: larq's mean over all axes but
    the last of its (h, w, in, out) kernels is the mean over all but the first here."""
    scale = w.abs().mean(dim=tuple(range(1, w.dim())), keepdim=True).detach()
    return scale * LarqFunction.apply(w, larq_sign, clip_value)


def edgy(*shape):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 1.5
    edges = [0.0, 1.0, -1.0, 1 + 1e-12, -1 - 1e-12, 0.999, -0.999, 0.5, -0.5, 0.5 + 1e-12, 3.0, -3.0]
    x.view(-1)[:len(edges)] = torch.tensor(edges, dtype=torch.float64)
    return x


def run_both(ours, theirs, x):
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(1), dtype=x.dtype)
    results = []
    for fn in (ours, theirs):
        leaf = x.clone().requires_grad_(True)
        y = fn(leaf)
        y.backward(g)
        results.append((y.detach(), leaf.grad))
    return results


@pytest.mark.parametrize("clip_value", [1.0, 0.5, None])
def test_ste_heaviside_is_larqs(clip_value):
    q = build_quantizer(INPUT_QUANTIZERS, {"name": "ste_heaviside", "clip_value": clip_value})
    x = edgy(4, 5, 3, 3)
    (y, grad), (want_y, want_grad) = run_both(q, lambda v: larq_ste_heaviside(v, clip_value), x)
    assert torch.equal(y, want_y) and y[0, 0, 0, 0] == 0  # 0 at x = 0
    torch.testing.assert_close(grad, want_grad, **TOL)
    assert (y.unsqueeze(-1) == q.values(x)).any(-1).all()


def test_ste_heaviside_config_round_trip_and_the_export_refuses_it():
    for clip_value in (0.5, None):
        config = {"name": "ste_heaviside", "clip_value": clip_value}
        assert build_quantizer(INPUT_QUANTIZERS, config).config() == config
    model = nn.Sequential(nn.Conv2d(3, 4, 3), BinaryConv2d(4, 4, 3, input_quantizer="ste_heaviside"))
    with pytest.raises(UserError, match="^1 binarizes its input with ste_heaviside, whose values are not"):
        to_inference(model)


def test_magnitude_aware_sign_is_larqs():
    q = build_quantizer(WEIGHT_QUANTIZERS, "magnitude_aware_sign")
    w = edgy(6, 4, 3, 3)
    w[w == 0] = 0.0  # larq's sign is +1 at -0.0; ours keeps the sign bit (docstring)
    (y, grad), (want_y, want_grad) = run_both(q, larq_magnitude_aware_sign, w)
    torch.testing.assert_close(y, want_y, **TOL)
    torch.testing.assert_close(grad, want_grad, **TOL)
    assert q.config() == {"name": "magnitude_aware_sign"}


def test_magnitude_aware_sign_is_scaled_sign_with_the_scaled_gradient_bit_for_bit():
    w = edgy(6, 4, 3, 3)
    mine = build_quantizer(WEIGHT_QUANTIZERS, "magnitude_aware_sign")
    scaled = build_quantizer(WEIGHT_QUANTIZERS, {"name": "scaled_sign", "gradient": "scaled"})
    (y, grad), (want_y, want_grad) = run_both(mine, scaled, w)
    assert torch.equal(y, want_y) and torch.equal(grad, want_grad)
    assert torch.equal(mine.values(w), scaled.values(w))


@pytest.mark.parametrize("fused", [True, False])
def test_a_layer_with_both_trains_one_step(fused):
    torch.manual_seed(0)
    conv = BinaryConv2d(4, 6, 3, padding=1, input_quantizer="ste_heaviside", weight_quantizer="magnitude_aware_sign")
    conv.fused_sign = fused  # no fused form: runs unfused either way
    before = conv.weight.detach().clone()
    optimizer = torch.optim.SGD(conv.parameters(), lr=0.1)
    x = torch.randn(2, 4, 8, 8, requires_grad=True)
    conv(x).square().mean().backward()
    assert torch.isfinite(conv.weight.grad).all() and torch.isfinite(x.grad).all()
    assert conv.weight.grad.abs().sum() > 0 and x.grad.abs().sum() > 0
    optimizer.step()
    assert not torch.equal(conv.weight.detach(), before)
