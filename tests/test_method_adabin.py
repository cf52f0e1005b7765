"""AdaBin against the authors' code (huawei-noah/Efficient-Computing,
BinaryNetworks/AdaBin/cifar10/utils/binarylib.py: BinaryActivation, AdaBin_Conv2d, Maxout;
Log_UP in cifar10/utils/utils.py), written out here in float64."""
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from bnntrain.engine.hooks import QuantizerSchedule
from bnntrain.errors import UserError
from bnntrain.nn import BinaryConv2d
from bnntrain.nn.maxout import Maxout
from bnntrain.nn.quantizers import INPUT_QUANTIZERS, WEIGHT_QUANTIZERS, build_quantizer
from bnntrain.tools.export.inference import to_inference

TOL = {"rtol": 0, "atol": 1e-12}


def plus_sign(x):
    """torch.sign, but +1 at 0 (ours; theirs gives 0 there, the one difference)."""
    return torch.where(x >= 0, 1.0, -1.0).to(x.dtype)


def code_activation(x, alpha_a, beta_a):
    """BinaryActivation.forward with its gradient_approx (Bi-Real's polynomial)."""
    x = (x - beta_a) / alpha_a
    mask1, mask2, mask3 = (x < -1).to(x.dtype), (x < 0).to(x.dtype), (x < 1).to(x.dtype)
    out1 = (-1) * mask1 + (x * x + 2 * x) * (1 - mask1)
    out2 = out1 * mask2 + (-x * x + 2 * x) * (1 - mask2)
    out3 = out2 * mask3 + 1 * (1 - mask3)
    out = plus_sign(x).detach() - out3.detach() + out3
    return alpha_a * (out + beta_a)


class CodeBinaryQuantize(torch.autograd.Function):
    """IR-Net's BinaryQuantize as AdaBin copies it: sign forward, k t (1 - tanh(t x)^2) g back."""

    @staticmethod
    def forward(ctx, x, k, t):
        ctx.save_for_backward(x)
        ctx.k, ctx.t = k, t
        return plus_sign(x)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return ctx.k * ctx.t * (1 - torch.pow(torch.tanh(x * ctx.t), 2)) * grad, None, None


def code_weight(w, k, t):
    """AdaBin_Conv2d.forward's weight path."""
    filter_size = w.shape[1] * w.shape[2] * w.shape[3]
    beta_w = w.mean((1, 2, 3)).view(-1, 1, 1, 1)
    alpha_w = torch.sqrt(((w - beta_w) ** 2).sum((1, 2, 3)) / filter_size).view(-1, 1, 1, 1)
    wb = CodeBinaryQuantize.apply((w - beta_w) / alpha_w, k, t)
    return wb * alpha_w + beta_w


def code_log_up(epoch, epochs):
    """Log_UP and the k beside it, in float32 as their script computes them."""
    kmin, kmax = math.log(1e-3) / math.log(10), math.log(1e1) / math.log(10)
    t = torch.tensor([math.pow(10, kmin + (kmax - kmin) / epochs * epoch)]).float()
    k = 1 / t if t < 1 else torch.tensor([1]).float()
    return k.item(), t.item()


def edges(alpha, beta, dtype=torch.float64):
    """Inputs whose (x - beta) / alpha is at and near 0 and +-1 (exact for these alpha, beta),
    then random ones."""
    u = torch.tensor([0.0, 1.0, -1.0, 1 - 1e-9, -1 + 1e-9, 1 + 1e-9, -1 - 1e-9, 1e-12, -1e-12, 0.5], dtype=dtype)
    rest = torch.randn(2, 4, 5, 5, generator=torch.Generator().manual_seed(0), dtype=dtype) * 2
    rest.view(-1)[:u.numel()] = u * alpha + beta
    return rest


@pytest.mark.parametrize("alpha, beta", [(1.0, 0.0), (0.5, 0.25), (2.0, -0.75)])
def test_activation_forward_and_gradients_are_the_codes(alpha, beta):
    q = build_quantizer(INPUT_QUANTIZERS, {"name": "adabin_sign", "alpha": alpha, "beta": beta}).double()
    x = edges(alpha, beta)
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ours_x = x.clone().requires_grad_(True)
    (q(ours_x) * g).sum().backward()
    code_x = x.clone().requires_grad_(True)
    a = torch.tensor(alpha, dtype=torch.float64, requires_grad=True)
    b = torch.tensor(beta, dtype=torch.float64, requires_grad=True)
    theirs = code_activation(code_x, a, b)
    (theirs * g).sum().backward()
    torch.testing.assert_close(q(x), theirs.detach(), **TOL)
    for got, want in ((ours_x.grad, code_x.grad), (q.alpha.grad, a.grad), (q.beta.grad, b.grad)):
        torch.testing.assert_close(got, want, **TOL)
    # the gradient is 2 g at the threshold and 0 from |x - beta| = alpha on
    assert ours_x.grad.view(-1)[:3].tolist() == [2 * g.view(-1)[0].item(), 0.0, 0.0]
    assert ours_x.grad.view(-1)[3].abs() < 1e-7 < ours_x.grad.view(-1)[9].abs()
    assert set(q(x).unique().tolist()) == {alpha * (beta - 1), alpha * (beta + 1)}


