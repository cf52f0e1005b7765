"""larq-zoo's Keras HDF5 weights (QuickNetSmall, QuickNet, QuickNetLarge) through
`bnntrain.tools.convert`, without TensorFlow: files written here in Keras's legacy HDF5 layout
from the official network of test_quicknet.py, with the layer names Keras gives larq-zoo's
model; the converted network's logits are the official network's in float64, every layer of
the three sizes is accounted for, and a file that does not fit is one line naming what."""
import re
import sys
from collections import Counter

import numpy as np
import pytest
import torch

import forked_cli
from conftest import main_in_process, need
from test_config import make
from test_errors import assert_one_line_error
from test_quicknet import SPEC, OfficialQuickNet

from bnntrain.errors import CheckpointError
from bnntrain.models import build_model, model_from_checkpoint
from bnntrain.nn.quicknet_blocks import BlurPool2d
from bnntrain.tools import export
from bnntrain.tools.convert import convert
from bnntrain.tools.convert import main as convert_main
from bnntrain.tools.keras_weights import KERAS_RULES, keras_layers, keras_state

h5py = need("h5py", extra="keras")

SIZES = {"quicknet_small": ((4, 4, 4, 4), (32, 64, 256, 512)), "quicknet": ((4, 4, 4, 4), (64, 128, 256, 512)),
         "quicknet_large": ((6, 8, 12, 6), (64, 128, 256, 512))}  # larq-zoo's section_blocks, section_filters
QUARTER = ((4, 4, 4, 4), (8, 16, 64, 128))  # quicknet_small at model.width=0.25


def blurpool_initializer(shape):
    """larq-zoo's blurpool_initializer (larq_zoo/sota/quicknet.py) for a 3x3 kernel, in numpy."""
    k = np.outer([1, 2, 1], [1, 2, 1])
    k = np.repeat(np.expand_dims(k / np.sum(k), -1), shape[2], axis=-1)
    return np.reshape(k, shape).astype(np.float32)


class KerasNames:
    """Keras's automatic layer names: the class name in snake case, then `_1`, `_2`, ... for the
    next layers of that class made in the process (TensorFlow >= 2.4: `x + residual` is a TFOpLambda
    layer called `tf.__operators__.add`)."""

    def __init__(self):
        self.seen = Counter()

    def __call__(self, kind):
        self.seen[kind] += 1
        return kind if self.seen[kind] == 1 else f"{kind}_{self.seen[kind] - 1}"


def keras_model_layers(net):
    """(name, [(weight name, array)]) for every layer of larq-zoo's model, in `model.layers`'
    order (here the order the layers are made in), the names as Keras would give them in a
    model built first in its process, each kernel in Keras's layout; arrays of a meta-device net stay meta."""
    names, layers = KerasNames(), [("input_1", [])]

    def add(kind, **arrays):
        name = names(kind)
        layers.append((name, [(f"{name}/{key}:0", value) for key, value in arrays.items()]))

    def bn(norm):  # trainable weights first, as Keras saves them
        affine = {} if norm.gamma is None else {"gamma": norm.gamma, "beta": norm.beta}
        add("batch_normalization", **affine, moving_mean=norm.moving_mean, moving_variance=norm.moving_var)

    conv, norm, depthwise, norm_dw, pointwise, norm_pw = net.stem
    add("quant_conv2d", kernel=conv.w.permute(2, 3, 1, 0))
    bn(norm)
    add("activation")
    add("quant_depthwise_conv2d", depthwise_kernel=depthwise.w.permute(2, 3, 0, 1))
    bn(norm_dw)
    add("quant_conv2d", kernel=pointwise.w.permute(2, 3, 1, 0))
    bn(norm_pw)
    for kind, kernel, norm in zip(net.kinds, net.layers[::2], net.layers[1::2]):
        if kind == "transition":
            add("activation")
            add("max_pooling2d")
            add("depthwise_conv2d", depthwise_kernel=blurpool_initializer((3, 3, kernel.w.shape[1], 1)))
        add("quant_conv2d", kernel=kernel.w.permute(2, 3, 1, 0))
        bn(norm)
        if kind == "residual":
            add("tf.__operators__.add")
    for kind in ("activation", "average_pooling2d", "flatten"):
        add(kind)
    add("quant_dense", kernel=net.dense.weight.T, bias=net.dense.bias)
    add("activation")  # the softmax
    return layers


