"""bnntrain.tools.convert reads an official checkpoint as data: every shape is ours exactly (or step
2's flat `weights`, or one of ReActNet-A's joined halves), no tensor is empty or of the wrong
dtype, no count builds a model bigger than memory, out never replaces src, and the output says
how many latent binary weights are exactly 0. bnntrain.tools.summary names a checkpoint it cannot
build or count in one line."""
import os
import re

import pytest
import torch
from omegaconf import OmegaConf

import official_nets as official
from bnntrain.tools.convert import convert
from bnntrain.tools.convert import main as convert_main
from bnntrain.engine import save_checkpoint
from bnntrain.errors import CheckpointError, ConfigError, UserError
from bnntrain.models import build_model, model_from_checkpoint
from bnntrain.tools.summary import main as summary_main
from conftest import main_in_process
from test_config import make
from test_errors import assert_one_line_error
from test_reference_nets import away_from_zero, save_official
import forked_cli


def tool(name, *args):
    return forked_cli.run(["-m", f"bnntrain.tools.{name}", *map(str, args)], timeout=300)


@pytest.fixture(scope="module")
def bireal():
    """Bi-Real Net 18's step-2 state dict, flat `(N, 1)` binary weights."""
    torch.manual_seed(0)
    return official.BiRealNet().state_dict()


@pytest.fixture(scope="module")
def reactnet_a():
    torch.manual_seed(0)
    return official.ReActNetA().state_dict()


def written(tmp_path, state, **changes):
    """The official state with some tensors replaced (a key's dots written as `__`)."""
    path = tmp_path / "official.pth"
    torch.save({**state, **{k.replace("__", "."): v for k, v in changes.items()}}, path)
    return path


BIREAL_CASES = {  # what the file holds instead: the one-line error
    "a transposed shortcut": ({"layer2__0__downsample__1__weight": lambda s: s["layer2.0.downsample.1.weight"]
                               .reshape(64, 128, 1, 1)},
                              "layer2.0.downsample.1.weight has shape (64, 128, 1, 1), where "
                              "stages.1.0.shortcut.1.weight takes (128, 64, 1, 1)"),
    "a BN weight as a matrix": ({"bn1__weight": lambda s: s["bn1.weight"].reshape(8, 8)},
                                "bn1.weight has shape (8, 8), where stem.1.weight takes (64,)"),
    "flat weights as a row": ({"layer1__0__binary_conv__weights": lambda s: s["layer1.0.binary_conv.weights"].T},
                              "layer1.0.binary_conv.weights has shape (1, 36864), where stages.0.0.convs.0.weight "
                              "takes (64, 64, 3, 3) or flat (36864, 1)"),
    "4-D binary weights transposed": ({"layer2__0__binary_conv__weights": lambda s: torch.zeros(64, 128, 3, 3)},
                                      "layer2.0.binary_conv.weights has shape (64, 128, 3, 3), where"),
    "integer BN statistics": ({"bn1__running_var": lambda s: s["bn1.running_var"].long()},
                              "bn1.running_var is torch.int64, where stem.1.running_var is torch.float32"),
    "a conv with 0 input channels": ({"conv1__weight": lambda s: torch.zeros(64, 0, 7, 7)},
                                     "conv1.weight has shape (64, 0, 7, 7): a dimension of size 0"),
    "an empty tensor under no rule": ({"extra": lambda s: torch.zeros(3, 0)}, "extra has shape (3, 0): a dimension"),
    "a billion classes": ({"fc__weight": lambda s: torch.zeros(1).expand(10**9, 512)},  # 4 bytes stored
                          "fc.weight has shape (1000000000, 512): 1000000000 classes, where convert takes at most"),
    "a million input channels": ({"conv1__weight": lambda s: torch.zeros(1).expand(64, 10**6, 7, 7)},
                                 "1000000 input channels, where convert takes at most 1024"),
    "10^11 binary weights": ({"layer1__0__binary_conv__weights": lambda s: torch.zeros(1).expand(10**11, 1)},
                             "layer1.0.binary_conv.weights has shape (100000000000, 1), where"),
}


