"""Each quantizer's forward and backward against its formula, including |x| = 1 and x = 0."""
import math

import pytest
import torch

from bnntrain.nn.quantizers import (INPUT_QUANTIZERS, PRECISION_MODES, WEIGHT_QUANTIZERS, build_quantizer, clamp,
                                    leaky_clip)

X = torch.tensor([-2.0, -1.0, -0.999, -0.5, 0.0, 0.5, 0.999, 1.0, 2.0])


def estimator(name, **args):
    return build_quantizer(INPUT_QUANTIZERS, {"name": name, **args})


def binarizer(name, **args):
    return build_quantizer(WEIGHT_QUANTIZERS, {"name": name, **args})


def grad_of(fn, x):
    x = x.clone().requires_grad_(True)
    y = fn(x)
    y.backward(torch.ones_like(y))
    return y.detach(), x.grad


@pytest.mark.parametrize("name", [n for n in INPUT_QUANTIZERS.names() if INPUT_QUANTIZERS.get(n).packable])
def test_binary_forward_is_sign_with_plus_one_at_zero(name):
    y, _ = grad_of(estimator(name), X)
    assert torch.equal(y, torch.where(X >= 0, 1.0, -1.0))
    assert y[X == 0].item() == 1.0


def test_ste_sign_backward_passes_gradient_inside_unit_interval_only():
    _, g = grad_of(estimator("ste_sign"), X)
    assert torch.equal(g, (X.abs() < 1).float())  # |x| = 1 gets 0


def test_approx_sign_backward():
    _, g = grad_of(estimator("approx_sign"), X)
    expected = torch.where(X.abs() < 1, 2 - 2 * X.abs(), torch.zeros_like(X))
    assert torch.allclose(g, expected)
    assert g[X == 0].item() == 2.0 and g[X == 1].item() == 0.0


@pytest.mark.parametrize("beta", [5.0, 2.0])
def test_swish_sign_backward(beta):
    _, g = grad_of(estimator("swish_sign", beta=beta), X)
    expected = [beta * (2 - beta * x * math.tanh(beta * x / 2)) / (1 + math.cosh(beta * x)) for x in X.tolist()]
    assert torch.allclose(g, torch.tensor(expected), atol=1e-6)
    assert g[X == 0].item() == pytest.approx(beta)  # the peak: beta * 2 / 2


def test_identity_passes_everything():
    y, g = grad_of(PRECISION_MODES["real"], X)
    assert torch.equal(y, X) and torch.equal(g, torch.ones_like(X))


