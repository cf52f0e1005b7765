"""The packed 1-bit file: `export_model` writes it, `read` and `load` read it.

The file (format `bnntrain-packed`, version 1) is a `torch.save` of a dict of strings,
integers and tensors only, read with `torch.load(FILE, weights_only=True)` (no code runs):
`format`, `version`; `config`, a JSON string (`model`, `num_classes`, `in_channels`,
`image_size`, `activations`, `weights`, `stage`, `checkpoint`, `packed` {layer: weight
shape}, `folded` {conv: BN folded into it}); `tensors`, the inference model's state dict
in which each binary-weight layer's weight is `<layer>.weight_bits` (uint8: the signs in
row-major order, 8 per byte, most significant bit first, 1 for +1 and 0 for -1, the last
byte zero-padded), beside its float32 `<layer>.scale` (one per output channel) and its
`threshold` and `bias` where it has them. Every other tensor is as trained. `checksum`
("sha256:<hex>" of all the other entries, see `bnntrain.files.checksum`) is checked on
reading: a file whose contents do not match it is refused as damaged; a file written before
checksums (still version 1) loads with a note.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ...engine import layout, load_model_weights
from ...engine.checkpoint import load_tensors
from ...errors import CheckpointError
from ...models import build_model
from ...nn.layers import binary_layers, set_precision
from .inference import InferenceBinaryLayer, to_inference

FORMAT = "bnntrain-packed"
"""The packed file's `format` entry."""
VERSION = 1
"""The version of the format this bnntrain writes and reads."""


def pack_signs(weight: Tensor) -> Tensor:
    """Signs of `weight` (w >= 0 -> 1), row-major, 8 per byte, most significant bit first.

    Args:
        weight: any tensor.

    Returns:
        uint8 on the CPU, ceil(weight.numel() / 8) bytes; the last one zero-padded.
    """
    bits = (weight.flatten() >= 0).to(torch.uint8)
    bits = torch.cat([bits, bits.new_zeros(-len(bits) % 8)])
    shifts = torch.arange(7, -1, -1, dtype=torch.uint8, device=bits.device)
    return (bits.view(-1, 8) << shifts).sum(1, dtype=torch.uint8).cpu()


def unpack_signs(packed: Tensor, shape: list[int]) -> Tensor:
    """The +1/-1 float32 tensor of `shape` that `pack_signs` packed.

    Args:
        packed: the bytes `pack_signs` returned.
        shape: the weight's shape.

    Returns:
        The signs as +1.0 and -1.0.

    Raises:
        CheckpointError: `packed` is not uint8 or holds another number of bytes.
    """
    n = math.prod(shape)
    if packed.dtype != torch.uint8 or packed.numel() != math.ceil(n / 8):
        raise CheckpointError(f"packed weights of {packed.numel()} bytes do not hold a {shape} weight")
    shifts = torch.arange(7, -1, -1, dtype=torch.uint8)
    bits = (packed.unsqueeze(1) >> shifts) & 1
    return bits.flatten()[:n].float().mul_(2).sub_(1).view(shape)


def _precision(model: nn.Module) -> tuple[str, str]:
    layer = next((layer for _, layer in binary_layers(model) if layer.binarize), None)
    return (layer.activations, layer.weights) if layer else ("real", "real")


def export_model(model: nn.Module, state: dict[str, Any], source: str) -> dict[str, Any]:
    """The packed file's dict for a model rebuilt from checkpoint `state` (the model is
    turned into its inference form on the way).

    Args:
        model: the model `model_from_checkpoint` rebuilt from `state`; changed in place.
        state: the checkpoint.
        source: the checkpoint's path, recorded in the file.

    Returns:
        The file's dict (`format`, `version`, `config`, `tensors`), which `save_tensors` writes.
    """
    activations, weights = _precision(model)
    folded = to_inference(model)
    packed_layers = {name for name, m in model.named_modules() if isinstance(m, InferenceBinaryLayer)
                     and m.binary_weights}
    tensors, packed = {}, {}
    for key, value in model.state_dict().items():
        layer, _, leaf = key.rpartition(".")
        if layer in packed_layers and leaf == "weight":
            tensors[f"{layer}.weight_bits"] = pack_signs(value)
            packed[layer] = list(value.shape)
        else:
            tensors[key] = value.detach().cpu().clone()  # a compact copy: torch.save writes whole storages
    config = {"model": layout.model_config(state), "num_classes": state["num_classes"],
              "in_channels": state["in_channels"], "image_size": layout.image_size(state), "activations": activations,
              "weights": weights, "stage": state["stage"], "checkpoint": str(source), "packed": packed,
              "folded": folded}
    return {"format": FORMAT, "version": VERSION, "config": json.dumps(config), "tensors": tensors}


def read(path: str | Path) -> dict[str, Any]:
    """The packed file's dict, checked to be one.

    Args:
        path: the packed file.

    Returns:
        Its dict, without the checksum entry.

    Raises:
        CheckpointError: the file is missing, unreadable, damaged, not a packed file, or of
            another version.
    """
    blob = load_tensors(path, "export file", expect_checksum=True)
    if not isinstance(blob, dict) or blob.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a {FORMAT} file")
    if blob.get("version") != VERSION:
        raise CheckpointError(f"{path} is version {blob.get('version')} of {FORMAT}; this bnntrain reads {VERSION}")
    return blob


def load(path: str | Path) -> nn.Module:
    """The inference model of a packed file, in eval mode, its outputs those of the checkpoint;
    `model.export_config` holds the file's config.

    Args:
        path: the packed file.

    Returns:
        The inference model, binary layers as `InferenceBinaryLayer`s.

    Raises:
        CheckpointError: the file is not a readable packed file, or does not fit the model its
            config builds.
    """
    blob = read(path)
    config = json.loads(blob["config"])
    model = build_model(config["model"], num_classes=config["num_classes"], in_channels=config["in_channels"])
    set_precision(model, config["activations"], config["weights"])
    if to_inference(model, check=False) != config["folded"]:
        raise CheckpointError(f"{path} folds BN differently from this bnntrain's {config['model']['name']}")
    tensors = dict(blob["tensors"])
    for layer, shape in config["packed"].items():
        tensors[f"{layer}.weight"] = unpack_signs(tensors.pop(f"{layer}.weight_bits"), shape)
    load_model_weights(model, tensors, path)
    model.export_config = config
    return model
