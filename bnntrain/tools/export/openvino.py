"""The inference model of a packed file as an OpenVINO model (IR, the optional `openvino` extra),
each +-1 x +-1 layer in the form OpenVINO's CPU plugin runs as `BinaryConvolution`.

OpenVINO has no sign operation of its own: its CPU plugin binarizes an activation when a
`FakeQuantize` with two levels and outputs -1/+1 feeds a `Convolution` whose weights are all
+-1, and then runs that convolution with its XNOR-popcount kernels. The model is converted
by OpenVINO's PyTorch frontend, and a FakeQuantize is put between each binary layer's sign
(`compare_sign`: a comparison and a select, +1 where x >= 0) and its convolution, before any
of OpenVINO's graph fusions could fold the layer's scale into its +-1 weights.

Why the FakeQuantize takes the signs, not the values. A FakeQuantize on the values themselves
(input bounds around 0, the usual way) is not the sign of training, measured in OpenVINO
2026.4: bounds of 0 and 0 give wrong sums; bounds of -1e-6 and +1e-6 map (0, 1e-9] to -1;
and OpenVINO folds a constant added in front (a threshold, BN's shift) into the bounds,
where tight bounds then meet and give wrong sums again. On the +-1 of the select, bounds of
-0.5 and +0.5 are exact whatever is folded around them, and the plugin fuses the comparison,
the select and the FakeQuantize into the pass that packs the bits
(tests/test_export_openvino.py checks the edges).

What stays a float convolution. OpenVINO's BinaryConvolution has no groups, and its CPU
kernels give wrong sums where a layer's input channels are not a multiple of 8 (measured in
2026.4, checked by a test): such layers, and binary linear layers, are left as they are (a
float convolution of the +-1 signs, exact but not binary); `export_openvino` says which.
"""
from __future__ import annotations

import importlib.util
import os
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ...errors import UserError
from ...files import refuse_overwrite
from .inference import InferenceBinaryLayer
from .packed import load

INPUT_LOW = np.float32(-0.5)
"""The binarizing FakeQuantize's input_low, on +-1 inputs (see the module's docstring)."""
INPUT_HIGH = np.float32(0.5)
"""The binarizing FakeQuantize's input_high."""


def require_openvino() -> Any:
    """The `openvino` module; it is an optional extra.

    Returns:
        The imported `openvino` package.

    Raises:
        UserError: openvino is not installed.
    """
    if importlib.util.find_spec("openvino") is None:
        raise UserError("openvino= needs OpenVINO: pip install 'bnntrain[openvino]'")
    import openvino
    return openvino


def _through_converts(value: Any) -> Any:
    """The output a node's input comes from, past any type conversions the frontend added."""
    while value.get_node().get_type_name() == "Convert":
        value = value.get_node().input_value(0)
    return value


def _constant(value: Any) -> np.ndarray | None:
    node = _through_converts(value).get_node()
    return node.get_data() if node.get_type_name() == "Constant" else None


def _sign_input(value: Any) -> Any | None:
    """x where `value` is compare_sign(x): Select(GreaterEqual(x, 0), +1, -1); else None."""
    select = _through_converts(value).get_node()
    if select.get_type_name() != "Select":
        return None
    compare = _through_converts(select.input_value(0)).get_node()
    if compare.get_type_name() != "GreaterEqual":
        return None
    zero, plus, minus = _constant(compare.input_value(1)), _constant(select.input_value(1)), _constant(select.input_value(2))
    if any(c is None for c in (zero, plus, minus)) or not (np.all(zero == 0) and np.all(plus == 1) and np.all(minus == -1)):
        return None
    return _through_converts(compare.input_value(0))


def binarize_signs(model: Any) -> int:
    """Put, in place, a FakeQuantize between each convolution with +-1 weights and the sign in
    front of it (padded or not), which the CPU plugin then runs as a `BinaryConvolution`;
    returns how many.

    Args:
        model: an `openvino.Model` converted from an inference model by the PyTorch frontend
            (before OpenVINO's fusions).

    Returns:
        The number of convolutions whose input is now binarized by a FakeQuantize.
    """
    import openvino.opset13 as ops

    count = 0
    for conv in [op for op in model.get_ops() if op.get_type_name() == "Convolution"]:
        weights = _constant(conv.input_value(1))
        if weights is None or weights.shape[1] % 8 or not np.all(np.abs(weights) == 1):
            continue
        signs = _through_converts(conv.input_value(0))
        # A sign padded with +-1 (larq's `pad_values`) is still +-1.
        unpadded = signs.get_node().input_value(0) if signs.get_node().get_type_name() == "Pad" else signs
        if _sign_input(unpadded) is None:
            continue
        binary = ops.fake_quantize(signs, INPUT_LOW, INPUT_HIGH, np.float32(-1), np.float32(1), 2)
        conv.input(0).replace_source_output(binary.output(0))
        count += 1
    return count


