"""larq-zoo's Keras HDF5 weights of Real-to-Binary Net (`r2b_weights.h5`, its release r2b-v0.1.0)
through `bnntrain.tools.convert model=real_to_binary`, without TensorFlow: files written in
Keras's legacy HDF5 layout from the official network of test_real_to_binary.py, with the layer
names larq-zoo's code gives, in the order Keras's functional model lists them (which is not our
module order: the layers are paired by name); the converted network's logits are the official
network's in float64, every layer of the full-size network is accounted for, and a file that
does not fit is one line naming what."""
import copy

import numpy as np
import pytest
import torch

from conftest import main_in_process, need
from test_config import make
from test_convert_keras import write_keras
from test_errors import assert_one_line_error
from test_real_to_binary import KERAS_PARAMS, OfficialRealToBinNet

from bnntrain.models import build_model, model_from_checkpoint
from bnntrain.tools.convert import convert
from bnntrain.tools.convert import main as convert_main
from bnntrain.tools.keras_weights import KERAS_RULES, keras_layers, keras_state

h5py = need("h5py", extra="keras")

WIDTH = 0.25  # model.width: 16 stem channels, each gate at least 2 wide (larq-zoo's cin // 8)
OVERRIDES = ["model=real_to_binary", f"model.width={WIDTH}"]


def keras_order(graph, output):
    """The layers as a Keras functional model lists them, so as save_weights writes them
    (keras/engine/functional.py, _map_graph_network): deepest first, a layer's depth its longest
    path to the output; ties in the order a depth-first walk from the output first reaches them."""
    reached, finished = {}, []

    def walk(name):
        if name not in reached:
            reached[name] = len(reached)
            for inbound in graph[name][0]:
                walk(inbound)
            finished.append(name)

    walk(output)
    depth = dict.fromkeys(finished, 0)
    for name in reversed(finished):  # consumers before the layers they read
        for inbound in graph[name][0]:
            depth[inbound] = max(depth[inbound], depth[name] + 1)
    return sorted(finished, key=lambda name: (-depth[name], reached[name]))


def keras_model_layers(net, prefix="r2b_bnn", order="keras"):
    """(name, [(weight name, array)]) for every layer of larq-zoo's RealToBinaryNet
    (real_to_bin_nets.py, the names it gives), in Keras's order or in the order the code makes
    them, each array in Keras's layout; arrays of a meta-device net stay meta."""
    graph = {}  # name: (the layers it reads, its arrays), in the order the code makes them

    def add(name, inputs, **arrays):
        graph[name] = (inputs, [(f"{name}/{key}:0", value) for key, value in arrays.items()])
        return name

    def bn(name, inputs, norm):
        return add(name, inputs, gamma=norm.gamma, beta=norm.beta, moving_mean=norm.moving_mean,
                   moving_variance=norm.moving_var)

    def pool(name, inputs):  # larq_zoo.core.utils.global_pool: AveragePooling2D and Flatten
        return add(f"{name}_flatten", [add(f"{name}_pool", inputs)])

    conv, norm, alpha = net.stem
    first = f"{prefix}_block_1"
    x = add(f"{first}_conv2d", [add("input_1", [])], kernel=conv.w.permute(2, 3, 1, 0))
    x = add(f"{first}_prelu", [bn(f"{first}_batch_norm", [x], norm)], alpha=alpha.w.reshape(1, 1, -1))
    x = add(f"{first}_pool", [x])
    for i, half in enumerate(net.halves):
        block, name = i // 2 + 2, f"{prefix}_block_{i // 2 + 2}{'ab'[i % 2]}"
        shortcut = x
        if half.shortcut is not None:
            s = add(f"{name}_shortcut_pool", [x])
            s = add(f"{name}_shortcut_conv2d", [s], kernel=half.shortcut[0].w.permute(2, 3, 1, 0))
            shortcut = bn(f"{name}_shortcut_batch_norm", [s], half.shortcut[1])
        real = bn(f"{name}_batch_norm", [x], half.bn)
        out = add(f"{name}_conv2d", [real], kernel=half.conv.w.permute(2, 3, 1, 0))
        z = add(f"{name}_scaling_dense_reduce", [pool(f"{name}_scaling_pool", [real])], kernel=half.reduce.w.T)
        z = add(f"{name}_scaling_dense_expand", [z], kernel=half.expand.w.T)
        y = add(f"{name}_scaling_multiplication", [out, add(f"{name}_scaling_reshape", [z])])
        x = add(f"{name}_skip_add", [add(f"{name}_prelu", [y], alpha=half.alpha.w.reshape(1, 1, -1)), shortcut])
        if i % 2:
            x = add(f"{prefix}_block_{block}_out", [x])
    x = add(f"{prefix}_block_10_logits", [pool(f"{prefix}_block_10_global_pool", [x])],
            kernel=net.dense.weight.T, bias=net.dense.bias)
    names = keras_order(graph, add(f"{prefix}_block_10_probs", [x])) if order == "keras" else list(graph)
    return [(name, graph[name][1]) for name in names]