@pytest.mark.parametrize("case", BIREAL_CASES)
def test_a_tensor_that_is_not_ours_exactly_is_refused_before_it_is_used(case, bireal, tmp_path):
    changes, message = BIREAL_CASES[case]
    src = written(tmp_path, bireal, **{k: make_value(bireal) for k, make_value in changes.items()})
    with pytest.raises(CheckpointError, match=re.escape(message)):
        convert(src, tmp_path / "ours.pt", ["model=birealnet18"])
    assert not (tmp_path / "ours.pt").exists()


def test_each_joined_half_has_its_own_shape(reactnet_a, tmp_path):
    """The two BNs of a doubling block hold 16 + 48 values: 64, as ours, but not two halves."""
    src = written(tmp_path, reactnet_a, feature__1__bn2_1__weight=torch.ones(16),
                  feature__1__bn2_2__weight=torch.ones(48))
    with pytest.raises(CheckpointError, match=re.escape("feature.1.bn2_1.weight has shape (16,), where "
                                                        "stages.0.1.norms.0.weight takes (32,) (one of the parts "
                                                        "joined into stages.0.1.norms.0.weight (64,))")):
        convert(src, tmp_path / "ours.pt", ["model=reactnet_a"])


def test_a_huge_tensor_is_one_line_from_the_cli(bireal, tmp_path):
    src = written(tmp_path, bireal, fc__weight=torch.zeros(1).expand(10**9, 512))
    assert_one_line_error(tool("convert", f"src={src}", f"out={tmp_path / 'ours.pt'}", "model=birealnet18"),
                          "fc.weight", "1000000000 classes")


def test_a_saved_number_that_is_not_a_number_is_refused(bireal, tmp_path):
    for epoch, message in (("seven", "epoch is a str, not a number"), (-3, "epoch is -3, not a count")):
        torch.save({"state_dict": bireal, "epoch": epoch}, tmp_path / "official.pth")
        with pytest.raises(CheckpointError, match=message):
            convert(tmp_path / "official.pth", tmp_path / "ours.pt", ["model=birealnet18"])


def test_out_over_src_is_refused_before_any_work(bireal, tmp_path):
    src = written(tmp_path, bireal)
    before = src.read_bytes()
    out = main_in_process(convert_main, ["bnntrain.tools.convert", f"src={src}", f"out={tmp_path / '.' / src.name}",
                                         "model=birealnet18"])
    assert_one_line_error(out, f"is also src={src}", "give another out")
    (tmp_path / "link.pth").symlink_to(src)
    os.link(src, tmp_path / "hard.pth")
    for other in ("link.pth", "hard.pth"):
        with pytest.raises(UserError, match="is also src="):
            convert(src, tmp_path / other, ["model=birealnet18"])
    assert src.read_bytes() == before


def test_a_preset_without_official_checkpoints_is_named_first(bireal, tmp_path):
    src = written(tmp_path, bireal)
    out = main_in_process(convert_main, ["bnntrain.tools.convert", f"src={src}", f"out={tmp_path / 'ours.pt'}",
                                         "model=tricks_resnet18"])
    assert_one_line_error(out, "model=tricks_resnet18", "birealnet18, birealnet34, reactnet18, reactnet_a")
    with pytest.raises(ConfigError, match="model=resnet50: convert takes"):  # before src is read
        convert(tmp_path / "missing.pth", tmp_path / "ours.pt", ["model=resnet50"])


def test_latent_binary_weights_of_0_are_counted_and_change_the_logits(tmp_path):
    """torch.sign(0) is 0 in the official code and +1 in bnntrain: the count says the
    converted network is not the official one, and the logits show it."""
    torch.manual_seed(0)
    net = away_from_zero(official.BiRealNet())
    with torch.no_grad():
        net.layer1[0].binary_conv.weights[:3] = 0
        net.layer3[1].binary_conv.weights[100:102] = 0
    save_official(net, tmp_path / "official.pth.tar")
    out = tool("convert", f"src={tmp_path / 'official.pth.tar'}", f"out={tmp_path / 'ours.pt'}", "model=birealnet18")
    assert out.returncode == 0, out.stderr
    assert "5 latent binary weight(s) are exactly 0" in out.stdout and "logits differ" in out.stdout, out.stdout
    ours = model_from_checkpoint(torch.load(tmp_path / "ours.pt", weights_only=True)).double().eval()
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        assert not torch.allclose(ours(x), net.double().eval()(x), rtol=0, atol=1e-6)