def test_ste_sign_saves_a_boolean_mask_not_the_input():
    saved = []
    x = torch.randn(4, 8, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        estimator("ste_sign")(x * 1.0)
    assert [t.dtype for t in saved] == [torch.bool]


def test_weight_binarizer_clipped_ste_and_per_channel_scale():
    w = torch.tensor([[[[-2.0, 1.0]], [[0.0, -0.5]]], [[[0.25, -0.25]], [[3.0, 0.0]]]], requires_grad=True)
    b = binarizer("sign")(w)
    assert torch.equal(b, torch.where(w >= 0, 1.0, -1.0))
    b.sum().backward()
    assert torch.equal(w.grad, (w.abs() <= 1).float())  # |w| = 1 passes for weights
    w.grad = None
    scaled = binarizer("scaled_sign")(w)
    alpha = w.detach().abs().mean(dim=(1, 2, 3), keepdim=True)
    assert torch.allclose(scaled, torch.where(w >= 0, 1.0, -1.0) * alpha)
    scaled.sum().backward()  # the scale is detached: the gradient is alpha * STE
    assert torch.allclose(w.grad, alpha.expand_as(w) * (w.abs() <= 1).float())


def test_pretraining_activations():
    assert torch.allclose(leaky_clip(X), torch.where(X.abs() <= 1, X, 0.1 * X + 0.9 * torch.sign(X)))
    assert leaky_clip(torch.tensor([3.0])).item() == pytest.approx(1.2)
    assert torch.equal(clamp(X), X.clamp(-1, 1))


@pytest.mark.parametrize("groups, bias, stride", [(1, False, 1), (2, True, 2)])
def test_fused_sign_conv_equals_sign_then_conv(groups, bias, stride):
    """The fused step (one uint8 saved per input) gives exactly the unfused gradients."""
    from bnntrain.nn import BinaryConv2d

    torch.manual_seed(0)
    conv = BinaryConv2d(4, 6, 3, stride=stride, padding=1, groups=groups, bias=bias, learnable_threshold=True)
    conv.set_precision("binary", "binary")
    x = torch.randn(2, 4, 7, 7) * 1.5
    x[0, 0, 0, :3] = torch.tensor([0.0, 1.0, -1.0])  # the edges
    x.requires_grad_(True)
    y = conv(x)
    g = torch.randn_like(y)
    y.backward(g)
    fused = (y.detach(), x.grad.clone(), conv.weight.grad.clone(), conv.threshold.grad.clone())
    x.grad = conv.weight.grad = conv.threshold.grad = None
    ref = torch.nn.functional.conv2d(estimator("ste_sign")(x + conv.threshold), conv.quantized_weight(), conv.bias,
                                     conv.stride, conv.padding, 1, groups)
    ref.backward(g)
    for a, b in zip(fused, (ref.detach(), x.grad, conv.weight.grad, conv.threshold.grad)):
        assert torch.allclose(a, b, atol=1e-6)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        conv(x.detach() * 1.0)
    assert torch.uint8 in [t.dtype for t in saved] and not any(t.shape == x.shape and t.is_floating_point()
                                                               for t in saved)


@pytest.mark.parametrize("quantizer, args, reference", [
    ("approx_sign", {}, lambda x: estimator("approx_sign")(x)),
    ("swish_sign", {"beta": 3.0}, lambda x: estimator("swish_sign", beta=3.0)(x))])
def test_fused_surrogate_sign_conv_equals_sign_then_conv(quantizer, args, reference):
    """ApproxSign and SignSwish fused with the conv: the same gradients, and x is all the
    step keeps of the input (not x and the +-1 tensor)."""
    from bnntrain.nn import BinaryConv2d

    torch.manual_seed(0)
    conv = BinaryConv2d(4, 6, 3, stride=2, padding=1, learnable_threshold=True,
                        input_quantizer={"name": quantizer, **args},
                        weight_quantizer={"name": "scaled_sign", "gradient": "unscaled"})
    conv.set_precision("binary", "binary")
    x = (torch.randn(2, 4, 7, 7) * 1.5).requires_grad_(True)
    y = conv(x)
    g = torch.randn_like(y)
    y.backward(g)
    fused = (y.detach(), x.grad.clone(), conv.weight.grad.clone(), conv.threshold.grad.clone())
    x.grad = conv.weight.grad = conv.threshold.grad = None
    ref = torch.nn.functional.conv2d(reference(x + conv.threshold), conv.quantized_weight(), None, 2, 1)
    ref.backward(g)
    for a, b in zip(fused, (ref.detach(), x.grad, conv.weight.grad, conv.threshold.grad)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        conv(x.detach() * 1.0)
    assert sum(t.shape == x.shape for t in saved) == 1  # x itself, no +-1 copy


def test_scaled_weight_binarizer_scales_each_output_channel_by_its_own_mean_abs():
    """alpha is the mean |w| of each output channel, not one mean over the layer: the two
    channels here have different means (0.5 and 2.0). Both gradients, written out."""
    w = torch.tensor([[[[-0.5, 0.25]], [[0.75, -0.5]]], [[[3.0, -1.0]], [[0.5, -3.5]]]], dtype=torch.float64)
    alpha = w.abs().mean(dim=(1, 2, 3), keepdim=True)
    assert alpha.flatten().tolist() == [0.5, 2.0]
    g = torch.arange(1.0, 9.0, dtype=torch.float64).reshape(w.shape)
    expected_grad = {"scaled": torch.where(w.abs() <= 1, alpha * g, 0.0),  # larq: d(alpha sign(w))
                     "unscaled": torch.where(w.abs() < 1, g, 0.0)}         # Bi-Real/ReActNet: d clamp(w)
    for gradient, expected in expected_grad.items():
        latent = w.clone().requires_grad_(True)
        out = binarizer("scaled_sign", gradient=gradient)(latent)
        torch.testing.assert_close(out.detach(), alpha * torch.sign(w), rtol=0, atol=0)
        out.backward(g)
        torch.testing.assert_close(latent.grad, expected, rtol=0, atol=0)
