"""The model family: every architectural trick on and off, each changing the module tree as it
claims; shapes, parameter counts."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bnntrain.engine import load_model_weights
from bnntrain.models import build_model
from bnntrain.nn import (BinaryBlock, BinaryConv2d, BinaryLinear, BlockOptions, TricksBottleneck, binary_layers,
                         set_precision)
from bnntrain.nn.blocks import ChannelAttention, RPReLU
from bnntrain.nn.maxout import Maxout
from bnntrain.nn.shortcuts import Repeat
from test_config import make


def model_from(*overrides, data="synthetic", num_classes=10, channels=3):
    cfg = make(f"data={data}", *overrides)
    return build_model(cfg.model, num_classes=num_classes, in_channels=channels)


TRICKS = {
    "collection block (default)": [],
    "single skip": ["model.skip=single"],
    "relu after the add": ["model.activation=relu"],
    "identity after the add": ["model.activation=identity"],
    "rprelu": ["model.activation=rprelu"],
    "maxout": ["model.activation=maxout"],
    "downsample v2": ["model.downsample=v2"],
    "downsample v3": ["model.downsample=v3"],
    "strided conv shortcut": ["model.downsample=conv"],
    "approx_sign": ["model.input_quantizer.name=approx_sign"],
    "swish_sign beta 3": ["model.input_quantizer.name=swish_sign", "+model.input_quantizer.beta=3.0"],
    "no weight scale": ["~model.weight_quantizer", "+model.weight_quantizer={name:sign}"],
    "rsign threshold": ["model.learnable_threshold=true"],
    "bn momentum 0.3": ["model.bn_momentum=0.3"],  # neither the preset's 0.2 nor PyTorch's 0.1
    "reordered stem pooling": ["model.stem=imagenet", "model.stem_pool_order=conv_pool_bn_act"],
    "squeeze-excitation": ["model.attention=se", "model.se_reduction=4"],
    "double width, groups 2": ["model.widen=2", "model.groups=2"],
    "treble width, groups 3": ["model.widen=3", "model.groups=3"],
    "binary stem and classifier": ["model.binary_stem=true", "model.binary_classifier=true"],
    "real-valued twin": ["model.binarize=false"],
    "birealnet18": ["model=birealnet18"],
    "reactnet18": ["model=reactnet18"],
    "resnet34": ["model=resnet34"],
    "resnet50": ["model=resnet50"],
    "bn after the conv": ["model.bn_position=after_conv"],
    "stem without activation": ["model.stem_activation=identity"],
    "parameter-free shortcut": ["model.downsample=pool"],
    "unscaled weight gradient": ["model.weight_quantizer.gradient=unscaled"],
    "bi-real init": ["model.binary_init=small_positive"],
    "birealnet34": ["model=birealnet34"],
    "reactnet_a": ["model=reactnet_a"],
    # The names before input_quantizer / weight_quantizer, still read:
    "old key: approx_sign": ["model.quantizer=approx_sign"],
    "old keys: swish_sign beta 3": ["model.quantizer=swish_sign", "+model.quantizer_args.beta=3.0"],
    "old key: no weight scale": ["model.weight_scale=false"],
    "old key: unscaled weight gradient": ["model.weight_gradient=unscaled"],
}


@pytest.mark.parametrize("trick", TRICKS)
def test_trick_trains_and_stage1_checkpoint_loads_into_stage2(trick):
    torch.manual_seed(0)
    stage1 = model_from("model.width=0.125", *TRICKS[trick])
    set_precision(stage1, "binary", "real")
    x, y = torch.randn(4, 3, 32, 32), torch.randint(10, (4,))
    opt = torch.optim.Adam(stage1.parameters(), 1e-3)
    loss = F.cross_entropy(stage1(x), y)
    loss.backward()
    assert all(p.grad is not None for p in stage1.parameters() if p.requires_grad), "a parameter gets no gradient"
    opt.step()
    stage2 = model_from("model.width=0.125", *TRICKS[trick])
    load_model_weights(stage2, stage1.state_dict(), "stage1")
    set_precision(stage2, "binary", "binary")
    out = stage2(x)
    assert out.shape == (4, 10) and torch.isfinite(out).all()


def block_options(**overrides):
    """The model group's block options (configs/model/_base.yaml), with `overrides`."""
    return BlockOptions.from_config(make().model, **overrides)


