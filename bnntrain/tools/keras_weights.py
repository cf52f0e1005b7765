"""Keras HDF5 weight files (larq-zoo's released QuickNets and Real-to-Binary Net) as bnntrain
state dicts, read with h5py alone (the `keras` extra): no TensorFlow.

The layout is Keras's legacy HDF5 one, as `model.save_weights("x.h5")` (Keras 2, tf.keras, and
Keras 3's legacy writer) or, under a `model_weights` group, `model.save("x.h5")` writes it: the
attribute `layer_names` lists every layer in the model's order (split into `layer_names0`, ...
when long); each layer's group lists its arrays in `weight_names` (Keras 2: `conv/kernel:0`,
Keras 3: `conv/kernel`), trainable ones first. Keras loads such a file by position, the n-th
layer with weights into the n-th such layer of the model; so does this module where the Keras
names are automatic (QuickNet's `batch_normalization_7`), pairing them with the modules of ours
the network's rules pick, in order. Where the network's code names its layers (Real-to-Binary
Net's `r2b_bnn_block_2a_conv2d`), each layer is paired by its name, wherever it is in the file
(the tables: keras_rules.py). Each array, named by its last part (`kernel`, `alpha`, ...), fills
one tensor of ours: Conv2D kernels (kh, kw, in, out) become (out, in, kh, kw), DepthwiseConv2D
kernels (kh, kw, in, mult) (in * mult, 1, kh, kw), Dense kernels are transposed, PReLU slopes
(1, 1, C) become (C,). A fixed tensor of ours that is not saved (QuickNet's blur kernel) is
compared, not loaded. Every shape is checked before its array is read; an array with no place,
a layer left over on either side (or two for one module) or a tensor of ours left unfilled is
an error naming it.
"""
from __future__ import annotations

import contextlib
import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch import Tensor, nn

from ..errors import CheckpointError, ConfigError
from .keras_rules import KERAS_RULES  # noqa: F401 (convert.py reads the tables here)
from .keras_rules import Layout, Named, Rules, by_name, by_order

HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"  # at offset 0 in every file h5py (so Keras) writes

@dataclass
class KerasLayer:
    """One layer of a Keras weight file that holds arrays.

    Attributes:
        name: the layer's name in the file (`quant_conv2d_3`).
        arrays: its arrays in the file's order: the name Keras gave each
            (`quant_conv2d_3/kernel:0`) and its h5py dataset, read only once its shape is checked.
    """

    name: str
    arrays: list[tuple[str, Any]] = field(default_factory=list)


def is_hdf5(path: str | Path) -> bool:
    """Whether `path` is an HDF5 file: its first 8 bytes are HDF5's signature (the suffix says nothing).

    Args:
        path: the file; a missing or unreadable one is not HDF5.

    Returns:
        True for an HDF5 file.
    """
    try:
        with open(path, "rb") as f:
            return f.read(len(HDF5_SIGNATURE)) == HDF5_SIGNATURE
    except OSError:
        return False


def attribute_list(group: Any, name: str) -> list[str]:
    """A list attribute as Keras writes it: whole, or split into `name0`, `name1`, ... when long."""
    chunks = itertools.takewhile(lambda key: key in group.attrs, (f"{name}{i}" for i in itertools.count()))
    parts = [group.attrs[key] for key in ([name] if name in group.attrs else chunks)]
    return [v.decode("utf8", "replace") if isinstance(v, bytes) else str(v) for part in parts
            for v in np.atleast_1d(part)]


def read_layers(root: Any, path: Path) -> list[KerasLayer]:
    """The layers under `root` that hold arrays, in `layer_names`' order; an array that no layer
    lists (Keras 3's model-level weights among them) is an error naming it."""
    import h5py

    layers, listed = [], set()
    for name in attribute_list(root, "layer_names"):
        group = root.get(name)
        if not isinstance(group, h5py.Group):
            raise CheckpointError(f"{path}: layer_names lists {name}, which the file has no group for")
        layer = KerasLayer(name)
        for weight in attribute_list(group, "weight_names"):
            if not isinstance(group.get(weight), h5py.Dataset):
                raise CheckpointError(f"{path}: layer {name} lists {weight}, which the file does not hold")
            layer.arrays.append((weight, group[weight]))
            listed.add(group[weight].name)
        if layer.arrays:
            layers.append(layer)
    stray: list[str] = []
    root.visititems(lambda key, obj: stray.append(obj.name) if isinstance(obj, h5py.Dataset)
                    and obj.name not in listed else None)
    if stray:
        raise CheckpointError(f"{path} holds {len(stray)} array(s) that no layer lists, which Keras would not load "
                              f"and convert does not place: {', '.join(stray[:3])}{' ...' if len(stray) > 3 else ''}")
    return layers


