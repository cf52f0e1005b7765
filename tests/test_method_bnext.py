"""BNext's quantizers against the official formulas (hpi-xnor/BNext, src/bnext.py `HardSign`,
`HardBinaryConv`; the curriculum `adjust_temperature` of src/train_assistant_group_amp.py),
written out here in float64: forward values and gradients at and around the clip bound, at
T = 1, 0.9^100 and below 1e-7; the temperature schedule through the stage loop's hook; the
latent-weight projection; what the export may pack."""
from types import SimpleNamespace

import pytest
import torch

from bnntrain.engine.hooks import QuantizerSchedule
from bnntrain.nn import BinaryConv2d
from bnntrain.nn.quantizers import INPUT_QUANTIZERS, WEIGHT_QUANTIZERS, build_quantizer

EDGES = [-2.0, -1.5 - 1e-12, -1.5, -1.5 + 1e-12, -1.0, -0.3, 1e-9, 0.3, 1.0, 1.5 - 1e-12, 1.5, 1.5 + 1e-12, 2.0]


class OldClamp(torch.autograd.Function):
    """torch.clamp as PyTorch computed it when BNext was trained (pytorch/pytorch#7049, 2018):
    the gradient passes at the bounds too. The PyTorch installed now gives 0 there."""

    @staticmethod
    def forward(ctx, x, low, high):
        ctx.save_for_backward(x)
        ctx.low, ctx.high = low, high
        return x.clamp(low, high)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * ((x >= ctx.low) & (x <= ctx.high)), None, None


def official_hard_sign(x, clamp=OldClamp.apply):
    """HardSign(range=[-1.5, 1.5]).forward, its temperature at 1."""
    replace = clamp(x, -1.5, 1.5)
    sign = x.div(torch.ones(1, dtype=x.dtype).clamp(min=1e-8)).clamp(-1, 1).sign()
    return (sign - replace).detach() + replace


def official_weight(w, temperature, training=True):
    """HardBinaryConv's binary weight (before the conv); the in-place clamp of w in training."""
    if training:
        w.data.clamp_(-1.5, 1.5)
    t = torch.tensor([temperature], dtype=w.dtype)
    binary = w.sign() if t < 1e-7 else (w / t.clamp(min=1e-8)).clamp(-1, 1)
    return binary.detach() - w.detach() + w if training else binary