def randomized(net):
    """Random weights, slopes and statistics, float32 values (as a Keras file holds them); a few
    latent binary weights exactly 0, which larq's sign makes +1, as bnntrain's."""
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.endswith("gamma"):
                p.uniform_(0.5, 1.5)
            elif p.dim() > 1:  # kernels, the gates' and the classifier's weights
                p.normal_(0, (2 / p[0].numel()) ** 0.5)
            else:  # BN shifts, PReLU slopes, the classifier's bias
                p.uniform_(-0.5, 0.5)
        for name, b in net.named_buffers():
            b.normal_(0, 0.1) if name.endswith("mean") else b.uniform_(0.5, 1.5)
        net.halves[0].conv.w.view(-1)[:3] = 0
    return net


@pytest.fixture(scope="module")
def official():
    """larq-zoo's network at a quarter of the width, with 10 classes."""
    return randomized(OfficialRealToBinNet(round(64 * WIDTH), num_classes=10)).eval()


@pytest.mark.parametrize("order, whole_model", [("keras", False), ("creation", True)],
                         ids=["save_weights-keras-order", "save-creation-order"])
def test_a_converted_keras_file_gives_the_official_logits(order, whole_model, official, tmp_path):
    layers = keras_model_layers(official, order=order)
    weighted = [name for name, arrays in layers if arrays]
    if order == "keras":  # not our module order: the gate's Dense layers come before the conv they scale
        assert weighted.index("r2b_bnn_block_4a_scaling_dense_expand") < weighted.index("r2b_bnn_block_4a_conv2d") \
            < weighted.index("r2b_bnn_block_4a_shortcut_conv2d")
    src = write_keras(tmp_path / "r2b_weights.h5", layers, whole_model)
    ckpt, zeros = convert(src, tmp_path / "ours.pt", OVERRIDES)
    assert zeros is None and (ckpt["stage"], ckpt["epoch"], ckpt["num_classes"], ckpt["in_channels"]) == \
        ("stage2", 0, 10, 3)
    assert ckpt["precision"] == {"activations": "binary", "weights": "binary"}
    ours = model_from_checkpoint(torch.load(tmp_path / "ours.pt", weights_only=True)).double().eval()
    want_net = copy.deepcopy(official).double()
    for size in (64, 57):  # even maps (TensorFlow pads the strided convs after only) and odd ones
        x = torch.randn(2, 3, size, size, dtype=torch.float64, generator=torch.Generator().manual_seed(size))
        with torch.no_grad():
            want, got = want_net(x), ours(x)
        assert want.std() > 1e-3  # the logits depend on the input
        torch.testing.assert_close(got, want, rtol=0, atol=1e-10)


def test_every_layer_of_the_full_network_is_accounted_for(tmp_path):
    """Full size, shapes only (HDF5 stores no data for an array never written): larq-zoo's
    published parameter count, and a layer of the file for every module of ours, one to one."""
    with torch.device("meta"):
        layers = keras_model_layers(OfficialRealToBinNet())
    assert sum(np.prod(value.shape) for _, arrays in layers for _, value in arrays) == KERAS_PARAMS
    write_keras(tmp_path / "r2b_weights.h5", layers)
    with torch.device("meta"):
        model = build_model(make("model=real_to_binary", "data=imagenet").model, num_classes=1000, in_channels=3)
    model.to_empty(device="cpu")
    with keras_layers(tmp_path / "r2b_weights.h5") as read:
        assert [layer.name for layer in read] == [name for name, arrays in layers if arrays]
        mapped = keras_state(read, model, KERAS_RULES["real_to_binary"])
    assert mapped.keys() == model.state_dict().keys()
    assert not any(v.any() for k, v in mapped.items() if not k.endswith("num_batches_tracked"))


