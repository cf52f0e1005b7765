"""XNOR-Net against the authors' Torch code (allenai/XNOR-Net: newLayers/BinActiveZ.lua,
util.lua) and the paper's K; XNOR-Net++ against BiBench's layer
(bibench/models/layers/xnorplusplus.py). Each written out here in float64."""
import pytest
import torch
import torch.nn.functional as F

from bnntrain.errors import UserError
from bnntrain.nn import BinaryConv2d, BinaryLinear
from bnntrain.nn.quantizers import INPUT_QUANTIZERS, WEIGHT_QUANTIZERS, build_quantizer
from bnntrain.tools.export.inference import to_inference

TOL = {"rtol": 0, "atol": 1e-12}
EDGES = [0.0, 1.0, -1.0, 0.999, -0.999, 1.001, -1.001]


def edgy(*shape, seed=0):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 1.2
    x.view(-1)[:len(EDGES)] = torch.tensor(EDGES, dtype=torch.float64)
    return x


def signs(x):
    return torch.where(x >= 0, 1.0, -1.0).to(x.dtype)


def grad_of(fn, x, g):
    x = x.clone().requires_grad_(True)
    y = fn(x)
    (y * g).sum().backward()
    return y.detach(), x.grad


def code_binactivez_grad(x, g):
    """BinActiveZ:updateGradInput: g, zeroed where input >= 1 or input <= -1."""
    grad = g.clone()
    grad[x.ge(1)] = 0
    grad[x.le(-1)] = 0
    return grad


def code_weight_grad(w, g):
    """util.lua updateBinaryGradWeight (Adam: no * n): m = alpha, 0 where w <= -1 or w >= 1,
    + 1/n, * (1 - 1/C); the gradient is g * m."""
    n = w[0].numel()
    m = w.abs().sum(3, keepdim=True).sum(2, keepdim=True).sum(1, keepdim=True).div(n).expand_as(w).clone()
    m[w.le(-1)] = 0
    m[w.ge(1)] = 0
    m = (m + 1 / n) * (1 - 1 / w.shape[1])
    return g * m


def test_xnor_sign_is_binactivez():
    x, g = edgy(2, 4, 5, 5), edgy(2, 4, 5, 5, seed=1)
    y, grad = grad_of(build_quantizer(INPUT_QUANTIZERS, "xnor_sign"), x, g)
    assert torch.equal(y, signs(x))
    torch.testing.assert_close(grad, code_binactivez_grad(x, g), **TOL)
    assert grad.view(-1)[1] == 0 and grad.view(-1)[3] == g.view(-1)[3]  # 0 at |x| = 1, g at 0.999


@pytest.mark.parametrize("gradient", ["code", "paper"])
def test_xnor_weight_forward_and_gradient(gradient):
    w, g = edgy(6, 4, 3, 3), edgy(6, 4, 3, 3, seed=1)
    q = build_quantizer(WEIGHT_QUANTIZERS, {"name": "xnor_weight", "gradient": gradient})
    y, grad = grad_of(q, w, g)
    alpha = w.abs().mean((1, 2, 3), keepdim=True)  # binarizeConvParms: norm(1) summed, / n
    torch.testing.assert_close(y, signs(w) * alpha, **TOL)
    if gradient == "code":
        want = code_weight_grad(w, g)
    else:  # the paper's dC/dW = dC/dW~ (1/n + alpha 1{|w| <= 1})
        want = g * (1 / 36 + alpha * (w.abs() <= 1))
    torch.testing.assert_close(grad, want, **TOL)
    assert (want.view(-1)[1] == g.view(-1)[1] / 36 * 0.75) == (gradient == "code")  # |w| = 1: only the 1/n term


def test_xnor_weight_projection_is_the_codes_mean_centring_and_clamp():
    w = edgy(6, 4, 3, 3) * 2
    want = (w - w.mean(1, keepdim=True).repeat(1, 4, 1, 1)).clamp(-1, 1)  # meancenterConvParms, clampConvParms
    got = w.clone()
    build_quantizer(WEIGHT_QUANTIZERS, "xnor_weight").project_(got)
    torch.testing.assert_close(got, want, **TOL)
    assert (got.abs() == 1).any()


def paper_k(x, kernel, stride, padding):
    """The paper's K: A = sum_c |x| / c, K = A * k with k the k x k box of 1 / (k k)."""
    a = x.abs().sum(1, keepdim=True) / x.shape[1]
    return F.avg_pool2d(a, kernel, stride, padding, count_include_pad=True)


