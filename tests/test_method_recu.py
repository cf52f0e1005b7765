"""ReCU against the authors' code (z-hXu/ReCU, imagenet/modules/binarized_modules.py and the
tau schedule `cpt_tau` in imagenet/main.py), written out here in float64."""
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bnntrain.engine.hooks import QuantizerSchedule
from bnntrain.nn import BinaryConv2d
from bnntrain.nn.quantizers import INPUT_QUANTIZERS, WEIGHT_QUANTIZERS, build_quantizer
from bnntrain.nn.quantizers.recu import recu_tau

TOL = {"rtol": 0, "atol": 1e-12}


class IdentitySign(torch.autograd.Function):
    """The code's BinaryQuantize: sign forward (+1 at 0, as ours), g unchanged backward."""

    @staticmethod
    def forward(ctx, x):
        return torch.where(x >= 0, 1.0, -1.0).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        return grad.clone()


class ApproxSignA(torch.autograd.Function):
    """The code's BinaryQuantize_a: sign forward, g * clamp(2 - |2x|, min=0) backward."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return torch.where(x >= 0, 1.0, -1.0).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return (2 - torch.abs(2 * x)).clamp(min=0) * grad.clone()


def code_weight(w, tau):
    """BinarizeConv2d.forward's weight path, up to the binary weight (before alpha)."""
    w0 = w - w.mean([1, 2, 3], keepdim=True)
    w1 = w0 / (torch.sqrt(w0.var([1, 2, 3], keepdim=True) + 1e-5) / 2 / np.sqrt(2))
    ew = torch.mean(torch.abs(w1))
    q_tau = (-ew * torch.log(2 - 2 * torch.tensor(tau, dtype=w.dtype))).detach().cpu().item()
    w2 = torch.clamp(w1, -q_tau, q_tau)
    return IdentitySign.apply(w2), w1.detach(), q_tau


def code_activation(a, training):
    a0 = a / torch.sqrt(a.var([1, 2, 3], keepdim=True) + 1e-5) if training else a
    return ApproxSignA.apply(a0), a0.detach()


def code_tau(epoch, epochs, tau_min=0.85, tau_max=0.99):
    """cpt_tau, float32 as the code computes it."""
    a = torch.tensor(np.e)
    t_min, t_max = torch.tensor(tau_min).float(), torch.tensor(tau_max).float()
    big_a = (t_max - t_min) / (a - 1)
    b = t_min - big_a
    return (big_a * torch.tensor([torch.pow(a, epoch / epochs)]).float() + b).item()