def edited(layers, name, change):
    """The layers with layer `name`'s list of arrays changed by `change` (None drops the layer)."""
    out = [(n, change(list(arrays)) if n == name else arrays) for n, arrays in layers]
    return [(n, arrays) for n, arrays in out if arrays is not None]


B2A = "r2b_bnn_block_2a"
CASES = {  # the file's change, overrides beyond OVERRIDES: what the one-line error says
    "an array missing": (lambda ls: edited(ls, "r2b_bnn_block_3a_batch_norm", lambda a: a[:3]), [],
                         "the Keras layer r2b_bnn_block_3a_batch_norm has nothing for blocks.1.a.norm.running_var "
                         "(it holds gamma, beta, moving_mean)"),
    "a gate with a bias": (
        lambda ls: edited(ls, f"{B2A}_scaling_dense_reduce",
                          lambda a: a + [(f"{B2A}_scaling_dense_reduce/bias:0", torch.zeros(2))]), [],
        f"{B2A}_scaling_dense_reduce/bias:0 has no place in blocks.0.a.scale.reduce (Linear, which takes kernel "
        f"from Keras)"),
    "a gate kernel in PyTorch's layout": (
        lambda ls: edited(ls, f"{B2A}_scaling_dense_expand", lambda a: [(a[0][0], a[0][1].T)]), [],
        f"{B2A}_scaling_dense_expand/kernel:0 has shape (16, 2), where blocks.0.a.scale.expand.weight (16, 2) "
        f"takes (2, 16)"),
    "a PReLU slope in PyTorch's layout": (
        lambda ls: edited(ls, "r2b_bnn_block_1_prelu", lambda a: [(a[0][0], a[0][1].reshape(-1))]), [],
        "r2b_bnn_block_1_prelu/alpha:0 has shape (16,), where stem.act.weight (16,) takes (1, 1, 16)"),
    "the shortcut's BN missing": (lambda ls: edited(ls, "r2b_bnn_block_4a_shortcut_batch_norm", lambda a: None), [],
                                  "no layer of the Keras file is for 1 of this model's layers: blocks.2.a.shortcut.2"),
    "no top (r2b_weights_notop.h5)": (
        lambda ls: edited(ls, "r2b_bnn_block_10_logits", lambda a: None), [],
        "is for 1 of this model's layers: classifier (a *_notop file holds no classifier"),
    "another network's layer": (lambda ls: ls + [("quant_conv2d_3", [("quant_conv2d_3/kernel:0", torch.zeros(1))])],
                                [], "the Keras layer quant_conv2d_3 has no place in this model (another network?)"),
    "a shortcut where there is none": (
        lambda ls: ls + [(f"{B2A}_shortcut_conv2d", [(f"{B2A}_shortcut_conv2d/kernel:0", torch.zeros(1, 1, 16, 16))])],
        [], f"the Keras layer {B2A}_shortcut_conv2d is for blocks.0.a.shortcut.1, which this model does not have"),
    "two layers for one module": (
        lambda ls: ls + [("r2b_ban_block_2a_prelu", [("r2b_ban_block_2a_prelu/alpha:0", torch.zeros(1, 1, 16))])],
        [], "the Keras layers r2b_bnn_block_2a_prelu and r2b_ban_block_2a_prelu are both for blocks.0.a.act"),
    "a tensor of ours Keras does not hold": (
        lambda ls: ls, ["model.learnable_threshold=true"],
        "no Keras array fills 16 of this model's tensors: blocks.0.a.conv.threshold, blocks.0.b.conv.threshold"),
}


@pytest.mark.parametrize("case", CASES)
def test_a_file_that_does_not_fit_is_one_line_naming_it(case, official, tmp_path):
    change, overrides, message = CASES[case]
    src = write_keras(tmp_path / "r2b_weights.h5", change(keras_model_layers(official)))
    out = main_in_process(convert_main, ["bnntrain.tools.convert", f"src={src}", f"out={tmp_path / 'ours.pt'}",
                                         *OVERRIDES, *overrides])
    assert_one_line_error(out, message)
    assert not (tmp_path / "ours.pt").exists()
