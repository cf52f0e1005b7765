"""FDA against BiBench's code (htqin/BiBench, bibench/models/layers/fda.py: FDA_BinaryQuantize,
NoiseAdaption, NoiseAdaption_a, FDAConv2d.model_params_update and forward) and the authors'
MindSpore evaluation code (research/cv/FDA-BNN/src/quan.py), written out here in float64."""
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bnntrain.engine.hooks import QuantizerSchedule
from bnntrain.nn import BinaryConv2d, BinaryLinear
from bnntrain.nn.quantizers import INPUT_QUANTIZERS, WEIGHT_QUANTIZERS, build_quantizer
from bnntrain.nn.fda_noise import NoiseAdaptation, noise_alpha
from bnntrain.tools.export.inference import to_inference

TOL = {"rtol": 0, "atol": 1e-12}


class CodeFdaQuantize(torch.autograd.Function):
    """FDA_BinaryQuantize with omega = 0.1; sign forward (+1 at 0 here: torch.sign's 0 there
    is the one difference)."""

    @staticmethod
    def forward(ctx, x, n):
        ctx.save_for_backward(x)
        ctx.n = n
        return torch.where(x >= 0, 1.0, -1.0).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        omega = 0.1
        grad_input = 4 * omega / np.pi * sum([torch.cos((2 * i + 1) * omega * x) for i in range(ctx.n + 1)]) * grad
        grad_input[x.gt(1)] = 0
        grad_input[x.lt(-1)] = 0
        return grad_input, None


def code_schedule(epoch, epochs):
    """model_params_update: (alpha, n) for an epoch."""
    alpha = 0.05 * (1 + torch.cos(torch.tensor((epoch + 1) / epochs) * np.pi))
    return alpha.item(), 9 + int(epoch / epochs * 9)


def code_noise(x, fc1, fc2):
    """NoiseAdaption.forward (a weight: each output channel flattened)."""
    shape = x.shape
    y = fc2(F.relu(fc1(x.view(shape[0], -1)))).reshape(shape)
    return y + 0.1 * torch.sin(x)


def code_noise_a(x, fc1, fc2):
    """NoiseAdaption_a.forward (an activation: the channels at each position)."""
    shape = x.shape
    y = x.view(shape[0], shape[1], -1).contiguous().permute(0, 2, 1).contiguous()
    y = fc2(F.relu(fc1(y))).permute(0, 2, 1).contiguous().reshape(shape)
    return y + 0.1 * torch.sin(x)


def edgy(*shape, seed=0):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 1.2
    edges = [0.0, 1.0, -1.0, 1 - 1e-9, -1 + 1e-9, 1 + 1e-9, -1 - 1e-9, 1e-12, 40.0]
    x.view(-1)[:9] = torch.tensor(edges, dtype=x.dtype)
    return x


@pytest.mark.parametrize("progress, n", [(0.0, 9), (0.5, 13), (0.99, 17)])
def test_activation_forward_and_gradient_are_the_codes(progress, n):
    q = build_quantizer(INPUT_QUANTIZERS, "fda_sign")
    q.set_progress(progress)
    assert q.n == n
    x = edgy(2, 4, 5, 5)
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ours_x = x.clone().requires_grad_(True)
    ours = q(ours_x)
    (ours * g).sum().backward()
    code_x = x.clone().requires_grad_(True)
    theirs = CodeFdaQuantize.apply(code_x, n)
    (theirs * g).sum().backward()
    torch.testing.assert_close(ours, theirs, **TOL)
    torch.testing.assert_close(ours_x.grad, code_x.grad, **TOL)
    grad = ours_x.grad.view(-1) / g.view(-1)
    assert grad[0].item() == pytest.approx(0.4 / math.pi * (n + 1))  # every cosine is 1 at 0
    assert grad[1] != 0 and grad[3] != 0 and grad[5] == 0 and grad[8] == 0  # |x| = 1 passes, |x| > 1 not