@contextlib.contextmanager
def keras_layers(path: str | Path) -> Iterator[list[KerasLayer]]:
    """The layers of a Keras HDF5 weight file that hold arrays, in the model's order, the file
    open while the arrays are read.

    Args:
        path: a file of `model.save_weights(...h5)` or `model.save(...h5)` (then its
            `model_weights` group is read).

    Yields:
        The layers, each with its named arrays.

    Raises:
        ConfigError: h5py is not installed.
        CheckpointError: the file is missing, not HDF5, not in Keras's layout, or lists an array
            it does not hold (or holds one it does not list).
    """
    path = Path(path).expanduser()
    try:
        import h5py
    except ImportError:
        raise ConfigError(f"{path} is an HDF5 (Keras) weight file; reading it needs h5py: "
                          f"pip install -e '.[keras]'") from None
    if not path.is_file():
        raise CheckpointError(f"official checkpoint {path} does not exist")
    if not is_hdf5(path):
        raise CheckpointError(f"{path} is not an HDF5 file (larq-zoo's weights are Keras HDF5 files, *_weights.h5)")
    try:
        f = h5py.File(path, "r")
    except OSError as err:
        raise CheckpointError(f"{path} is not a readable HDF5 file ({str(err).splitlines()[0]})") from None
    with f:
        root = f if "layer_names" in f.attrs or "layer_names0" in f.attrs else f.get("model_weights")
        if root is None or not ("layer_names" in root.attrs or "layer_names0" in root.attrs):
            raise CheckpointError(f"{path} is HDF5 but not a Keras weight file: no layer_names, at the root or "
                                  f"under model_weights (Keras 3's .weights.h5 layout is not read)")
        try:
            layers = read_layers(root, path)
        except (OSError, KeyError, ValueError) as err:  # a damaged file, or a link to another file, fails here
            raise CheckpointError(f"{path} is not a readable Keras weight file ({str(err).splitlines()[0]})") from None
        yield layers


def last_part(weight: str) -> str:
    """`quant_conv2d_3/kernel:0` -> `kernel`."""
    return weight.rpartition("/")[2].partition(":")[0]


def keras_sizes(layers: list[KerasLayer], max_classes: int, max_channels: int) -> tuple[int, int]:
    """(classes, input channels) as the file holds them: the last 2-D `kernel`'s outputs and the
    first 4-D `kernel`'s inputs, bounded before a model of that size is built; 1000 and 3 where
    there is none (the pairing then names what is missing).

    Args:
        layers: the file's layers.
        max_classes: the most classes taken.
        max_channels: the most input channels taken.

    Returns:
        The number of classes and of input channels.

    Raises:
        CheckpointError: a count above its bound.
    """
    kernels = [(w, tuple(a.shape)) for layer in layers for w, a in layer.arrays if last_part(w) == "kernel"]
    dense = [(w, s, s[1]) for w, s in kernels if len(s) == 2][-1:]
    conv = [(w, s, s[2]) for w, s in kernels if len(s) == 4][:1]
    counts = []
    for found, limit, what, default in ((dense, max_classes, "classes", 1000),
                                        (conv, max_channels, "input channels", 3)):
        weight, shape, count = found[0] if found else ("", (), default)
        if not 1 <= count <= limit:
            raise CheckpointError(f"{weight} has shape {shape}: {count} {what}, where convert takes 1 to {limit}")
        counts.append(int(count))
    return counts[0], counts[1]