def weights(seed=0):
    return torch.randn(16, 8, 3, 3, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def ratio_to_q(w, tau, index):
    _, w1, q_tau = code_weight(w, tau)
    return w1[index].abs().item() / q_tau


def planted(w, tau, index, ratio):
    """w with w[index] set (by bisection) so that its standardised value is `ratio` times Q."""
    low, high = 0.0, 1e3
    w = w.clone()
    for _ in range(200):
        w[index] = (low + high) / 2
        low, high = (w[index].item(), high) if ratio_to_q(w, tau, index) < ratio else (low, w[index].item())
    return w


@pytest.mark.parametrize("tau", [0.85, 0.92, 0.99])
def test_weight_forward_and_gradients_are_the_codes(tau):
    q = build_quantizer(WEIGHT_QUANTIZERS, "recu").double()
    q.tau = tau
    w = weights()
    for _ in range(4):  # each planted weight moves Q a little: plant both until both hold
        w = planted(planted(w, tau, (0, 0, 0, 0), 1 - 1e-6), tau, (1, 0, 0, 0), 1 + 1e-6)
    w.requires_grad_(True)
    alpha = q.scale_for(w)
    g = torch.randn(16, 8, 3, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ours = q(w)
    (ours * g).sum().backward()
    got = w.grad.clone(), alpha.grad.clone()
    w.grad = None
    binary, w1, q_tau = code_weight(w, tau)
    # standardised weights just inside and just outside the clip point, where the gradient ends
    assert 1 - 1e-5 < w1[0, 0, 0, 0].abs() / q_tau < 1 < w1[1, 0, 0, 0].abs() / q_tau < 1 + 1e-5
    alpha_code = alpha.detach().clone().requires_grad_(True)
    theirs = binary * alpha_code  # the code scales the output; the product is the same
    (theirs * g).sum().backward()
    torch.testing.assert_close(ours, theirs, **TOL)
    torch.testing.assert_close(got[0], w.grad, **TOL)
    torch.testing.assert_close(got[1], alpha_code.grad, **TOL)
    assert (w.grad != 0).any() and (got[1] != 0).all()


@pytest.mark.parametrize("training", [True, False])
def test_activation_forward_and_gradient_are_the_codes(training):
    q = build_quantizer(INPUT_QUANTIZERS, "recu_sign").double().train(training)
    x = torch.randn(4, 8, 6, 6, generator=torch.Generator().manual_seed(2), dtype=torch.float64) * 1.5
    x.view(-1)[:6] = torch.tensor([0.0, 1.0, -1.0, 0.999, -0.999, 1.001], dtype=x.dtype)  # the clip points, in eval
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    ours_x = x.clone().requires_grad_(True)
    ours = q(ours_x)
    (ours * g).sum().backward()
    code_x = x.clone().requires_grad_(True)
    theirs, a0 = code_activation(code_x, training)
    (theirs * g).sum().backward()
    assert ((a0.abs() - 1).abs() < 0.01).any()  # inputs at or near |a0| = 1, where the gradient ends
    torch.testing.assert_close(ours, theirs, **TOL)
    torch.testing.assert_close(ours_x.grad, code_x.grad, **TOL)
    assert torch.equal(ours, torch.where(x >= 0, 1.0, -1.0).double())  # sign(x) in both modes
    if not training:
        assert ours_x.grad.view(-1)[:3].tolist() == [2 * g.view(-1)[0].item(), 0.0, 0.0]


def test_tau_follows_the_codes_schedule_through_the_training_loop():
    epochs = 200
    conv = BinaryConv2d(4, 4, 3, input_quantizer="recu_sign", weight_quantizer="recu")
    hook = QuantizerSchedule()
    run = SimpleNamespace(parts=SimpleNamespace(model=torch.nn.Sequential(conv), optimizer=None), epochs=epochs)
    hook.before_stage(run)
    for epoch, expected in [(0, 0.85), (epochs // 2, None), (epochs - 1, None)]:
        hook.before_epoch(run, epoch)
        tau = conv.weight_quantizer.tau
        assert tau == pytest.approx(code_tau(epoch, epochs), rel=1e-6, abs=1e-7)  # float32 in the code
        if expected is not None:
            assert tau == expected
    assert recu_tau(0.5, 0.85, 0.99) == pytest.approx(0.85 + 0.14 * (math.exp(0.5) - 1) / (math.e - 1), abs=1e-15)
    assert recu_tau(1.0, 0.85, 0.99) == pytest.approx(0.99, abs=1e-15)
    assert 0.85 < recu_tau((epochs - 1) / epochs, 0.85, 0.99) < 0.99


def test_config_round_trip_with_other_taus_and_bad_taus_refused():
    q = build_quantizer(WEIGHT_QUANTIZERS, {"name": "recu", "tau_min": 0.8, "tau_max": 0.95})
    assert q.config() == {"name": "recu", "tau_min": 0.8, "tau_max": 0.95}
    again = build_quantizer(WEIGHT_QUANTIZERS, q.config())
    again.set_progress(1.0)
    assert again.tau == pytest.approx(0.95)
    assert build_quantizer(INPUT_QUANTIZERS, {"name": "recu_sign"}).config() == {"name": "recu_sign"}
    for bad in ({"tau_min": 0.5}, {"tau_max": 1.0}, {"tau_min": 0.9, "tau_max": 0.8}):
        with pytest.raises(ValueError, match="recu needs 0.5 < tau_min <= tau_max < 1"):
            build_quantizer(WEIGHT_QUANTIZERS, {"name": "recu", **bad})


def test_a_binary_conv_is_the_codes_layer_and_trains_one_step():
    """BinaryConv2d(recu_sign, recu) = BinarizeConv2d: conv(ba, bw) * alpha, same gradients;
    alpha is a parameter of the layer's quantizer, saved in its state dict."""
    torch.manual_seed(0)
    conv = BinaryConv2d(8, 16, 3, stride=2, padding=1, input_quantizer="recu_sign", weight_quantizer="recu").double()
    alpha = conv.weight_quantizer.alpha
    assert alpha.shape == (16, 1, 1, 1) and 0 <= alpha.min() and alpha.max() < 1  # the code's torch.rand
    assert "weight_quantizer.alpha" in conv.state_dict()
    conv.weight_quantizer.set_progress(0.3)
    x = torch.randn(2, 8, 9, 9, dtype=torch.float64, requires_grad=True)
    out = conv(x)
    out.square().mean().backward()
    x_code = x.detach().clone().requires_grad_(True)
    w_code = conv.weight.detach().clone().requires_grad_(True)
    a_code = alpha.detach().view(16, 1, 1).clone().requires_grad_(True)  # the code's (out, 1, 1)
    ba, _ = code_activation(x_code, True)
    bw, _, _ = code_weight(w_code, conv.weight_quantizer.tau)
    theirs = F.conv2d(ba, bw, None, 2, 1) * a_code
    theirs.square().mean().backward()
    torch.testing.assert_close(out, theirs, **TOL)
    for got, want in ((x.grad, x_code.grad), (conv.weight.grad, w_code.grad), (alpha.grad.view(16, 1, 1), a_code.grad)):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-10)
    before = alpha.detach().clone()
    optimizer = torch.optim.SGD(conv.parameters(), lr=0.1)
    assert any(p is alpha for group in optimizer.param_groups for p in group["params"])
    optimizer.step()
    assert all(torch.isfinite(p.grad).all() for p in conv.parameters())
    assert not torch.equal(alpha, before)
    again = BinaryConv2d(8, 16, 3, stride=2, padding=1, input_quantizer="recu_sign", weight_quantizer="recu").double()
    again.load_state_dict(conv.state_dict())
    again.weight_quantizer.tau = conv.weight_quantizer.tau
    torch.testing.assert_close(again(x.detach()), conv(x.detach()), **TOL)


def test_the_export_runs_a_recu_layer_as_trained():
    """Packed as sign(alpha sign(w')) and |alpha| per channel, with a negative alpha; in eval
    mode the activations are sign(x)."""
    from bnntrain.tools.export.inference import to_inference

    torch.manual_seed(0)
    conv = BinaryConv2d(4, 5, 3, padding=1, input_quantizer="recu_sign", weight_quantizer="recu")
    with torch.no_grad():
        conv.weight_quantizer.alpha.copy_(torch.tensor([0.5, -1.5, 2.0, 0.25, 1.0]).view(5, 1, 1, 1))
    model = torch.nn.Sequential(conv).eval()
    x = torch.randn(2, 4, 6, 6)
    want = model(x)
    to_inference(model)
    torch.testing.assert_close(model(x), want, rtol=0, atol=1e-5)
