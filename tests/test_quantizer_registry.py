"""What every registered quantizer promises, checked by looping over both registries: a new
one is covered the moment it is registered. Its own formulas are pinned in test_quantizers.py."""
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from bnntrain.nn import BinaryConv2d, BinaryLinear
from bnntrain.nn.quantizers import INPUT_QUANTIZERS, WEIGHT_QUANTIZERS, Quantizer, build_quantizer
from bnntrain.nn.quantizers.estimators import MaskedSignEstimator

REGISTRIES = {"input": INPUT_QUANTIZERS, "weight": WEIGHT_QUANTIZERS}
EVERY = [(kind, name) for kind, registry in REGISTRIES.items() for name in registry.names()]


def edgy(*shape, dtype=torch.float32):
    """Values on both sides of and at the edges estimators clip at (0, +-1), -0.0 included."""
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0), dtype=dtype) * 1.5
    x.view(-1)[:5] = torch.tensor([0.0, -0.0, 1.0, -1.0, 0.999], dtype=dtype)
    return x


@pytest.mark.parametrize("kind, name", EVERY)
def test_forward_values_lie_in_the_declared_set(kind, name):
    q = build_quantizer(REGISTRIES[kind], name)
    w = edgy(6, 4, 3, 3)
    y = q(w)
    assert (y.unsqueeze(-1) == q.values(w)).any(-1).all()
    if q.packable and kind == "input":  # an input's sign keeps the sign bit (+1 at 0, -1 at -0.0)
        assert torch.equal(torch.signbit(y), torch.signbit(w))


@pytest.mark.parametrize("kind, name", EVERY)
def test_config_round_trip(kind, name):
    """name and arguments from a config -> object -> the same config, and the same object."""
    registry = REGISTRIES[kind]
    q = build_quantizer(registry, {"name": name})
    config = q.config()
    assert config["name"] == name
    again = build_quantizer(registry, config)
    assert type(again) is type(q) and again.config() == config
    assert build_quantizer(registry, q) is q  # an object stands for itself
    q.set_progress(0.5)  # every quantizer takes the training loop's schedule call


def test_config_round_trip_keeps_arguments():
    q = build_quantizer(INPUT_QUANTIZERS, {"name": "swish_sign", "beta": 3.0})
    assert q.config() == {"name": "swish_sign", "beta": 3.0}
    w = build_quantizer(WEIGHT_QUANTIZERS, {"name": "scaled_sign", "gradient": "unscaled"})
    assert build_quantizer(WEIGHT_QUANTIZERS, w.config()).config() == {"name": "scaled_sign", "gradient": "unscaled"}


def conv_gradients(conv, x, g, fused):
    conv.fused_sign = fused
    conv.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    y = conv(x)
    y.backward(g)
    return y.detach(), x.grad, conv.weight.grad, conv.threshold.grad


def reference_gradients(conv, x, g):
    """The quantizers as plain modules, then F.conv2d: what the layer must compute."""
    conv.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    y = F.conv2d(conv.input_quantizer(x + conv.threshold), conv.weight_quantizer(conv.weight), conv.bias,
                 conv.stride, conv.padding, conv.dilation, conv.groups)
    y.backward(g)
    return y.detach(), x.grad, conv.weight.grad, conv.threshold.grad


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("weight", WEIGHT_QUANTIZERS.names())
@pytest.mark.parametrize("name", INPUT_QUANTIZERS.names())
def test_fused_and_unfused_binary_conv_give_the_quantizers_gradients(name, weight, dtype):
    torch.manual_seed(0)
    conv = BinaryConv2d(4, 6, 3, stride=2, padding=1, bias=True, learnable_threshold=True,
                        input_quantizer=name, weight_quantizer=weight).to(dtype)
    x = edgy(2, 4, 7, 7, dtype=dtype)
    g = torch.randn(2, 6, 4, 4, dtype=dtype)
    tol = {"rtol": 0, "atol": 1e-12 if dtype == torch.float64 else 1e-5}
    reference = reference_gradients(conv, x, g)
    for fused in (True, False):
        for got, want in zip(conv_gradients(conv, x, g, fused), reference):
            torch.testing.assert_close(got, want, **tol)