@pytest.mark.parametrize("stride, padding", [(1, 1), (2, 0)])
def test_xnor_sign_with_k_scales_the_conv_output_before_the_bias(stride, padding):
    torch.manual_seed(0)
    conv = BinaryConv2d(4, 6, 3, stride=stride, padding=padding, bias=True, learnable_threshold=True,
                        input_quantizer={"name": "xnor_sign", "scale": "box"}, weight_quantizer="xnor_weight").double()
    with torch.no_grad():
        conv.bias.normal_()
        conv.threshold.normal_()
    x = edgy(2, 4, 9, 9)
    for fused in (True, False):
        conv.fused_sign = fused
        conv.zero_grad()
        xg = x.clone().requires_grad_(True)
        out = conv(xg)
        g = edgy(*out.shape, seed=2)
        (out * g).sum().backward()
        shifted = x + conv.threshold.detach()
        k = paper_k(shifted, 3, stride, padding)
        weight = conv.weight.detach().clone().requires_grad_(True)
        w_b = signs(weight) * weight.abs().mean((1, 2, 3), keepdim=True)
        want = F.conv2d(signs(shifted), w_b, None, stride, padding) * k + conv.bias.view(1, -1, 1, 1)
        torch.testing.assert_close(out, want, rtol=0, atol=1e-10)
        # K is a constant: the input's gradient is BinActiveZ's of (g K) through the conv
        upstream = torch.nn.grad.conv2d_input(x.shape, w_b.detach(), g * k, stride, padding)
        torch.testing.assert_close(xg.grad, code_binactivez_grad(shifted, upstream), rtol=0, atol=1e-10)
        assert k.std() > 0.01  # K differs across positions and samples


def test_xnor_sign_with_k_on_a_linear_layer_is_the_mean_per_sample():
    layer = BinaryLinear(8, 3, bias=False, input_quantizer={"name": "xnor_sign", "scale": "box"},
                         weight_quantizer="xnor_weight").double()
    x = edgy(4, 8)
    want = F.linear(signs(x), layer.quantized_weight().detach()) * x.abs().mean(1, keepdim=True)
    torch.testing.assert_close(layer(x), want, **TOL)


def test_k_is_refused_by_the_export_and_no_k_exported_exactly():
    k = build_quantizer(INPUT_QUANTIZERS, {"name": "xnor_sign", "scale": "box"})
    assert not k.packable and k.config() == {"name": "xnor_sign", "scale": "box"}
    assert build_quantizer(INPUT_QUANTIZERS, k.config()).config() == k.config()
    model = torch.nn.Sequential(BinaryConv2d(4, 4, 3, input_quantizer=k, weight_quantizer="xnor_weight"))
    with pytest.raises(UserError, match="binarizes its input with xnor_sign"):
        to_inference(model)
    model = torch.nn.Sequential(BinaryConv2d(4, 4, 3, input_quantizer="xnor_sign", weight_quantizer="xnor_weight"))
    x = edgy(2, 4, 6, 6).float()
    want = model(x)
    to_inference(model)
    torch.testing.assert_close(model(x), want, rtol=0, atol=1e-5)


def clamp_ste(t):
    """BiBench: sign(t).detach() - clamp(t).detach() + clamp(t) (sign(0) = +1 here)."""
    clipped = torch.clamp(t, -1.0, 1.0)
    return signs(t).detach() - clipped.detach() + clipped


def test_xnor_plus_plus_is_bibenchs_layer():
    """BinaryConv2d(ste_sign, xnor_plus_plus) = XNORPlusPlusConv2d: conv(sign x, sign w) *
    o_scale * h_scale * w_scale, with every gradient (x, w and the three factors)."""
    torch.manual_seed(0)
    conv = BinaryConv2d(4, 6, 3, stride=2, padding=1, input_quantizer="ste_sign",
                        weight_quantizer="xnor_plus_plus").double()
    q = conv.weight_quantizer
    assert q.alpha.shape == (6, 1, 1, 1) and q.beta.shape == q.gamma.shape == (2000,)
    with torch.no_grad():  # away from BiBench's initial ones, so a missing factor shows
        for p in (q.alpha, q.beta, q.gamma):
            p.uniform_(0.5, 1.5)
        conv.weight.copy_(edgy(6, 4, 3, 3))
    x = edgy(2, 4, 9, 11, seed=1)
    xg = x.clone().requires_grad_(True)
    out = conv(xg)
    g = edgy(*out.shape, seed=2)
    (out * g).sum().backward()
    ref = {name: p.detach().clone().requires_grad_(True) for name, p in
           (("w", conv.weight), ("o", q.alpha.view(1, 6, 1, 1)), ("h", q.beta.view(1, 1, -1, 1)),
            ("wd", q.gamma.view(1, 1, 1, -1)))}
    xr = x.clone().requires_grad_(True)
    y = F.conv2d(clamp_ste(xr), clamp_ste(ref["w"]), stride=2, padding=1)
    y = y * ref["o"] * ref["h"][:, :, :y.shape[2], :] * ref["wd"][:, :, :, :y.shape[3]]
    (y * g).sum().backward()
    tol = {"rtol": 0, "atol": 1e-10}
    torch.testing.assert_close(out, y, **tol)
    torch.testing.assert_close(xg.grad, xr.grad, **tol)
    torch.testing.assert_close(conv.weight.grad, ref["w"].grad, **tol)
    torch.testing.assert_close(q.alpha.grad.view(1, 6, 1, 1), ref["o"].grad, **tol)
    torch.testing.assert_close(q.beta.grad.view(1, 1, -1, 1), ref["h"].grad, **tol)
    torch.testing.assert_close(q.gamma.grad.view(1, 1, 1, -1), ref["wd"].grad, **tol)
    assert q.beta.grad[5:].abs().sum() == 0 and q.beta.grad[:5].abs().min() > 0  # a 5 x 6 output