@pytest.mark.parametrize("progress", [0.0, 0.5, 0.99])
def test_weight_forward_and_gradients_are_the_codes(progress):
    q = build_quantizer(WEIGHT_QUANTIZERS, "adabin").double()
    q.set_progress(progress)
    w = torch.randn(6, 4, 3, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64) * 0.3 + 0.05
    g = torch.randn(w.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    ours_w = w.clone().requires_grad_(True)
    ours = q(ours_w)
    (ours * g).sum().backward()
    code_w = w.clone().requires_grad_(True)
    theirs = code_weight(code_w, q.ede.k, q.ede.t)
    (theirs * g).sum().backward()
    torch.testing.assert_close(ours, theirs, **TOL)
    torch.testing.assert_close(ours_w.grad, code_w.grad, **TOL)
    values = q.values(w)
    assert values.shape == (6, 1, 1, 1, 2) and (ours.unsqueeze(-1) == values).any(-1).all()
    mean, std = w.mean((1, 2, 3)), w.std((1, 2, 3), unbiased=False)
    torch.testing.assert_close(values.flatten(1), torch.stack([mean - std, mean + std], 1), **TOL)


def test_the_weights_schedule_is_log_up_through_the_training_loop():
    epochs = 120
    conv = BinaryConv2d(4, 4, 3, input_quantizer="adabin_sign", weight_quantizer="adabin")
    hook = QuantizerSchedule()
    run = SimpleNamespace(parts=SimpleNamespace(model=torch.nn.Sequential(conv), optimizer=None), epochs=epochs)
    hook.before_stage(run)
    ede = conv.weight_quantizer.ede
    for epoch in (0, epochs // 2, epochs - 1):
        hook.before_epoch(run, epoch)
        k, t = code_log_up(epoch, epochs)
        assert ede.t == pytest.approx(t, rel=1e-6) and ede.k == pytest.approx(k, rel=1e-6)
    hook.before_epoch(run, 0)
    assert (ede.t, ede.k) == (pytest.approx(1e-3), pytest.approx(1e3))  # k = 1/t while t < 1
    hook.before_epoch(run, epochs // 2)
    assert ede.t == pytest.approx(0.1) and ede.k == pytest.approx(10.0)  # halfway on the log scale
    hook.before_epoch(run, epochs - 1)
    assert 1 < ede.t < 10 and ede.k == 1.0


def test_config_round_trip_keeps_other_arguments():
    q = build_quantizer(INPUT_QUANTIZERS, {"name": "adabin_sign", "alpha": 2.0, "beta": -0.5})
    assert q.config() == {"name": "adabin_sign", "alpha": 2.0, "beta": -0.5}
    again = build_quantizer(INPUT_QUANTIZERS, q.config())
    assert (again.alpha.item(), again.beta.item()) == (2.0, -0.5)
    w = build_quantizer(WEIGHT_QUANTIZERS, {"name": "adabin", "t_min": 0.1, "t_max": 5.0})
    assert build_quantizer(WEIGHT_QUANTIZERS, w.config()).config() == {"name": "adabin", "t_min": 0.1, "t_max": 5.0}
    assert w.ede.t == pytest.approx(0.1)


def test_a_binary_conv_is_the_codes_layer_and_trains_one_step():
    """BinaryConv2d(adabin_sign, adabin) = AdaBin_Conv2d, gradients included; alpha_a and
    beta_a are parameters of the layer's input quantizer, in its state dict."""
    torch.manual_seed(0)
    conv = BinaryConv2d(8, 16, 3, stride=2, padding=1, input_quantizer="adabin_sign",
                        weight_quantizer="adabin").double()
    conv.weight_quantizer.set_progress(0.3)
    with torch.no_grad():
        conv.input_quantizer.alpha.fill_(0.8)
        conv.input_quantizer.beta.fill_(0.1)
    assert {"input_quantizer.alpha", "input_quantizer.beta"} <= set(conv.state_dict())
    x = torch.randn(2, 8, 9, 9, dtype=torch.float64, requires_grad=True)
    out = conv(x)
    out.square().mean().backward()
    x_code = x.detach().clone().requires_grad_(True)
    w_code = conv.weight.detach().clone().requires_grad_(True)
    a = torch.tensor(0.8, dtype=torch.float64, requires_grad=True)
    b = torch.tensor(0.1, dtype=torch.float64, requires_grad=True)
    ede = conv.weight_quantizer.ede
    theirs = F.conv2d(code_activation(x_code, a, b), code_weight(w_code, ede.k, ede.t), None, 2, 1)
    theirs.square().mean().backward()
    torch.testing.assert_close(out, theirs, **TOL)
    quantizer = conv.input_quantizer
    pairs = ((x.grad, x_code.grad), (conv.weight.grad, w_code.grad), (quantizer.alpha.grad, a.grad),
             (quantizer.beta.grad, b.grad))
    for got, want in pairs:
        torch.testing.assert_close(got, want, rtol=0, atol=1e-10)
    before = quantizer.beta.detach().clone()
    optimizer = torch.optim.SGD(conv.parameters(), lr=0.1)
    optimizer.step()
    assert all(torch.isfinite(p.grad).all() for p in conv.parameters())
    assert quantizer.beta.item() != before.item()


def test_maxout_is_the_codes():
    m = Maxout(4, neg_init=0.3, pos_init=1.5).double()
    with torch.no_grad():
        m.neg_scale.add_(torch.arange(4, dtype=torch.float64) / 10)
    x = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    x.view(-1)[:3] = torch.tensor([0.0, -1e-12, 1e-12])
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    ours_x = x.clone().requires_grad_(True)
    (m(ours_x) * g).sum().backward()
    code_x = x.clone().requires_grad_(True)
    pos = m.pos_scale.detach().clone().requires_grad_(True)
    neg = m.neg_scale.detach().clone().requires_grad_(True)
    theirs = pos.view(1, -1, 1, 1) * F.relu(code_x) - neg.view(1, -1, 1, 1) * F.relu(-code_x)
    (theirs * g).sum().backward()
    torch.testing.assert_close(m(x), theirs.detach(), **TOL)
    for got, want in ((ours_x.grad, code_x.grad), (m.pos_scale.grad, pos.grad), (m.neg_scale.grad, neg.grad)):
        torch.testing.assert_close(got, want, **TOL)
    assert ours_x.grad.view(-1)[0] == 0  # relu's gradient at 0, in both pieces
    flat = Maxout(3)
    v = torch.tensor([[-2.0, 0.0, 3.0]])
    assert flat(v).tolist() == [[-0.5, 0.0, 3.0]]  # a (N, C) batch too; PReLU(0.25) at first


def test_the_conv_is_a_pm1_conv_plus_an_all_ones_conv_and_constants():
    """Why the export refuses AdaBin: unpadded, conv(alpha_a (s + beta_a), alpha_w t + beta_w)
    = alpha_a alpha_w conv(s, t) + alpha_a beta_w conv(s, 1) + alpha_a beta_a alpha_w sum(t)
    + alpha_a beta_a beta_w n per output channel: one more +-1 conv (an all-ones kernel)."""
    torch.manual_seed(1)
    conv = BinaryConv2d(4, 6, 3, input_quantizer={"name": "adabin_sign", "alpha": 0.7, "beta": 0.2},
                        weight_quantizer="adabin").double()
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64)
    a, b = conv.input_quantizer.alpha.item(), conv.input_quantizer.beta.item()  # 0.7, 0.2 in float32
    s, t = plus_sign(x - b), plus_sign(conv.weight - conv.weight.mean((1, 2, 3), keepdim=True))
    beta_w = conv.weight.mean((1, 2, 3)).detach()
    alpha_w = conv.weight.std((1, 2, 3), unbiased=False).detach()
    ones = torch.ones(1, 4, 3, 3, dtype=torch.float64)
    per_channel = (1, -1, 1, 1)
    folded = (a * alpha_w.view(per_channel) * F.conv2d(s, t) + a * beta_w.view(per_channel) * F.conv2d(s, ones)
              + (a * b * alpha_w * t.sum((1, 2, 3)) + a * b * beta_w * 36).view(per_channel))
    torch.testing.assert_close(conv(x).detach(), folded, rtol=0, atol=1e-10)


@pytest.mark.parametrize("role", ["input", "weight"])
def test_the_export_refuses_adabin(role):
    spec = {"input_quantizer": "adabin_sign"} if role == "input" else {"weight_quantizer": "adabin"}
    model = torch.nn.Sequential(BinaryConv2d(4, 4, 3, **spec))
    with pytest.raises(UserError, match=f"binarizes its {role} with adabin"):
        to_inference(model)