class HalfSlopeSign(Quantizer):
    """A sign with a gradient no registered estimator has (g / 2 everywhere) and no fused form."""

    name = "half_slope_sign"

    class _Function(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return torch.where(x >= 0, 1.0, -1.0).to(x.dtype)

        @staticmethod
        def backward(ctx, grad):
            return grad / 2

    def values(self, x):
        return torch.tensor([-1.0, 1.0], dtype=x.dtype)

    def forward(self, x):
        return self._Function.apply(x)


class WideSte(MaskedSignEstimator):
    """A straight-through sign whose gradient passes where |x| < 4, fused by its mask."""

    name = "wide_ste"

    def mask(self, x):
        return x.abs() < 4


@pytest.mark.parametrize("layer", ["conv", "linear"])
@pytest.mark.parametrize("quantizer", [HalfSlopeSign, WideSte])
def test_a_quantizer_given_as_an_object_trains_with_its_own_gradient(quantizer, layer):
    """Not registered, fused by its own mask or (without a fused form) not fused: never with
    the |x| < 1 straight-through gradient of the fused step."""
    q = quantizer()
    module = (BinaryConv2d(3, 4, 3, padding=1, input_quantizer=q) if layer == "conv"
              else BinaryLinear(3, 4, input_quantizer=q))
    assert module.input_quantizer is q
    x = torch.full((2, 3, 5, 5) if layer == "conv" else (2, 3), 3.0, requires_grad=True)  # |x| > 1: STE gives 0
    module(x).sum().backward()
    reference = x.detach().clone().requires_grad_(True)
    weight = module.quantized_weight().detach()
    out = F.conv2d(q(reference), weight, padding=1) if layer == "conv" else F.linear(q(reference), weight, module.bias)
    out.sum().backward()
    assert (x.grad != 0).all()
    torch.testing.assert_close(x.grad, reference.grad)


@pytest.mark.parametrize("kind, name", EVERY)
def test_a_packable_quantizer_is_what_the_export_computes(kind, name):
    """`packable` promises the export's form: the input's sign as the inference layer computes
    it, or sign(w) times one magnitude per output channel."""
    from bnntrain.tools.export.inference import compare_sign

    q = build_quantizer(REGISTRIES[kind], name)
    if not q.packable:
        pytest.skip(f"{name} is refused by the export (test_an_unpackable_quantizer_is_refused_by_the_export)")
    x = edgy(6, 4, 3, 3, dtype=torch.float64)
    x[x == 0] = 0.0  # -0.0 is -1 in training and +1 at inference (x >= 0): a known float edge, not a method's
    y = q(x)
    if kind == "input":
        assert torch.equal(y, compare_sign(x))
    else:  # the export keeps sign(y) and one |y| per output channel, whatever w's signs were
        magnitude = y.abs().flatten(1)
        assert torch.equal(magnitude, magnitude[:, :1].expand_as(magnitude))
        assert (magnitude > 0).all()


def test_an_unpackable_quantizer_is_refused_by_the_export():
    """A quantizer whose values are not +-1 (here 0 and 1) stops the export in one line naming
    the layer: the packed network would compute something else."""
    from bnntrain.errors import UserError
    from bnntrain.tools.export.inference import to_inference

    class ZeroOne(MaskedSignEstimator):
        name = "zero_one"
        packable = False

        def forward(self, x):
            return (super().forward(x) + 1) / 2

        def mask(self, x):
            return x.abs() < 1

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), BinaryConv2d(4, 4, 3, input_quantizer=ZeroOne()))
    with pytest.raises(UserError, match=r"^1 binarizes its input with zero_one, whose values are not \+-1"):
        to_inference(model)
    assert type(model[1]) is BinaryConv2d  # nothing replaced


def test_a_precision_mode_or_an_unknown_argument_is_refused_with_what_is_expected():
    with pytest.raises(ValueError, match="precision mode, which the stage sets"):
        BinaryConv2d(3, 4, 3, input_quantizer="clamp")
    with pytest.raises(ValueError, match="model.input_quantizer=ste_sign takes clip_value; got beta"):
        build_quantizer(INPUT_QUANTIZERS, {"name": "ste_sign", "beta": 2.0})
    with pytest.raises(ValueError, match="model.weight_quantizer.gradient 'both'; expected one of: scaled, unscaled"):
        build_quantizer(WEIGHT_QUANTIZERS, {"name": "scaled_sign", "gradient": "both"})


DISCOVERY = """
import importlib, pkgutil
from bnntrain.nn.quantizers import INPUT_QUANTIZERS, WEIGHT_QUANTIZERS
from bnntrain.models import MODELS
registries = {"bnntrain.nn.quantizers": (INPUT_QUANTIZERS, WEIGHT_QUANTIZERS), "bnntrain.models": (MODELS,)}
found = [r.names() for rs in registries.values() for r in rs]  # what a lookup sees by itself
for package in registries:
    for module in pkgutil.iter_modules(importlib.import_module(package).__path__):
        importlib.import_module(f"{package}.{module.name}")
print(found == [r.names() for rs in registries.values() for r in rs], found)
"""


def test_a_registry_finds_every_entry_of_its_package_by_itself():
    """A new quantizer or network is one file: the registry imports its package's modules
    before the first lookup, so nothing else has to import the file (a fresh process, as a
    run starts)."""
    out = subprocess.run([sys.executable, "-c", DISCOVERY], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    same, found = out.stdout.split(" ", 1)
    assert same == "True", found
    assert "approx_sign" in found and "scaled_sign" in found and "reactnet_a" in found


def test_an_inherited_argument_the_quantizer_does_not_take_is_dropped_only_when_null():
    """A preset naming another quantizer sets the `gradient` it inherits from _base.yaml's
    scaled_sign to null; a null the class does take stays null (larq's clip_value=None)."""
    assert build_quantizer(WEIGHT_QUANTIZERS, {"name": "recu", "gradient": None}).config()["name"] == "recu"
    with pytest.raises(ValueError, match="recu takes tau_min, tau_max; got gradient"):
        build_quantizer(WEIGHT_QUANTIZERS, {"name": "recu", "gradient": "scaled"})
    assert build_quantizer(INPUT_QUANTIZERS, {"name": "ste_heaviside", "clip_value": None}).clip_value is None
