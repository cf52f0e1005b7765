"""IR-Net's EDE (`ede_sign`) and Libra-PB (`irnet_libra_pb`) against the authors' code
(github.com/htqin/IR-Net), written out below as it is there: `binaryfunction.py`'s
BinaryQuantize, `ir_1w1a.py`'s IRConv2d.forward and `trainer.py`'s Log_UP schedule."""
import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from bnntrain.engine.hooks import QuantizerSchedule
from bnntrain.nn import BinaryConv2d
from bnntrain.nn.quantizers import INPUT_QUANTIZERS, WEIGHT_QUANTIZERS, build_quantizer
from bnntrain.tools.export.inference import to_inference

TOL = {"rtol": 0, "atol": 1e-12}
SCHEDULES = [(0.1, 10.0), (1e-3, 10.0)]  # the paper's and VGG-Small's; their ResNet-20 1w1a trainer's


class AuthorsBinaryQuantize(torch.autograd.Function):
    """binaryfunction.py: torch.sign forward, k t (1 - tanh(t x)^2) g backward."""

    @staticmethod
    def forward(ctx, input, k, t):
        ctx.save_for_backward(input, k, t)
        return torch.sign(input)

    @staticmethod
    def backward(ctx, grad_output):
        input, k, t = ctx.saved_tensors
        return k * t * (1 - torch.pow(torch.tanh(input * t), 2)) * grad_output, None, None


def authors_log_up(t_min, t_max, epoch, epochs):
    """trainer.py's Log_UP (before its cast to float32)."""
    k_min, k_max = math.log(t_min) / math.log(10), math.log(t_max) / math.log(10)
    return math.pow(10, k_min + (k_max - k_min) / epochs * epoch)


def authors_t_k(t_min, t_max, epoch, epochs):
    t = authors_log_up(t_min, t_max, epoch, epochs)
    k = 1 / t if t < 1 else 1.0
    return torch.tensor([k], dtype=torch.float64), torch.tensor([t], dtype=torch.float64)


def authors_weight(w, k, t):
    """ir_1w1a.py's IRConv2d.forward, its weight's part."""
    bw = w - w.view(w.size(0), -1).mean(-1).view(w.size(0), 1, 1, 1)
    bw = bw / bw.view(bw.size(0), -1).std(-1).view(bw.size(0), 1, 1, 1)
    sw = torch.pow(torch.tensor([2] * bw.size(0), dtype=w.dtype),
                   (torch.log(bw.abs().view(bw.size(0), -1).mean(-1)) / math.log(2)).round()
                   ).view(bw.size(0), 1, 1, 1).detach()
    bw = AuthorsBinaryQuantize.apply(bw, k, t)
    return bw * sw


def activations():
    """Random values, and those where t x is near 0, 1 and beyond for t from 1e-3 to 10."""
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 3
    edges = [0.0, 1.0, -1.0, 1 + 1e-9, -1 + 1e-9, 0.1, -0.1, 10.0, -10.0, 100.0, -1000.0, 1e-12, -1e-12]
    x.view(-1)[:len(edges)] = torch.tensor(edges, dtype=torch.float64)
    return x