def tiny_checkpoint(path, in_channels=3, **config_changes):
    """A bnntrain checkpoint written by hand: a 1/8-width ResNet-18 for 10 classes."""
    cfg = OmegaConf.to_container(make("data=synthetic", "data.image_size=16", "model.width=0.125"), resolve=True)
    model = build_model(cfg["model"], num_classes=10, in_channels=in_channels)
    save_checkpoint({"model": model.state_dict(), "num_classes": 10, "in_channels": in_channels, "epoch": 0,
                     "stage": "stage1", "config": {**cfg, **config_changes}}, path)
    return path


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")
def test_summary_of_a_checkpoint_it_cannot_build_is_one_line(tmp_path, capsys):
    out = tool("summary", f"ckpt={tiny_checkpoint(tmp_path / 'zero.pt', in_channels=0)}")
    assert_one_line_error(out, "zero.pt", "in_channels is 0")
    summary_main([f"ckpt={tiny_checkpoint(tmp_path / 'ok.pt')}"])
    assert "BOPs" in capsys.readouterr().out
    for name, change in (("no_data.pt", {"data": {}}), ("no_size.pt", {"data": {"image_size": 0}})):
        with pytest.raises(SystemExit):
            summary_main([f"ckpt={tiny_checkpoint(tmp_path / name, **change)}"])
        assert f"{name}: its model cannot be built or counted" in capsys.readouterr().err


SMALL_REACTNETS = {  # official network at 1/16 width, step= where the file cannot tell
    "reactnet-18 step 1": (lambda: official.BiRealNet(num_classes=10, react=True, step=1, width=1 / 16),
                           "reactnet18", "1"),
    "reactnet-18 step 2, flat weights": (lambda: official.BiRealNet(num_classes=10, react=True, width=1 / 16),
                                         "reactnet18", None),
    "reactnet-18 step 2, 4-D weights": (lambda: official.BiRealNet(num_classes=10, react=True, flat=False,
                                                                   width=1 / 16), "reactnet18", "2"),
    "reactnet-a step 2": (lambda: official.ReActNetA(num_classes=10, width=1 / 16), "reactnet_a", None),
}


@pytest.mark.parametrize("layout", SMALL_REACTNETS)
def test_every_learnable_shift_lands_where_the_official_code_adds_it(layout, tmp_path):
    """Every shift (RSign's `move0`/`move11`/`move21`, RPReLU's `move1`/`move12`/`move22` before the
    PReLU and `move2`/`move13`/`move23` after it) holds its own nonzero values, so a shift
    converted into another's place changes the logits, which must be the official ones."""
    torch.manual_seed(0)
    net = away_from_zero(SMALL_REACTNETS[layout][0]())
    shifts = [p for name, p in net.named_parameters() if re.search(r"\.move\d+\.bias$", name)]
    with torch.no_grad():
        for p in shifts:
            p.copy_(torch.empty(p.shape).uniform_(0.05, 0.5) * (torch.randint(0, 2, p.shape) * 2 - 1))
    values = torch.cat([p.flatten() for p in shifts])
    assert values.abs().min() > 0 and values.unique().numel() == values.numel()
    save_official(net, tmp_path / "official.pth.tar")
    preset, step = SMALL_REACTNETS[layout][1:]
    convert(tmp_path / "official.pth.tar", tmp_path / "ours.pt", [f"model={preset}", "model.width=0.0625"], step)
    ours = model_from_checkpoint(torch.load(tmp_path / "ours.pt", weights_only=True)).double().eval()
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        want = net.double().eval()(x)
        got = ours(x)
    assert want.std() > 0.01  # the logits depend on the input: the network is not flat
    torch.testing.assert_close(got, want, rtol=0, atol=1e-10)  # float64: no sign flips on rounding