def edges(*extra):
    x = torch.tensor(EDGES + list(extra), dtype=torch.float64)
    return torch.cat([x, torch.randn(200, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 1.5])


def value_and_grad(fn, x, g):
    x = x.clone().requires_grad_(True)
    y = fn(x)
    y.backward(g)
    return y.detach(), x.grad


def test_ste_sign_at_1_5_is_the_official_hard_sign_at_and_around_the_clip_bound():
    x, g = edges(), torch.randn(213, dtype=torch.float64)
    ours = value_and_grad(build_quantizer(INPUT_QUANTIZERS, {"name": "ste_sign", "clip_value": 1.5}), x, g)
    theirs = value_and_grad(official_hard_sign, x, g)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    inside = [bool(v) for v in ours[1][:13] != 0]  # both ends of [-1.5, 1.5] pass the gradient
    assert inside == [False, False, True, True, True, True, True, True, True, True, True, False, False]
    off_bounds = x.abs() != 1.5  # there the code's formula, run by today's torch.clamp, agrees too
    today = value_and_grad(lambda v: official_hard_sign(v, torch.clamp), x, g)
    torch.testing.assert_close(ours[1][off_bounds], today[1][off_bounds], rtol=0, atol=0)


def test_ste_signs_clip_value_is_an_argument_and_fuses_with_the_conv():
    q = build_quantizer(INPUT_QUANTIZERS, {"name": "ste_sign", "clip_value": 1.0})
    assert q.config() == {"name": "ste_sign", "clip_value": 1.0} and q.fused == "mask" and q.packable
    x = torch.tensor([-1.0, -1.0 - 1e-6, 1.0], requires_grad=True)
    q(x).sum().backward()
    assert x.grad.tolist() == [1.0, 0.0, 1.0]  # ste_sign's |x| < 1 would stop it at +-1


@pytest.mark.parametrize("temperature", [1.0, 0.9 ** 100, 0.9 ** 153, 1e-8])
@pytest.mark.parametrize("training", [True, False])
def test_bnext_weight_is_the_official_one(temperature, training):
    q = build_quantizer(WEIGHT_QUANTIZERS, "bnext_weight").double().train(training)
    q.temperature.fill_(temperature)
    soft_edges = [temperature * f for f in (-1.0, -1 - 1e-9, -1 + 1e-9, 1.0, 0.5)]
    w = edges(*soft_edges).clamp(-1.5, 1.5)  # latent weights as projected (the code clamps them itself)
    g = torch.randn(len(w), dtype=torch.float64)
    ours = value_and_grad(q, w, g)
    theirs = value_and_grad(lambda v: official_weight(v, temperature, training), w, g)
    torch.testing.assert_close(ours[0], theirs[0], rtol=0, atol=1e-12)
    if training:  # (the code's evaluation forward has the soft clamp's gradient; nothing uses it)
        torch.testing.assert_close(ours[1], theirs[1], rtol=0, atol=1e-12)
    assert torch.equal(ours[1], g)  # the identity gradient, clip bound or not
    hard = temperature < 1e-7
    assert q.packable == hard and torch.equal(ours[0].abs() == 1, torch.ones_like(w, dtype=torch.bool)) == hard


def test_the_latent_weights_are_projected_as_the_code_clamps_them():
    q = build_quantizer(WEIGHT_QUANTIZERS, "bnext_weight")
    w = torch.tensor([-3.0, -1.5, -0.2, 1.49, 1.51, 7.0])
    official = w.clone()
    official.data.clamp_(-1.5, 1.5)
    q.project_(w)
    assert torch.equal(w, official) and w.tolist()[-2:] == [1.5, 1.5]
    assert q.projects_weights and build_quantizer(WEIGHT_QUANTIZERS, {"name": "bnext_weight", "clip": 1.0}).clip == 1.0


def official_temperatures(epochs):
    """The code's buffer during each epoch: 1, then x0.9 after every epoch (float32)."""
    t, seen = torch.ones(1), []
    for epoch in range(epochs):
        seen.append(t.item())
        t.mul_(0.9)
    return seen


def test_the_stage_loop_sets_the_curriculum_temperature_bit_for_bit():
    conv = BinaryConv2d(2, 2, 3, input_quantizer={"name": "ste_sign", "clip_value": 1.5}, weight_quantizer="bnext_weight")
    q = conv.weight_quantizer
    run = SimpleNamespace(parts=SimpleNamespace(model=conv, optimizer=torch.optim.SGD(conv.parameters(), lr=0.1)),
                          epochs=160)
    hook = QuantizerSchedule()
    hook.before_stage(run)
    assert hook.by_epoch == [q]
    official = official_temperatures(160)
    for epoch in (0, 1, 152, 153, 100, 0):  # and back: the epoch alone sets it (a resume)
        hook.before_epoch(run, epoch)
        assert q.temperature.item() == official[epoch], epoch
        assert q.packable == (epoch >= 153)
    hook.before_epoch(run, 152)
    assert q.temperature.item() == pytest.approx(0.9 ** 152, rel=1e-5) and q.temperature.item() > 1e-7
    w = torch.randn(2, 2, 3, 3) * 1e-7
    assert (q(w).abs() < 1).any()  # epoch 152: still soft
    hook.before_epoch(run, 153)
    assert torch.equal(q(w), torch.where(w >= 0, 1.0, -1.0))  # epoch 153: sign(w)


def test_the_temperature_is_in_the_state_dict_and_the_values_follow_the_phase():
    conv = BinaryConv2d(2, 2, 1, input_quantizer={"name": "ste_sign", "clip_value": 1.5}, weight_quantizer="bnext_weight")
    assert conv.state_dict()["weight_quantizer.temperature"].tolist() == [1.0]
    w = torch.tensor([[-2.0, -0.25], [0.5, 0.0]])
    q = conv.weight_quantizer
    assert q.values(w).squeeze(-1).tolist() == [[-1.0, -0.25], [0.5, 0.0]]  # soft: each weight's own
    q.set_epoch(153)
    assert q.values(w).tolist() == [-1.0, 1.0]
    again = BinaryConv2d(2, 2, 1, input_quantizer={"name": "ste_sign", "clip_value": 1.5}, weight_quantizer="bnext_weight")
    again.load_state_dict(conv.state_dict())
    assert again.weight_quantizer.packable  # the checkpoint carries the phase
