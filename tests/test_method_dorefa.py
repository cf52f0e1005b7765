"""DoReFa-Net's 1-bit weights (`dorefa_sign`) against tensorpack's `examples/DoReFa-Net/dorefa.py`
(`get_dorefa`'s `fw` for bitW = 1), written out below in torch as it is there."""
import pytest
import torch
from torch import nn

from bnntrain.nn import BinaryConv2d
from bnntrain.nn.quantizers import WEIGHT_QUANTIZERS, build_quantizer
from bnntrain.tools.export.inference import to_inference


class AuthorsSign(torch.autograd.Function):
    """fw's `_sign`: where(x == 0, 1, sign(x / E)) * E forward, dy backward; E stop-gradient."""

    @staticmethod
    def forward(ctx, x, e):
        return torch.where(x == 0, torch.ones_like(x), torch.sign(x / e)) * e

    @staticmethod
    def backward(ctx, dy):
        return dy, None


def authors_fw(x):
    e = x.abs().mean().detach()  # tf.stop_gradient(tf.reduce_mean(tf.abs(x)))
    return AuthorsSign.apply(x, e)


def weights():
    w = torch.randn(6, 4, 3, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 1.5
    w.view(-1)[:7] = torch.tensor([0.0, 1.0, -1.0, 0.999, -1.001, 5.0, -5.0], dtype=torch.float64)
    return w


def test_forward_and_gradient_are_the_authors():
    w = weights()
    g = torch.randn(w.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    got, want = w.clone().requires_grad_(True), w.clone().requires_grad_(True)
    y = build_quantizer(WEIGHT_QUANTIZERS, "dorefa_sign")(got)
    y.backward(g)
    authors_fw(want).backward(g)
    torch.testing.assert_close(y.detach(), authors_fw(w), rtol=0, atol=1e-12)
    assert torch.equal(got.grad, want.grad) and torch.equal(got.grad, g)  # unclipped, unscaled
    assert y[0, 0, 0, 0] == w.abs().mean()  # +E at w = 0


def test_one_scale_for_the_whole_layer():
    q = build_quantizer(WEIGHT_QUANTIZERS, "dorefa_sign")
    w = weights()
    y = q(w)
    assert torch.equal(y.abs(), torch.full_like(y, w.abs().mean().item()))
    assert (y.unsqueeze(-1) == q.values(w)).any(-1).all()
    assert q.config() == {"name": "dorefa_sign"} and q.channel_scaled and q.packable


def test_the_export_computes_what_training_does():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1),
                          BinaryConv2d(4, 5, 3, padding=1, weight_quantizer="dorefa_sign")).eval()
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        trained = model(x)
        to_inference(model)
        torch.testing.assert_close(model(x), trained, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fused", [True, False])
def test_a_layer_trains_one_step(fused):
    torch.manual_seed(0)
    conv = BinaryConv2d(4, 6, 3, padding=1, weight_quantizer="dorefa_sign")
    conv.fused_sign = fused
    before = conv.weight.detach().clone()
    optimizer = torch.optim.SGD(conv.parameters(), lr=0.1)
    conv(torch.randn(2, 4, 8, 8)).square().mean().backward()
    assert torch.isfinite(conv.weight.grad).all() and conv.weight.grad.abs().sum() > 0
    optimizer.step()
    assert not torch.equal(conv.weight.detach(), before)