@pytest.mark.parametrize("scale", ["layer", "channel"])
def test_weight_forward_and_gradient_are_the_codes(scale):
    q = build_quantizer(WEIGHT_QUANTIZERS, {"name": "fda", "scale": scale})
    q.set_progress(0.5)
    w = edgy(6, 4, 3, 3, seed=2) * 0.5
    g = torch.randn(w.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    ours_w = w.clone().requires_grad_(True)
    ours = q(ours_w)
    (ours * g).sum().backward()
    code_w = w.clone().requires_grad_(True)
    if scale == "channel":  # FDAConv2d's scaling_factor
        factor = torch.mean(torch.mean(torch.mean(abs(code_w), dim=3, keepdim=True), dim=2, keepdim=True),
                            dim=1, keepdim=True).detach()
    else:  # the MindSpore ScaleSigner's mean |w| over the whole weight
        factor = code_w.abs().mean().detach()
    theirs = CodeFdaQuantize.apply(code_w, 13) * factor
    (theirs * g).sum().backward()
    torch.testing.assert_close(ours, theirs, **TOL)
    torch.testing.assert_close(ours_w.grad, code_w.grad, **TOL)
    assert (ours.unsqueeze(-1) == q.values(w)).any(-1).all()
    assert ours.abs().unique().numel() == (1 if scale == "layer" else 6)


def test_n_and_alpha_follow_the_codes_schedule_through_the_training_loop():
    epochs = 200
    conv = BinaryConv2d(4, 4, 3, input_quantizer={"name": "fda_sign", "noise": True},
                        weight_quantizer={"name": "fda", "noise": True})
    q_x, q_w = conv.input_quantizer, conv.weight_quantizer
    assert q_x.alpha == q_w.alpha == 0.1  # BiBench's buffer before its first update
    hook = QuantizerSchedule()
    run = SimpleNamespace(parts=SimpleNamespace(model=conv, optimizer=None), epochs=epochs)
    hook.before_stage(run)
    for epoch, n in [(0, 9), (epochs // 2, 13), (epochs - 1, 17)]:
        hook.before_epoch(run, epoch)
        assert q_x.n == q_w.n == n == code_schedule(epoch, epochs)[1]
        # BiBench's hook, before each epoch, reads n at the epoch's start and alpha at its end
        assert q_x.alpha == q_w.alpha == pytest.approx(code_schedule(epoch, epochs)[0], rel=1e-6, abs=1e-8)
        assert noise_alpha((epoch + 1) / epochs) == pytest.approx(code_schedule(epoch, epochs)[0], rel=1e-6, abs=1e-8)
    assert noise_alpha(0.5) == pytest.approx(0.05) and noise_alpha(1.0) == pytest.approx(0.0, abs=1e-17)


@pytest.mark.parametrize("flatten", [True, False])
@pytest.mark.parametrize("size, reduction", [(144, 64), (16, 4), (16, 64)])
def test_noise_adaptation_is_the_codes(flatten, size, reduction):
    torch.manual_seed(4)
    module = NoiseAdaptation(size, reduction, flatten=flatten).double()
    shape = (8, size // 9, 3, 3) if flatten and size == 144 else (2, size, 3, 3) if not flatten else (8, size)
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    g = torch.randn(shape, dtype=torch.float64)
    (module(x) * g).sum().backward()
    code_x = x.detach().clone().requires_grad_(True)
    if module.fc1 is None:  # BiBench's zero-width bottleneck outputs 0: only the sine is left
        assert size // reduction == 0
        theirs = 0.1 * torch.sin(code_x)
    else:
        fc1, fc2 = (torch.nn.Linear(1, 1, bias=False).double() for _ in range(2))
        fc1.weight = torch.nn.Parameter(module.fc1.weight.detach().clone())
        fc2.weight = torch.nn.Parameter(module.fc2.weight.detach().clone())
        theirs = (code_noise if flatten else code_noise_a)(code_x, fc1, fc2)
    (theirs * g).sum().backward()
    torch.testing.assert_close(module(x), theirs, **TOL)
    torch.testing.assert_close(x.grad, code_x.grad, **TOL)
    if module.fc1 is not None:
        torch.testing.assert_close(module.fc1.weight.grad, fc1.weight.grad, **TOL)
        torch.testing.assert_close(module.fc2.weight.grad, fc2.weight.grad, **TOL)
        assert module.fc1.weight.shape == (size // reduction, size)


def test_a_layer_with_the_noise_is_bibenchs_fda_conv_and_trains_one_step():
    """A binary conv with both quantizers' noise on is FDAConv2d's forward in training,
    gradients included (the channel scale, as BiBench), and the plain binary conv in eval."""
    torch.manual_seed(0)
    conv = BinaryConv2d(16, 8, 3, padding=1, input_quantizer={"name": "fda_sign", "noise": True, "reduction": 4},
                        weight_quantizer={"name": "fda", "scale": "channel", "noise": True, "reduction": 4}).double()
    q_x, q_w, w = conv.input_quantizer, conv.weight_quantizer, conv.weight
    assert q_x.fused is None and conv.fused_sign  # the noise needs the binary output: unfused
    for q in (q_x, q_w):
        q.set_progress(0.25)
    x = torch.randn(2, 16, 5, 5, dtype=torch.float64, requires_grad=True)
    out = conv(x)
    out.square().mean().backward()
    x_code = x.detach().clone().requires_grad_(True)
    w_code = w.detach().clone().requires_grad_(True)
    ours_params = [m.weight for m in (q_w.noise.fc1, q_w.noise.fc2, q_x.noise.fc1, q_x.noise.fc2)]
    copies = [p.detach().clone().requires_grad_(True) for p in ours_params]
    linear = [lambda v, p=p: F.linear(v, p) for p in copies]
    n, alpha = q_x.n, q_x.alpha
    bw = CodeFdaQuantize.apply(w_code, n) + alpha * code_noise(w_code, linear[0], linear[1])
    ba = CodeFdaQuantize.apply(x_code, n) + alpha * code_noise_a(x_code, linear[2], linear[3])
    scaling = w_code.abs().mean((1, 2, 3), keepdim=True).detach()
    theirs = F.conv2d(ba, bw * scaling, None, 1, 1)
    theirs.square().mean().backward()
    torch.testing.assert_close(out, theirs, rtol=0, atol=1e-10)
    pairs = [(x.grad, x_code.grad), (w.grad, w_code.grad), *((p.grad, c.grad) for p, c in zip(ours_params, copies))]
    for got, want in pairs:
        torch.testing.assert_close(got, want, rtol=0, atol=1e-10)
    conv.eval()  # the deployed network: no noise
    with torch.no_grad():
        plain = F.conv2d(torch.where(x >= 0, 1.0, -1.0).double(), torch.sign(w) * scaling, None, 1, 1)
        torch.testing.assert_close(conv(x), plain, rtol=0, atol=1e-10)
    layer = BinaryLinear(16, 4, input_quantizer={"name": "fda_sign", "noise": True},
                         weight_quantizer={"name": "fda", "noise": True})
    layer(torch.randn(3, 16)).square().mean().backward()
    torch.optim.SGD(list(conv.parameters()) + list(layer.parameters()), lr=0.1).step()
    assert all(torch.isfinite(p.grad).all() for p in [*conv.parameters(), *layer.parameters()])
    assert layer.input_quantizer.noise.flatten is False and layer.weight_quantizer.noise.flatten is True
    assert {"input_quantizer.noise.fc1.weight", "weight_quantizer.noise.fc1.weight"} <= set(dict(conv.named_parameters()))


def test_config_round_trip_keeps_other_arguments_and_refuses_bad_ones():
    spec = {"name": "fda", "scale": "channel", "omega": 0.2, "n_min": 3, "n_max": 7}
    q = build_quantizer(WEIGHT_QUANTIZERS, spec)
    assert q.config() == spec and build_quantizer(WEIGHT_QUANTIZERS, q.config()).config() == spec
    q.set_progress(0.5)
    assert q.n == 5
    x_spec = {"name": "fda_sign", "omega": 0.05, "n_min": 0, "n_max": 0}
    assert build_quantizer(INPUT_QUANTIZERS, x_spec).config() == x_spec
    with pytest.raises(ValueError, match="fda needs 0 <= n_min <= n_max"):
        build_quantizer(INPUT_QUANTIZERS, {"name": "fda_sign", "n_min": 9, "n_max": 5})
    with pytest.raises(ValueError, match="model.weight_quantizer.scale 'row'"):
        build_quantizer(WEIGHT_QUANTIZERS, {"name": "fda", "scale": "row"})


@pytest.mark.parametrize("scale", ["layer", "channel"])
def test_the_export_keeps_fda_as_the_authors_deploy_it(scale):
    """Without the noise (the MindSpore network has none), both quantizers are sign(x) and
    sign(w) times a scale: the export reproduces the layer."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(BinaryConv2d(4, 6, 3, input_quantizer="fda_sign",
                                             weight_quantizer={"name": "fda", "scale": scale})).eval()
    x = torch.randn(2, 4, 7, 7)
    x[x == 0] = 0.5
    expected = model(x)
    to_inference(model)
    torch.testing.assert_close(model(x), expected, rtol=1e-6, atol=1e-6)