def names_attr(names, fixed):
    """A list of names as an attribute: fixed-length bytes as h5py 2 wrote Keras 2's files, or a
    list (variable-length strings, as h5py 3 writes it)."""
    encoded = [name.encode("utf8") for name in names]
    return np.array(encoded, dtype="S") if fixed and encoded else encoded


def write_keras(path, layers, whole_model=False):
    """Keras's legacy HDF5 layout: `save_weights` at the root (fixed-length names), or `save`
    under `model_weights` (its layer_names split in two, as Keras splits a long list)."""
    with h5py.File(path, "w") as f:
        root = f.create_group("model_weights") if whole_model else f
        names = [name for name, _ in layers]
        if whole_model:
            f.attrs["model_config"] = b'{"class_name": "Functional", "config": {"name": "quicknet_small"}}'
            f.create_dataset("optimizer_weights/Adam/iter:0", data=np.int64(7))  # not the model's: not read
            root.attrs["layer_names0"], root.attrs["layer_names1"] = (names_attr(names[:40], False),
                                                                      names_attr(names[40:], False))
        else:
            root.attrs["layer_names"] = names_attr(names, True)
        root.attrs["backend"], root.attrs["keras_version"] = b"tensorflow", b"2.4.0"
        for name, arrays in sorted(layers, key=lambda layer: layer[0]):  # Keras makes the groups sorted by name
            group = root.create_group(name)
            group.attrs["weight_names"] = names_attr([weight for weight, _ in arrays], not whole_model)
            for weight, value in arrays:
                if isinstance(value, torch.Tensor) and value.is_meta:  # shape only: HDF5 stores nothing
                    group.create_dataset(weight, shape=tuple(value.shape), dtype="f4")
                else:
                    group.create_dataset(weight, data=np.asarray(torch.as_tensor(value).detach(), np.float32))
    return path


def randomized(net):
    """Random weights and statistics, float32 values (as a Keras file holds them); a few latent
    binary weights exactly 0, which larq's sign makes +1, as bnntrain's."""
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.endswith(".w"):
                p.normal_(0, (2 / p[0].numel()) ** 0.5)
            elif name.endswith("gamma"):
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0, 0.1)
        for name, b in net.named_buffers():
            b.normal_(0, 0.1) if name.endswith("mean") else b.uniform_(0.5, 1.5)
        net.layers[0].w.view(-1)[:3] = 0
    return net


@pytest.fixture(scope="module")
def official():
    """QuickNetSmall at a quarter of the width, as larq-zoo's code computes it, with 10 classes."""
    return randomized(OfficialQuickNet(*QUARTER, num_classes=10)).eval()