def blocks(model):
    return [m for m in model.modules() if isinstance(m, BinaryBlock)]


def binary_convs(model):
    return [m for m in model.modules() if isinstance(m, BinaryConv2d)]


def downsampling_shortcuts(model):
    return [[type(m) for m in b.shortcut] for b in blocks(model) if not isinstance(b.shortcut, nn.Identity)]


def batchnorms(model):
    return [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]


def assert_block_computes(block, activation, bn_first=True):
    """Per conv BN -> (sign ->) conv [x SE] (or (sign ->) conv -> BN where `bn_first` is
    false), then `activation` of the sum with the shortcut: the activation follows the addition."""
    block.eval()
    assert block.norm_first == bn_first
    with torch.no_grad():  # BN statistics that make its position matter (a fresh BN is the identity in eval)
        for bn in batchnorms(block):
            bn.weight.uniform_(0.5, 2), bn.bias.normal_(), bn.running_mean.normal_(), bn.running_var.uniform_(0.5, 2)
    x = torch.randn(2, block.convs[0].in_channels, 6, 6)
    with torch.no_grad():
        out = x
        for i, (norm, conv) in enumerate(zip(block.norms, block.convs)):
            real = norm(out) if bn_first else out
            out = conv(real) if bn_first else norm(conv(real))
            out = out * (block.attention[i](real) if block.attention is not None else 1)
        torch.testing.assert_close(block(x), activation(out + block.shortcut(x)), rtol=1e-6, atol=1e-6)


def prelu_of(block):
    return lambda t: F.prelu(t, block.act.weight)


# 1/8 width on the CIFAR stem: a 3x3 stem conv to 8 channels, stages of 8, 16, 32 and 64.
WIDTHS = [8, 16, 32, 64]


def check_collection_block(model):
    assert [len(stage) for stage in model.stages] == [4, 4, 4, 4]  # double skip: 2 blocks per basic block
    assert all(len(b.convs) == len(b.norms) == 1 for b in blocks(model))
    assert [c.out_channels for c in binary_convs(model)] == [w for w in WIDTHS for _ in range(4)]
    assert all(type(b.act) is nn.PReLU and b.act.num_parameters == b.convs[0].out_channels for b in blocks(model))
    assert_block_computes(blocks(model)[5], prelu_of(blocks(model)[5]))
    assert downsampling_shortcuts(model) == [[nn.Conv2d, nn.BatchNorm2d, nn.AvgPool2d]] * 3  # v1
    assert all(b.attention is None for b in blocks(model))
    assert all(c.groups == 1 and c.threshold is None and c.binarize
               and c.input_quantizer.config() == {"name": "ste_sign"}
               and c.weight_quantizer.config() == {"name": "scaled_sign", "gradient": "scaled"} for c in binary_convs(model))
    assert_sign_gradient(model, ste)
    assert all(b.norm_first and [n.num_features for n in b.norms] == [b.convs[0].in_channels] for b in blocks(model))
    assert len(batchnorms(model)) == 20 and all(bn.momentum == 0.2 for bn in batchnorms(model))  # trick 10's 0.2
    assert [type(m) for m in model.stem] == [nn.Conv2d, nn.BatchNorm2d, nn.ReLU]
    assert type(model.stem[0]) is nn.Conv2d and type(model.classifier) is nn.Linear  # real first and last layers


