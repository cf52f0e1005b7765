"""The model family: every architectural trick on and off, shapes, parameter counts."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bnntrain.engine import load_model_weights
from bnntrain.models import build_model
from bnntrain.nn import BinaryBlock, BinaryConv2d, BlockOptions, TricksBottleneck, set_precision
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
    "downsample v2": ["model.downsample=v2"],
    "downsample v3": ["model.downsample=v3"],
    "strided conv shortcut": ["model.downsample=conv"],
    "approx_sign": ["model.quantizer=approx_sign"],
    "swish_sign beta 3": ["model.quantizer=swish_sign", "+model.quantizer_args.beta=3.0"],
    "no weight scale": ["model.weight_scale=false"],
    "rsign threshold": ["model.learnable_threshold=true"],
    "bn momentum 0.1": ["model.bn_momentum=0.1"],
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
    block = BinaryBlock(8, 8, 1, BlockOptions(attention="se", se_reduction=2, activation="identity")).eval()
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
    block = BinaryBlock(8, 16, 2, BlockOptions(downsample=variant))
    assert [type(m) for m in block.shortcut] == types
    assert all(not isinstance(m, BinaryConv2d) for m in block.shortcut)  # real-valued
    if variant == "v3":
        assert (block.shortcut[2].kernel_size, block.shortcut[2].stride, block.shortcut[2].padding) == (3, 2, 1)
    for size in (8, 7):  # even and odd maps shrink like the strided conv
        assert block(torch.randn(1, 8, size, size)).shape == (1, 16, (size + 1) // 2, (size + 1) // 2)


def test_seed_bottleneck_as_written():
    opts = BlockOptions()
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