def weights():
    """Conv weights; channel 0 heavy-tailed (its scale is not 1), channel 1 all positive."""
    w = torch.randn(6, 4, 3, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    w[0] = 1e-3 * w[0]
    w[0, 0, 0, 0] = 10.0
    w[1] = w[1].abs() + 0.5
    return w


def run_both(ours, theirs, x, g):
    outputs, grads = [], []
    for fn in (ours, theirs):
        leaf = x.clone().requires_grad_(True)
        y = fn(leaf)
        y.backward(g)
        outputs.append(y.detach())
        grads.append(leaf.grad)
    return outputs, grads


@pytest.mark.parametrize("t_min, t_max", SCHEDULES)
@pytest.mark.parametrize("epoch", [0, 200, 399])
def test_ede_sign_is_the_authors_binary_quantize_at_each_epoch(epoch, t_min, t_max):
    q = build_quantizer(INPUT_QUANTIZERS, {"name": "ede_sign", "t_min": t_min, "t_max": t_max})
    q.set_progress(epoch / 400)  # what the training loop passes at epoch `epoch` of 400
    k, t = authors_t_k(t_min, t_max, epoch, 400)
    x = activations()
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    (y, want_y), (grad, want_grad) = run_both(q, lambda v: AuthorsBinaryQuantize.apply(v, k, t), x, g)
    torch.testing.assert_close(grad, want_grad, **TOL)
    nonzero = x != 0
    assert torch.equal(y[nonzero], want_y[nonzero])
    assert (y[~nonzero] == 1).all() and (want_y[~nonzero] == 0).all()  # sign(0): +1 here, 0 in torch.sign


@pytest.mark.parametrize("t_min, t_max", SCHEDULES)
@pytest.mark.parametrize("epoch", [0, 200, 399])
def test_libra_pb_is_the_authors_weight_at_each_epoch(epoch, t_min, t_max):
    q = build_quantizer(WEIGHT_QUANTIZERS, {"name": "irnet_libra_pb", "t_min": t_min, "t_max": t_max})
    q.set_progress(epoch / 400)
    k, t = authors_t_k(t_min, t_max, epoch, 400)
    w = weights()
    g = torch.randn(w.shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    (y, want_y), (grad, want_grad) = run_both(q, lambda v: authors_weight(v, k, t), w, g)
    assert torch.equal(y, want_y)
    torch.testing.assert_close(grad, want_grad, **TOL)  # through the mean and the std too


def test_libra_pb_values_are_a_power_of_two_per_channel_with_the_balanced_signs():
    q = build_quantizer(WEIGHT_QUANTIZERS, "irnet_libra_pb")
    w = weights()
    y = q(w)
    assert (y.unsqueeze(-1) == q.values(w)).any(-1).all()
    scale = y.abs().flatten(1)
    assert torch.equal(scale, scale[:, :1].expand_as(scale))
    assert scale[0, 0] == 0.25 and scale[2, 0] == 1  # the heavy-tailed channel; a bell-shaped one
    assert (y[1] > 0).any() and (y[1] < 0).any()  # all of channel 1 is positive: signs of w - mean


def test_the_export_keeps_libra_pbs_own_signs_and_scale():
    """Its signs are those of the standardised w, not of w: the export keeps the quantized
    weight's signs and its one magnitude per output channel, so the network is the same."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1),
                          BinaryConv2d(4, 5, 3, padding=1, weight_quantizer="irnet_libra_pb")).eval()
    with torch.no_grad():
        model[1].weight.add_(0.3)  # channel means far from 0: sign(w) and sign(w - mean) differ
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        trained = model(x)
        to_inference(model)
        torch.testing.assert_close(model(x), trained, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("t_min, t_max", SCHEDULES)
def test_schedule_at_the_start_halfway_and_the_last_epoch(t_min, t_max):
    q = build_quantizer(INPUT_QUANTIZERS, {"name": "ede_sign", "t_min": t_min, "t_max": t_max})
    assert (q.ede.t, q.ede.k) == (t_min, 1 / t_min)  # before any epoch: ir_1w1a.py's t = 0.1, k = 10
    for epoch, t in [(0, t_min), (200, math.sqrt(t_min * t_max)), (399, authors_log_up(t_min, t_max, 399, 400))]:
        q.set_progress(epoch / 400)
        k = 1 / t if t < 1 else 1.0
        assert q.ede.t == pytest.approx(t, rel=1e-13) and q.ede.k == pytest.approx(k, rel=1e-13)
    assert q.ede.t < t_max and q.ede.k == 1  # t_max is approached, never reached


def test_the_training_loop_moves_both_quantizers_of_a_layer():
    conv = BinaryConv2d(4, 4, 3, input_quantizer="ede_sign", weight_quantizer="irnet_libra_pb")
    run = SimpleNamespace(parts=SimpleNamespace(model=nn.Sequential(conv), optimizer=None), epochs=4)
    hook = QuantizerSchedule()
    hook.before_stage(run)
    hook.before_epoch(run, 2)  # halfway: t = sqrt(0.1 * 10) = 1, k = 1
    for q in (conv.input_quantizer, conv.weight_quantizer):
        assert q.ede.t == pytest.approx(1.0, rel=1e-15) and q.ede.k == 1.0


def test_config_round_trip_with_other_arguments():
    for registry, name in [(INPUT_QUANTIZERS, "ede_sign"), (WEIGHT_QUANTIZERS, "irnet_libra_pb")]:
        config = {"name": name, "t_min": 1e-3, "t_max": 5.0}
        q = build_quantizer(registry, config)
        assert q.config() == config and build_quantizer(registry, q.config()).config() == config
        assert q.ede.t == 1e-3 and q.ede.k == pytest.approx(1e3)


@pytest.mark.parametrize("fused", [True, False])
def test_a_layer_with_both_trains_one_step(fused):
    torch.manual_seed(0)
    conv = BinaryConv2d(4, 6, 3, padding=1, input_quantizer="ede_sign", weight_quantizer="irnet_libra_pb")
    conv.fused_sign = fused
    conv.input_quantizer.set_progress(0.5)
    conv.weight_quantizer.set_progress(0.5)
    before = conv.weight.detach().clone()
    optimizer = torch.optim.SGD(conv.parameters(), lr=0.1)
    x = torch.randn(2, 4, 8, 8, requires_grad=True)
    conv(x).square().mean().backward()
    assert torch.isfinite(conv.weight.grad).all() and torch.isfinite(x.grad).all()
    assert conv.weight.grad.abs().sum() > 0 and x.grad.abs().sum() > 0
    optimizer.step()
    assert not torch.equal(conv.weight.detach(), before)