def check_single_skip(model):
    assert [len(stage) for stage in model.stages] == [2, 2, 2, 2]  # half the blocks...
    assert all(len(b.convs) == len(b.norms) == 2 for b in blocks(model))  # ...each with two convs
    assert len(binary_convs(model)) == 16
    assert [b.convs[1].stride for b in blocks(model)] == [(1, 1)] * 8
    assert [b.convs[0].stride[0] for b in blocks(model)] == [1, 1, 2, 1, 2, 1, 2, 1]
    assert downsampling_shortcuts(model) == [[nn.Conv2d, nn.BatchNorm2d, nn.AvgPool2d]] * 3
    assert_block_computes(blocks(model)[2], prelu_of(blocks(model)[2]))  # one shortcut around both convs


def check_relu(model):
    assert all(type(b.act) is nn.ReLU for b in blocks(model)) and not any(isinstance(m, nn.PReLU) for m in model.modules())
    for block in (blocks(model)[0], blocks(model)[4]):
        assert_block_computes(block, torch.relu)


def check_identity(model):
    assert all(type(b.act) is nn.Identity for b in blocks(model)) and not any(isinstance(m, nn.PReLU) for m in model.modules())
    assert_block_computes(blocks(model)[4], lambda t: t)


def check_maxout(model):
    for block in blocks(model):
        cout = block.convs[0].out_channels
        assert type(block.act) is Maxout and block.act.pos_scale.shape == block.act.neg_scale.shape == (cout,)
    block = blocks(model)[4]
    with torch.no_grad():
        block.act.pos_scale.uniform_(0.5, 2), block.act.neg_scale.uniform_(0.1, 1)
    act = block.act  # AdaBin's pos * relu(t) - neg * relu(-t), per channel
    shape = (1, -1, 1, 1)
    assert_block_computes(block, lambda t: act.pos_scale.view(shape) * F.relu(t) - act.neg_scale.view(shape) * F.relu(-t))


def check_rprelu(model):
    for block in blocks(model):
        cout = block.convs[0].out_channels
        assert type(block.act) is RPReLU and block.act.prelu.num_parameters == cout
        assert block.act.shift_in.shape == block.act.shift_out.shape == (1, cout, 1, 1)
    block = blocks(model)[4]
    with torch.no_grad():
        block.act.shift_in.normal_(), block.act.shift_out.normal_()
    act = block.act  # ReActNet's move1 -> PReLU -> move2, each move adding its shift
    assert_block_computes(block, lambda t: F.prelu(t + act.shift_in, act.prelu.weight) + act.shift_out)


def check_downsample(*types):
    def check(model):
        shortcuts = [b.shortcut for b in blocks(model) if not isinstance(b.shortcut, nn.Identity)]
        assert [[type(m) for m in s] for s in shortcuts] == [list(types)] * 3  # in this order
        assert [blocks(model).index(b) for b in blocks(model) if not isinstance(b.shortcut, nn.Identity)] == [4, 8, 12]
        for s in shortcuts:
            conv = next(m for m in s if isinstance(m, nn.Conv2d))
            assert conv.kernel_size == (1, 1) and type(conv) is nn.Conv2d  # real-valued 1x1
            pool = next((m for m in s if isinstance(m, nn.AvgPool2d)), None)
            if pool is None:  # conv: the 1x1 conv strides
                assert conv.stride == (2, 2)
            else:  # v2: 2x2 pool first; v3: a 3x3 stride-2 pool after the BN
                assert conv.stride == (1, 1)
                assert (pool.kernel_size, pool.stride, pool.padding) == ((2, 2, 0) if types[0] is nn.AvgPool2d else (3, 2, 1))
    return check