def test_xnor_plus_plus_weight_gradient_at_the_clip_points():
    q = build_quantizer(WEIGHT_QUANTIZERS, {"name": "xnor_plus_plus", "factors": "channel"}).double()
    w, g = edgy(6, 4, 3, 3), edgy(6, 4, 3, 3, seed=1)
    y, grad = grad_of(q, w, g)
    wr = w.clone().requires_grad_(True)
    (clamp_ste(wr) * g).sum().backward()  # alpha = 1 at first, as BiBench's ones
    torch.testing.assert_close(y, signs(w), **TOL)
    torch.testing.assert_close(grad, wr.grad, **TOL)
    assert grad.view(-1)[1] == 0 and grad.view(-1)[3] == g.view(-1)[3]


def test_xnor_plus_plus_per_channel_is_exported_exactly_and_the_spatial_case_refused():
    conv = BinaryConv2d(4, 5, 3, padding=1, input_quantizer="ste_sign",
                        weight_quantizer={"name": "xnor_plus_plus", "factors": "channel"})
    assert conv.weight_quantizer.beta is None and conv.weight_quantizer.packable
    with torch.no_grad():
        conv.weight_quantizer.alpha.copy_(torch.tensor([0.5, -1.5, 2.0, 0.25, 1.0]).view(5, 1, 1, 1))
    model = torch.nn.Sequential(conv).eval()
    x = edgy(2, 4, 6, 6).float()
    want = model(x)
    to_inference(model)
    torch.testing.assert_close(model(x), want, rtol=0, atol=1e-5)
    spatial = torch.nn.Sequential(BinaryConv2d(4, 4, 3, weight_quantizer="xnor_plus_plus"))
    with pytest.raises(UserError, match="binarizes its weight with xnor_plus_plus"):
        to_inference(spatial)


def test_xnor_config_round_trips_and_refusals():
    for spec in ({"name": "xnor_weight", "gradient": "paper"},
                 {"name": "xnor_plus_plus", "factors": "channel", "max_size": 64}):
        q = build_quantizer(WEIGHT_QUANTIZERS, spec)
        assert q.config() == spec and build_quantizer(WEIGHT_QUANTIZERS, q.config()).config() == spec
    with pytest.raises(ValueError, match="model.weight_quantizer.factors"):
        build_quantizer(WEIGHT_QUANTIZERS, {"name": "xnor_plus_plus", "factors": "height"})
    with pytest.raises(ValueError, match="model.input_quantizer.scale"):
        build_quantizer(INPUT_QUANTIZERS, {"name": "xnor_sign", "scale": "gaussian"})
    small = BinaryConv2d(3, 4, 3, weight_quantizer={"name": "xnor_plus_plus", "max_size": 4})
    with pytest.raises(ValueError, match="an output of 6x6 is larger than max_size=4"):
        small(torch.randn(1, 3, 8, 8))
    shared = build_quantizer(WEIGHT_QUANTIZERS, "xnor_plus_plus")
    BinaryConv2d(3, 4, 3, weight_quantizer=shared)
    with pytest.raises(ValueError, match="belongs to a layer already"):
        BinaryConv2d(3, 4, 3, weight_quantizer=shared)


@pytest.mark.parametrize("input_quantizer, weight_quantizer, learned_count", [
    ({"name": "xnor_sign", "scale": "box"}, "xnor_weight", 0),
    ("ste_sign", "xnor_plus_plus", 3),  # alpha, beta, gamma
    ("ste_sign", {"name": "xnor_plus_plus", "factors": "channel"}, 1),
])
def test_a_binary_conv_trains_one_step(input_quantizer, weight_quantizer, learned_count):
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8),
        BinaryConv2d(8, 8, 3, padding=1, input_quantizer=input_quantizer, weight_quantizer=weight_quantizer),
        torch.nn.BatchNorm2d(8), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 4))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    loss = F.cross_entropy(model(torch.randn(4, 3, 8, 8)), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    optimizer.step()
    learned = [name for name in before if name.startswith("2.weight_quantizer.")]
    assert len(learned) == learned_count
    assert all(not torch.equal(before[n], model.get_parameter(n)) for n in learned + ["2.weight"])