def to_openvino(model: nn.Module, example: torch.Tensor) -> tuple[Any, int]:
    """An inference model (`bnntrain.tools.export.load`) as an `openvino.Model` with its
    binary convolutions binarized (`binarize_signs`); a dynamic batch size.

    Args:
        model: the inference model, in eval mode.
        example: an input batch, for tracing.

    Returns:
        The OpenVINO model and the number of binary convolutions in it.

    Raises:
        UserError: openvino is not installed.
    """
    require_openvino()
    from openvino.frontend import FrontEndManager
    from openvino.frontend.pytorch.ts_decoder import TorchScriptPythonDecoder

    with torch.no_grad(), warnings.catch_warnings():
        # The frontend traces with torch.jit, which warns that it is deprecated: not the user's concern.
        warnings.filterwarnings("ignore", category=FutureWarning, message=".*torch.jit.trace")
        decoder = TorchScriptPythonDecoder(model, example_input=(example,))
    frontend = FrontEndManager().load_by_framework("pytorch")
    converted = frontend.convert(frontend.load(decoder))
    count = binarize_signs(converted)
    converted.reshape([-1, *example.shape[1:]])
    converted.inputs[0].get_tensor().set_names({"images"})
    converted.outputs[0].get_tensor().set_names({"logits"})
    return converted, count


def why_not_binary(layer: InferenceBinaryLayer) -> str | None:
    """Why OpenVINO cannot run a +-1 x +-1 layer as a BinaryConvolution (None: it can)."""
    if layer.conv is None:
        return "binary linear layers"
    if layer.conv["groups"] != 1:
        return "grouped convolutions (BinaryConvolution has no groups)"
    if layer.weight.shape[1] % 8:
        return "input channels not a multiple of 8 (OpenVINO's kernels sum those wrong)"
    return None


def binary_layers(model: nn.Module) -> dict[str, str | None]:
    """{name: why OpenVINO cannot run it as a BinaryConvolution, or None} for each layer of an
    inference model whose inputs and weights are both +-1."""
    return {name: why_not_binary(m) for name, m in model.named_modules()
            if isinstance(m, InferenceBinaryLayer) and m.binary_weights and m.activations == "binary"}


def export_openvino(packed: str | Path, folder: str | Path) -> dict[str, int]:
    """Write a packed file's inference model as an OpenVINO IR, `FOLDER/model.xml` and
    `FOLDER/model.bin` (float32 weights: compressing them to float16 would hide the +-1
    weights from the plugin's binarization).

    Args:
        packed: the packed file.
        folder: the folder to write into (made if missing); a model already there is refused.

    Returns:
        {"binary_layers": the number of +-1 x +-1 layers of the network, "binarized": of
            those written as FakeQuantize + Convolution, "left": {why not: how many} for the
            others (`why_not_binary`), which stay float convolutions (or MatMuls) of the signs}.

    Raises:
        UserError: openvino is not installed, or the folder holds a model already.
        CheckpointError: the packed file is missing, unreadable or damaged.
    """
    ov = require_openvino()
    folder = Path(folder).expanduser()
    xml = folder / "model.xml"
    if xml.exists():
        raise UserError(f"openvino={folder} holds a model already ({xml}); give another folder")
    refuse_overwrite(xml.with_suffix(".bin"), "openvino", {"out": packed})  # the file this reads
    model = load(packed)
    config = model.export_config
    example = torch.zeros(2, config["in_channels"], config["image_size"], config["image_size"])
    converted, count = to_openvino(model, example)
    layers = binary_layers(model)
    expected = sum(why is None for why in layers.values())
    if count != expected:  # a layer built in a way the graph rewrite does not recognise
        raise UserError(f"{packed}: {count} binary convolutions found in OpenVINO's graph where {expected} were "
                        f"expected; this network cannot be exported to OpenVINO yet")
    folder.mkdir(parents=True, exist_ok=True)
    # Saved under other names and renamed into place, the .bin first: an interrupted export
    # leaves no model.xml that reads a partial model.bin.
    part = folder / "model.part.xml"
    ov.save_model(converted, part, compress_to_fp16=False)
    os.replace(part.with_suffix(".bin"), xml.with_suffix(".bin"))
    os.replace(part, xml)
    left = Counter(why for why in layers.values() if why is not None)
    return {"binary_layers": len(layers), "binarized": count, "left": dict(left)}


def compile_openvino(model: Any, batch: int, threads: int) -> Any:
    """An OpenVINO model (or the path of its IR) compiled for the CPU at a fixed batch size,
    with float32 inference (no bfloat16 or float16 rounding) and `threads` threads.

    Args:
        model: an `openvino.Model`, or the path of `model.xml`.
        batch: the batch size (the CPU plugin's BinaryConvolution needs static shapes).
        threads: the inference threads.

    Returns:
        The compiled model.
    """
    ov = require_openvino()
    core = ov.Core()
    model = core.read_model(str(model)) if isinstance(model, (str, Path)) else model.clone()
    shape = model.inputs[0].get_partial_shape()
    model.reshape([batch, *[d.get_length() for d in list(shape)[1:]]])
    return core.compile_model(model, "CPU", {"INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": "f32",
                                             "PERFORMANCE_HINT": "LATENCY"})


def runtime_layer_types(compiled: Any) -> list[str]:
    """The layer types of a compiled model's runtime graph (what the plugin actually runs)."""
    return [op.get_rt_info()["layerType"].astype(str) for op in compiled.get_runtime_model().get_ops()]