def assert_sign_gradient(model, derivative):
    """Every binary conv passes back, to its real-valued input x, the gradient it gives its
    binary input sign(x) times the sign estimator's derivative at x (trick 1's variants)."""
    for conv in binary_convs(model)[:2] + binary_convs(model)[-1:]:
        x = (torch.randn(2, conv.in_channels, 5, 5) * 0.7).requires_grad_()
        conv(x).sum().backward()
        b = torch.where(x >= 0, 1.0, -1.0).detach().requires_grad_()
        F.conv2d(b, conv.quantized_weight().detach(), None, conv.stride, conv.padding, conv.dilation,
                 conv.groups).sum().backward()
        torch.testing.assert_close(x.grad, b.grad * derivative(x.detach()), rtol=1e-5, atol=1e-6)


def ste(x):  # the collection's BinActive: 1 where |x| < 1
    return (x.abs() < 1).float()


def approx_sign(x):  # Bi-Real Net's ApproxSign: 2 - 2|x| where |x| < 1
    return (2 - 2 * x.abs()).clamp(min=0)


def swish_sign(beta):  # BNN+'s SignSwish
    return lambda x: beta * (2 - beta * x * torch.tanh(beta * x / 2)) / (1 + torch.cosh(beta * x))


def check_quantizer(derivative):
    return lambda model: assert_sign_gradient(model, derivative)


def check_swish_beta_3(model):
    assert_sign_gradient(model, swish_sign(3.0))
    with pytest.raises(AssertionError):  # not the default beta of 5
        assert_sign_gradient(model, swish_sign(5.0))


def check_no_weight_scale(model):
    for conv in binary_convs(model):
        assert conv.weight_quantizer.config() == {"name": "sign"}
        assert set(conv.quantized_weight().unique().tolist()) == {-1.0, 1.0}  # signs alone


def check_threshold(model):
    for conv in binary_convs(model):
        assert isinstance(conv.threshold, nn.Parameter) and conv.threshold.shape == (1, conv.in_channels, 1, 1)
    conv = binary_convs(model)[0]
    with torch.no_grad():
        conv.threshold.fill_(0.5)
    x = torch.full((1, conv.in_channels, 3, 3), -0.25)  # -0.25 + 0.5 >= 0: the sign is +1
    expected = F.conv2d(torch.ones_like(x), conv.quantized_weight(), padding=1)
    torch.testing.assert_close(conv(x), expected)


def check_bn_momentum(model):
    assert len(batchnorms(model)) == 20 and all(bn.momentum == 0.3 for bn in batchnorms(model))  # stem, blocks, shortcuts


def check_stem_pool_order(model):
    assert [type(m) for m in model.stem] == [nn.Conv2d, nn.MaxPool2d, nn.BatchNorm2d, nn.ReLU]
    assert model.stem[0].kernel_size == (7, 7) and model.stem[0].stride == (2, 2)
    default = model_from("model.width=0.125", "model.stem=imagenet")
    assert [type(m) for m in default.stem] == [nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.MaxPool2d]