@pytest.mark.parametrize("whole_model", [False, True], ids=["save_weights", "save"])
def test_a_converted_keras_file_gives_the_official_logits(whole_model, official, tmp_path):
    src = write_keras(tmp_path / "quicknet_small_weights.h5", keras_model_layers(official), whole_model)
    ckpt, zeros = convert(src, tmp_path / "ours.pt", ["model=quicknet_small", "model.width=0.25"])
    assert zeros is None and (ckpt["stage"], ckpt["epoch"], ckpt["num_classes"], ckpt["in_channels"]) == \
        ("stage2", 0, 10, 3)
    assert ckpt["precision"] == {"activations": "binary", "weights": "binary"}
    ours = model_from_checkpoint(torch.load(tmp_path / "ours.pt", weights_only=True)).double().eval()
    x = torch.randn(2, 3, 72, 72, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want, got = official.double()(x), ours(x)
        official.float()
    assert want.std() > 1e-3  # the logits depend on the input
    torch.testing.assert_close(got, want, rtol=0, atol=1e-10)


@pytest.mark.parametrize("name", SIZES)
def test_every_layer_of_each_size_is_accounted_for(name, tmp_path):
    """Full size, shapes only (HDF5 stores no data for an array never written): larq-zoo's
    published parameter count, and a layer of the file for every module of ours, one to one."""
    with torch.device("meta"):
        layers = keras_model_layers(OfficialQuickNet(*SIZES[name]))
    # larq-zoo's parameter count: every array but the moving statistics of BNs with scale and shift
    counted = [value for _, arrays in layers for weight, value in arrays
               if "/moving_" not in weight or len(arrays) == 2]
    assert sum(np.prod(value.shape) for value in counted) == SPEC[name][1]
    write_keras(tmp_path / f"{name}_weights.h5", layers)
    with torch.device("meta"):  # Keras's initialisers on 23M weights take seconds: shapes are what is checked
        model = build_model(make(f"model={name}", "data=imagenet").model, num_classes=1000, in_channels=3)
    model.to_empty(device="cpu")
    for blur in (m for m in model.modules() if isinstance(m, BlurPool2d)):  # fixed: compared with the file's
        blur.kernel.copy_(BlurPool2d(blur.channels).kernel)
    with keras_layers(tmp_path / f"{name}_weights.h5") as read:
        assert [layer.name for layer in read] == [n for n, arrays in layers if arrays]
        mapped = keras_state(read, model, KERAS_RULES[name])
    assert mapped.keys() == model.state_dict().keys()
    assert not any(v.any() for k, v in mapped.items() if not k.endswith("num_batches_tracked"))


def edited(layers, name, change):
    """The layers with layer `name`'s list of arrays changed by `change` (None drops the layer)."""
    out = [(n, change(list(arrays)) if n == name else arrays) for n, arrays in layers]
    return [(n, arrays) for n, arrays in out if arrays is not None]


CASES = {  # the file's change: what the one-line error says
    "an array too many": (lambda ls: edited(ls, "quant_conv2d_3", lambda a: a + [("quant_conv2d_3/bias:0",
                                                                                  torch.zeros(8))]),
                          "quant_conv2d_3/bias:0 has no place in stages.0.1.conv (BinaryConv2d, which takes kernel"),
    "an array missing": (lambda ls: edited(ls, "batch_normalization_4", lambda a: a[:3]),
                         "the Keras layer batch_normalization_4 has nothing for stages.0.1.norm.running_var "
                         "(it holds gamma, beta, moving_mean)"),
    "a kernel in PyTorch's layout": (
        lambda ls: edited(ls, "quant_conv2d_2", lambda a: [(a[0][0], torch.zeros(8, 8, 3, 3))]),
        "quant_conv2d_2/kernel:0 has shape (8, 8, 3, 3), where stages.0.0.conv.weight (8, 8, 3, 3) takes (3, 3, 8, 8)"),
    "a depthwise kernel of another width": (
        lambda ls: edited(ls, "quant_depthwise_conv2d", lambda a: [(a[0][0], torch.zeros(3, 3, 4, 1))]),
        "quant_depthwise_conv2d/depthwise_kernel:0 has shape (3, 3, 4, 1), where stem.5.weight (2, 1, 3, 3) "
        "takes (3, 3, 2, 1)"),
    "no top (a *_notop file)": (lambda ls: edited(ls, "quant_dense", lambda a: None),
                                "nothing for classifier (a *_notop file holds no classifier"),
    "a layer too many": (lambda ls: ls + [("quant_dense_1", [("quant_dense_1/bias:0", torch.zeros(10))])],
                         "quant_dense_1 has no place in it"),
    "another blur": (lambda ls: edited(ls, "depthwise_conv2d_1", lambda a: [(a[0][0], a[0][1] * 2)]),
                     "depthwise_conv2d_1/depthwise_kernel:0 differs from stages.2.0.2.kernel, which this model fixes"),
    "a million classes": (  # a meta array: HDF5 stores nothing, and convert must read nothing of it either
        lambda ls: edited(ls, "quant_dense", lambda a: [(a[0][0], torch.empty(128, 10**6, device="meta"))]),
        "quant_dense/kernel:0 has shape (128, 1000000): 1000000 classes, where convert takes 1 to 100000"),
    "no classes": (lambda ls: edited(ls, "quant_dense", lambda a: [(a[0][0], torch.zeros(128, 0)), a[1]]),
                   "quant_dense/kernel:0 has shape (128, 0): 0 classes, where convert takes 1 to 100000"),
}


@pytest.mark.parametrize("case", CASES)
def test_a_file_that_does_not_fit_is_one_line_naming_it(case, official, tmp_path):
    change, message = CASES[case]
    src = write_keras(tmp_path / "weights.h5", change(keras_model_layers(official)))
    out = main_in_process(convert_main, ["bnntrain.tools.convert", f"src={src}", f"out={tmp_path / 'ours.pt'}",
                                         "model=quicknet_small", "model.width=0.25"])
    assert_one_line_error(out, message)
    assert not (tmp_path / "ours.pt").exists()


def test_arrays_the_layers_do_not_list_and_integer_statistics_are_named(official, tmp_path):
    overrides = ["model=quicknet_small", "model.width=0.25"]
    src = write_keras(tmp_path / "a.h5", keras_model_layers(official))
    with h5py.File(src, "a") as f:
        f.create_dataset("quant_conv2d/quant_conv2d/bias:0", data=np.zeros(2, np.float32))
    with pytest.raises(CheckpointError, match=re.escape("holds 1 array(s) that no layer lists, which Keras would "
                                                        "not load and convert does not place: "
                                                        "/quant_conv2d/quant_conv2d/bias:0")):
        convert(src, tmp_path / "ours.pt", overrides)
    write_keras(tmp_path / "b.h5", keras_model_layers(official))
    with h5py.File(tmp_path / "b.h5", "a") as f:  # write_keras stores float32: the integer one by hand
        del f["batch_normalization/batch_normalization/moving_mean:0"]
        f["batch_normalization/batch_normalization/moving_mean:0"] = np.zeros(2, np.int64)
    with pytest.raises(CheckpointError, match=re.escape("batch_normalization/moving_mean:0 is int64, where "
                                                        "stem.2.running_mean is torch.float32")):
        convert(tmp_path / "b.h5", tmp_path / "ours.pt", overrides)


def test_the_file_kind_is_told_by_its_bytes_and_must_be_the_presets(official, tmp_path, monkeypatch):
    src = write_keras(tmp_path / "weights.pth", keras_model_layers(official))  # HDF5, whatever the suffix
    args = ["bnntrain.tools.convert", f"src={src}", f"out={tmp_path / 'ours.pt'}"]
    assert_one_line_error(main_in_process(convert_main, [*args, "model=birealnet18"]),
                          "is HDF5 (Keras): convert reads it for quicknet_small, quicknet, quicknet_large, "
                          "real_to_binary, not model=birealnet18")
    assert_one_line_error(main_in_process(convert_main, [*args, "model=quicknet_small", "step=1"]),
                          "step=1: larq-zoo's weights are binary from the start, stage 2 (leave step out)")
    torch.save({"fc.weight": torch.zeros(10, 8)}, tmp_path / "torch.h5")
    assert_one_line_error(main_in_process(convert_main, ["bnntrain.tools.convert", f"src={tmp_path / 'torch.h5'}",
                                                         f"out={tmp_path / 'ours.pt'}", "model=quicknet"]),
                          "torch.h5 is not an HDF5 file (larq-zoo's weights are Keras HDF5 files")
    monkeypatch.setitem(sys.modules, "h5py", None)  # as if the keras extra were not installed
    assert_one_line_error(main_in_process(convert_main, [*args, "model=quicknet_small"]),
                          "is an HDF5 (Keras) weight file; reading it needs h5py: pip install -e '.[keras]'")
    assert not (tmp_path / "ours.pt").exists()


def test_the_command_converts_and_the_result_exports(official, tmp_path):
    src = write_keras(tmp_path / "quicknet_small_weights.h5", keras_model_layers(official))
    out = forked_cli.run(["-m", "bnntrain.tools.convert", f"src={src}", f"out={tmp_path / 'ours.pt'}",
                          "model=quicknet_small", "model.width=0.25"], timeout=300)
    assert out.returncode == 0, out.stderr
    assert f"wrote {tmp_path / 'ours.pt'}: quicknet_small (model=quicknet_small), stage2 (binary activations, " \
           f"binary weights)" in out.stdout and "10 classes" in out.stdout, out.stdout
    assert "larq's sign is +1 at 0, as bnntrain's" in out.stdout
    export.export_checkpoint(tmp_path / "ours.pt", tmp_path / "ours.bnn")
    converted = model_from_checkpoint(torch.load(tmp_path / "ours.pt", weights_only=True)).eval()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(export.load(tmp_path / "ours.bnn")(x), converted(x), rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_the_converted_checkpoint_evaluates(official, tmp_path):
    from bnntrain.tools.evaluate import evaluate
    from test_reference_nets import by_hand_test_set

    src = write_keras(tmp_path / "quicknet_small_weights.h5", keras_model_layers(official))
    convert(src, tmp_path / "ours.pt", ["model=quicknet_small", "model.width=0.25"])
    data = ["data=synthetic", "data.num_classes=10", "data.image_size=32", "data.test_size=8"]
    result = evaluate(tmp_path / "ours.pt", [*data, "trainer.progress=plain"])
    images, labels = by_hand_test_set(make(*data))
    with torch.no_grad():
        logits = model_from_checkpoint(torch.load(tmp_path / "ours.pt", weights_only=True)).eval()(images)
    assert (result["images"], result["stage"]) == (8, "stage2")
    assert result["top1"] == pytest.approx((logits.argmax(1) == labels).float().mean().item() * 100)
    assert result["loss"] == pytest.approx(torch.nn.functional.cross_entropy(logits, labels).item(), rel=1e-5)