def keras_shape(layout: str, shape: tuple[int, ...], module: nn.Module) -> tuple[int, ...]:
    """The Keras shape of a tensor of ours of `shape`."""
    if layout == "conv":
        return (*shape[2:], shape[1], shape[0])
    if layout == "depthwise":  # ours (in * mult, 1, kh, kw) with `groups` = in
        groups = getattr(module, "groups", shape[0])
        return (*shape[2:], groups, shape[0] // groups)
    if layout == "prelu":  # one slope per channel, shared over the map
        return (1, 1, *shape)
    return shape[::-1] if layout == "dense" else shape


def to_torch(layout: str, array: np.ndarray) -> Tensor:
    """A Keras array in PyTorch's layout."""
    if layout == "conv":
        array = array.transpose(3, 2, 0, 1)
    elif layout == "depthwise":
        kh, kw, channels, mult = array.shape
        array = array.transpose(2, 3, 0, 1).reshape(channels * mult, 1, kh, kw)
    elif layout == "dense":
        array = array.T
    elif layout == "prelu":
        array = array.reshape(-1)
    return torch.from_numpy(np.ascontiguousarray(array))


def takes(module: nn.Module, attr: str) -> bool:
    """Whether the module has the tensor `attr` (a BN without scale or shift has `weight` None)."""
    return isinstance(getattr(module, attr, None), Tensor)


def fill(layer: KerasLayer, name: str, module: nn.Module, layout: Layout,
         saved: dict[str, Tensor]) -> dict[str, Tensor]:
    """Our tensors of `module` (called `name`) from one Keras layer, each array's shape and
    dtype checked before it is read; a fixed tensor of ours that is not saved is compared."""
    out: dict[str, Tensor] = {}
    for weight, dataset in layer.arrays:
        label = weight if weight.startswith(f"{layer.name}/") else f"{layer.name}/{weight}"
        attr, kind = layout.get(last_part(weight), (None, None))
        own = getattr(module, attr) if attr and takes(module, attr) else None
        if own is None:
            raise CheckpointError(f"{label} has no place in {name} ({type(module).__name__}, which takes "
                                  f"{', '.join(k for k, (a, _) in layout.items() if takes(module, a))} from Keras)")
        key, expected = f"{name}.{attr}", keras_shape(kind, tuple(own.shape), module)
        if key in out:
            raise CheckpointError(f"{label}: layer {layer.name} holds a second {last_part(weight)}")
        if tuple(dataset.shape) != expected:
            raise CheckpointError(f"{label} has shape {tuple(dataset.shape)}, where {key} {tuple(own.shape)} takes "
                                  f"{expected}")
        if dataset.dtype.kind != "f":
            raise CheckpointError(f"{label} is {dataset.dtype}, where {key} is {own.dtype}")
        try:
            value = to_torch(kind, dataset[()])
        except OSError as err:  # a damaged file fails when the array is read
            raise CheckpointError(f"{label} cannot be read ({str(err).splitlines()[0]})") from None
        if key not in saved and not torch.equal(value.double(), own.double()):
            raise CheckpointError(f"{label} differs from {key}, which this model fixes (not a learned tensor)")
        out[key] = value.to(own.dtype)
    unfilled = [f"{name}.{a}" for k, (a, _) in layout.items() if f"{name}.{a}" in saved and f"{name}.{a}" not in out]
    if unfilled:
        raise CheckpointError(f"the Keras layer {layer.name} has nothing for {', '.join(unfilled)} (it holds "
                              f"{', '.join(last_part(w) for w, _ in layer.arrays)})")
    return {k: v for k, v in out.items() if k in saved}


def keras_state(layers: list[KerasLayer], model: nn.Module, rules: Rules | Named) -> dict[str, Tensor]:
    """The state dict of `model` from a Keras file's layers: by order, the n-th layer with
    arrays fills the n-th module of ours that `rules` pick (in module order), or, for `Named`
    rules, each layer the module its name picks; BN batch counters, which Keras does not keep,
    are ours as built.

    Args:
        layers: the file's layers, as `keras_layers` yields them.
        model: the network to fill (read, not changed).
        rules: the network's table in keras_rules.py.

    Returns:
        A tensor for every key of the model's state dict.

    Raises:
        CheckpointError: a layer left over on either side (or two for one module), an array
            with no place, a shape or dtype that is not ours, a fixed tensor that differs, or a
            tensor of ours left unfilled.
    """
    saved = model.state_dict()
    pairs = by_name(layers, model, rules) if isinstance(rules, Named) else by_order(layers, model, rules)
    out: dict[str, Tensor] = {}
    for layer, (name, module, layout) in pairs:
        out.update(fill(layer, name, module, layout, saved))
    unfilled = [k for k in saved if k not in out and not k.endswith("num_batches_tracked")]
    if unfilled:
        raise CheckpointError(f"no Keras array fills {len(unfilled)} of this model's tensors: "
                              f"{', '.join(unfilled[:3])}{' ...' if len(unfilled) > 3 else ''}")
    return {k: out.get(k, v) for k, v in saved.items()}