def check_se(model):
    for block in blocks(model):
        (se,) = block.attention  # one per binary conv
        cin, cout = block.convs[0].in_channels, block.convs[0].out_channels
        assert isinstance(se, ChannelAttention) and se.fc1.in_channels == cin and se.fc2.out_channels == cout
        assert se.fc1.out_channels == max(cin // 4, 8)  # model.se_reduction=4: 16 where cin is 64
    assert sum(isinstance(m, ChannelAttention) for m in model.modules()) == 16
    assert_block_computes(blocks(model)[4], prelu_of(blocks(model)[4]))


def check_widened(widen, groups):
    def check(model):
        widths = [w * widen for w in WIDTHS]
        convs = binary_convs(model)
        assert [c.out_channels for c in convs] == [w for w in widths for _ in range(4)]
        assert model.stem[0].out_channels == 8 and model.classifier.in_features == widths[-1]
        # Grouped 3x3 binary convs; one whose input (the 8-channel stem's) the groups do not
        # divide stays dense.
        assert [c.groups for c in convs] == [groups if c.in_channels % groups == 0 else 1 for c in convs]
        assert sum(c.groups == groups for c in convs) == (16 if 8 % groups == 0 else 15)
        assert all(c.weight.shape[1] == c.in_channels // c.groups for c in convs)
        assert all(m.groups == 1 for b in blocks(model) for m in b.shortcut.modules()
                   if type(m) is nn.Conv2d)  # real shortcuts stay dense
    return check


def check_binary_stem_and_classifier(model):
    assert isinstance(model.stem[0], BinaryConv2d) and model.stem[0].kernel_size == (3, 3)
    assert isinstance(model.classifier, BinaryLinear)
    assert len(list(binary_layers(model))) == 18


def check_real_twin(model):
    set_precision(model, "binary", "binary")  # what stage 2 would do: a real-valued model stays real
    layers = [layer for _, layer in binary_layers(model)]
    assert len(layers) == 16 and all(not c.binarize and (c.activations, c.weights) == ("real", "real") for c in layers)
    conv, x = layers[0], torch.randn(1, 8, 4, 4)
    torch.testing.assert_close(conv(x), F.conv2d(x, conv.weight, padding=1))
    assert model.state_dict().keys() == model_from("model.width=0.125").state_dict().keys()  # the same tree


def check_bn_after_conv(model):
    for block in blocks(model):  # the BN normalises the conv's output: cout channels
        assert not block.norm_first and [n.num_features for n in block.norms] == [block.convs[0].out_channels]
    assert_block_computes(blocks(model)[4], prelu_of(blocks(model)[4]), bn_first=False)


def check_stem_without_activation(model):
    assert [type(m) for m in model.stem] == [nn.Conv2d, nn.BatchNorm2d, nn.Identity]


def check_parameter_free_shortcut(model):
    shortcuts = [b.shortcut for b in blocks(model) if not isinstance(b.shortcut, nn.Identity)]
    assert [[type(m) for m in s] for s in shortcuts] == [[nn.AvgPool2d, Repeat]] * 3
    assert all(s[1].times == 2 for s in shortcuts) and not any(p.numel() for s in shortcuts for p in s.parameters())
    x = torch.randn(1, 8, 4, 4)
    pooled = F.avg_pool2d(x, 2)
    torch.testing.assert_close(shortcuts[0](x), torch.cat([pooled, pooled], 1))  # the input twice over


def check_unscaled_gradient(model):
    conv = binary_convs(model)[0]
    assert all(c.weight_quantizer.config()["gradient"] == "unscaled" for c in binary_convs(model))
    conv.quantized_weight().sum().backward()  # Bi-Real's code: g where |w| < 1, not times the scale
    torch.testing.assert_close(conv.weight.grad, (conv.weight.abs() < 1).float())


def check_bireal_init(model):
    for conv in binary_convs(model):  # U[0, 0.001): every sign +1 at first
        assert conv.weight.min() >= 0 and conv.weight.max() < 1e-3
    assert not any(isinstance(m, nn.Conv2d) and not isinstance(m, BinaryConv2d) and m.weight.max() < 1e-3
                   for m in model.modules())  # real convs keep PyTorch's init


def check_bireal_block(model, depths):
    """Bi-Real Net's official block: sign (ApproxSign) -> binary conv -> BN -> + shortcut, nothing
    after the addition; pool-then-conv shortcuts; a stem ending in BN."""
    check_quantizer(approx_sign)(model)
    assert [len(stage) for stage in model.stages] == depths and len(binary_convs(model)) == sum(depths)
    assert all(type(b.act) is nn.Identity for b in blocks(model))
    assert downsampling_shortcuts(model) == [[nn.AvgPool2d, nn.Conv2d, nn.BatchNorm2d]] * 3  # v2
    assert [type(m) for m in model.stem] == [nn.Conv2d, nn.BatchNorm2d, nn.Identity]
    assert all(c.weight_quantizer.config()["gradient"] == "unscaled" for c in binary_convs(model))
    assert all(bn.momentum == 0.1 for bn in batchnorms(model))
    assert_block_computes(blocks(model)[4], lambda t: t, bn_first=False)


def check_birealnet(model):
    check_bireal_block(model, [4, 4, 4, 4])
    check_bireal_init(model)


def check_reactnet(model):
    check_quantizer(approx_sign)(model)
    assert all(not b.norm_first for b in blocks(model))
    assert downsampling_shortcuts(model) == [[nn.AvgPool2d, nn.Conv2d, nn.BatchNorm2d]] * 3  # v2
    assert all(type(b.act) is RPReLU for b in blocks(model))
    assert all(c.threshold is not None for c in binary_convs(model))


def check_resnet34(model):
    assert [len(stage) for stage in model.stages] == [6, 8, 12, 6]  # (3, 4, 6, 3) basic blocks, double skip
    assert len(binary_convs(model)) == 32


def check_reactnet_a(model):
    # 13 blocks of a 3x3 and a 1x1 binary conv, each its own BinaryBlock; channels from 32/8 = 4.
    assert len(model.stages) == 13 and all(len(stage) == 2 for stage in model.stages)
    assert [c.kernel_size for c in binary_convs(model)] == [(3, 3), (1, 1)] * 13
    assert model.num_features == 1024 // 8 == model.classifier.in_features
    check_quantizer(approx_sign)(model)
    assert all(type(b.act) is RPReLU and not b.norm_first for b in blocks(model))
    assert all(c.threshold is not None for c in binary_convs(model))
    assert not any(type(m) is nn.Conv2d for b in blocks(model) for m in b.modules())  # parameter-free shortcuts


def check_resnet50(model):
    assert not blocks(model)
    assert [[type(b) for b in stage] for stage in model.stages] == [[TricksBottleneck] * n for n in (3, 4, 6, 3)]
    assert len(binary_convs(model)) == 48 and model.num_features == 4 * 64 == model.classifier.in_features


STRUCTURE = {
    "collection block (default)": check_collection_block,
    "single skip": check_single_skip,
    "relu after the add": check_relu,
    "identity after the add": check_identity,
    "rprelu": check_rprelu,
    "maxout": check_maxout,
    "downsample v2": check_downsample(nn.AvgPool2d, nn.Conv2d, nn.BatchNorm2d),
    "downsample v3": check_downsample(nn.Conv2d, nn.BatchNorm2d, nn.AvgPool2d),
    "strided conv shortcut": check_downsample(nn.Conv2d, nn.BatchNorm2d),
    "approx_sign": check_quantizer(approx_sign),
    "swish_sign beta 3": check_swish_beta_3,
    "no weight scale": check_no_weight_scale,
    "rsign threshold": check_threshold,
    "bn momentum 0.3": check_bn_momentum,
    "reordered stem pooling": check_stem_pool_order,
    "squeeze-excitation": check_se,
    "double width, groups 2": check_widened(2, 2),
    "treble width, groups 3": check_widened(3, 3),
    "binary stem and classifier": check_binary_stem_and_classifier,
    "real-valued twin": check_real_twin,
    "birealnet18": check_birealnet,
    "reactnet18": check_reactnet,
    "resnet34": check_resnet34,
    "resnet50": check_resnet50,
    "bn after the conv": check_bn_after_conv,
    "stem without activation": check_stem_without_activation,
    "parameter-free shortcut": check_parameter_free_shortcut,
    "unscaled weight gradient": check_unscaled_gradient,
    "bi-real init": check_bireal_init,
    "birealnet34": lambda model: check_bireal_block(model, [6, 8, 12, 6]),
    "reactnet_a": check_reactnet_a,
    "old key: approx_sign": check_quantizer(approx_sign),
    "old keys: swish_sign beta 3": check_swish_beta_3,
    "old key: no weight scale": check_no_weight_scale,
    "old key: unscaled weight gradient": check_unscaled_gradient,
}


def test_every_option_has_a_structural_check():
    assert list(STRUCTURE) == list(TRICKS)


@pytest.mark.parametrize("trick", TRICKS)
def test_option_changes_the_module_tree_as_it_claims(trick):
    torch.manual_seed(0)
    STRUCTURE[trick](model_from("model.width=0.125", *TRICKS[trick]))


def test_stage_precision_switches_the_conv():
    conv = BinaryConv2d(4, 6, 3, padding=1)
    x = torch.randn(2, 4, 5, 5)
    alpha = conv.weight.abs().mean(dim=(1, 2, 3), keepdim=True)
    sign = lambda t: torch.where(t >= 0, 1.0, -1.0)  # noqa: E731
    conv.set_precision("binary", "real")
    assert torch.allclose(conv(x), F.conv2d(sign(x), conv.weight, padding=1), atol=1e-5)
    conv.set_precision("binary", "binary")
    assert torch.allclose(conv(x), F.conv2d(sign(x), sign(conv.weight) * alpha, padding=1), atol=1e-5)
    conv.set_precision("real", "binary")
    assert torch.allclose(conv(x), F.conv2d(x, sign(conv.weight) * alpha, padding=1), atol=1e-5)
    assert (conv.input_bits, conv.weight_bits) == (32, 1)
    twin = BinaryConv2d(4, 6, 3, padding=1, binarize=False)
    twin.set_precision("binary", "binary")
    assert torch.allclose(twin(x), F.conv2d(x, twin.weight, padding=1), atol=1e-6)


def test_channel_attention_scales_the_binary_conv_output():
    torch.manual_seed(0)
    block = BinaryBlock(8, 8, 1, block_options(attention="se", se_reduction=2, activation="identity")).eval()
    x = torch.randn(2, 8, 6, 6)
    real = block.norms[0](x)
    expected = block.convs[0](real) * block.attention[0](real) + x
    assert torch.allclose(block(x), expected, atol=1e-6)
    scale = block.attention[0](real)
    assert scale.shape == (2, 8, 1, 1) and ((scale > 0) & (scale < 1)).all()


@pytest.mark.parametrize("variant, types", [
    ("v1", [nn.Conv2d, nn.BatchNorm2d, nn.AvgPool2d]),
    ("v2", [nn.AvgPool2d, nn.Conv2d, nn.BatchNorm2d]),
    ("v3", [nn.Conv2d, nn.BatchNorm2d, nn.AvgPool2d]),
    ("conv", [nn.Conv2d, nn.BatchNorm2d]),
])
def test_downsampling_shortcuts(variant, types):
    block = BinaryBlock(8, 16, 2, block_options(downsample=variant))
    assert [type(m) for m in block.shortcut] == types
    assert all(not isinstance(m, BinaryConv2d) for m in block.shortcut)  # real-valued
    if variant == "v3":
        assert (block.shortcut[2].kernel_size, block.shortcut[2].stride, block.shortcut[2].padding) == (3, 2, 1)
    for size in (8, 7):  # even and odd maps shrink like the strided conv
        assert block(torch.randn(1, 8, size, size)).shape == (1, 16, (size + 1) // 2, (size + 1) // 2)


def test_seed_bottleneck_as_written():
    opts = block_options()
    down = TricksBottleneck(256, 128, 2, opts)
    assert down.has_branch and isinstance(down.branch[2], nn.AvgPool2d) and down.branch[2].kernel_size == 2
    assert down.conv1.stride == (2, 2) and down.conv1.kernel_size == (1, 1)  # the collection strides the 1x1
    assert down(torch.randn(1, 256, 8, 8)).shape == (1, 512, 4, 4)
    first = TricksBottleneck(64, 64, 1, opts)
    assert first.has_branch and first.branch[2].kernel_size == 3 and first.branch[2].stride == 1
    plain = TricksBottleneck(256, 64, 1, opts)
    assert not plain.has_branch and not hasattr(plain, "act")


def test_options_reach_the_layers():
    model = model_from("model.width=0.25", "model.bn_momentum=0.2", "model.widen=2", "model.groups=4",
                       "model.stem=imagenet", "model.stem_pool_order=conv_pool_bn_act")
    assert all(m.momentum == 0.2 for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    assert [type(m).__name__ for m in model.stem] == ["Conv2d", "MaxPool2d", "BatchNorm2d", "ReLU"]
    convs = [m for m in model.modules() if isinstance(m, BinaryConv2d)]
    assert all(c.groups == 4 for c in convs) and convs[0].out_channels == 32  # 64 * 0.25 * 2
    assert isinstance(model.classifier, nn.Linear) and not isinstance(model.stem[0], BinaryConv2d)


def resnet18_parameter_count(stem_kernel: int, num_classes: int) -> int:
    """Worked out from the layer list of the collection's ResNet-18 (double skip, v1 shortcuts, PReLU)."""
    count = 3 * 64 * stem_kernel ** 2 + 2 * 64  # stem conv + BN
    cin = 64
    for planes in (64, 128, 256, 512):
        for i in range(4):  # two basic blocks = four of the collection's blocks per stage
            count += 2 * cin + cin * planes * 9 + planes  # BN, binary 3x3 conv, PReLU
            if cin != planes:
                count += cin * planes + 2 * planes  # real 1x1 conv + BN of the v1 shortcut
            cin = planes
    return count + 512 * num_classes + num_classes


@pytest.mark.parametrize("data, size, kernel", [("imagenet", 224, 7), ("cifar100", 32, 3)])
def test_resnet18_shapes_and_parameter_count(data, size, kernel):
    classes = 1000 if data == "imagenet" else 100
    model = model_from(data=data, num_classes=classes)
    assert sum(p.numel() for p in model.parameters()) == resnet18_parameter_count(kernel, classes)
    feats = model.stages(model.stem(torch.randn(1, 3, size, size)))
    assert feats.shape == ((1, 512, 7, 7) if size == 224 else (1, 512, 4, 4))
    assert model(torch.randn(2, 3, size, size)).shape == (2, classes)


@pytest.mark.parametrize("preset", ["reactnet18", "birealnet18"])
def test_a_binary_classifier_is_built_like_every_other_binary_layer(preset):
    """Its quantizers, RSign threshold and initialisation are the model's."""
    model = model_from("model.width=0.125", f"model={preset}", "model.binary_classifier=true")
    conv, classifier = binary_convs(model)[0], model.classifier
    assert isinstance(classifier, BinaryLinear)
    assert classifier.input_quantizer.config() == conv.input_quantizer.config() == {"name": "approx_sign"}
    assert classifier.weight_quantizer.config() == conv.weight_quantizer.config()
    assert (classifier.threshold is None) == (conv.threshold is None) == (preset == "birealnet18")
    small = preset == "birealnet18"  # Bi-Real's U[0, 0.001)
    assert (classifier.weight.min() >= 0 and classifier.weight.max() < 1e-3) == small


def test_a_checkpoint_whose_model_config_does_not_build_is_a_checkpoint_error():
    from bnntrain.errors import CheckpointError
    from bnntrain.models import model_from_checkpoint
    from omegaconf import OmegaConf

    model = OmegaConf.to_container(make("model.width=0.125").model, resolve=True)
    state = {"config": {"model": {**model, "binary_init": "gaussian"}}, "num_classes": 10, "in_channels": 3,
             "model": {}}
    with pytest.raises(CheckpointError, match="saved.pt: its model config does not build: unknown model.binary_init "
                                              "'gaussian'; expected one of: default, small_positive"):
        model_from_checkpoint(state, "saved.pt")
