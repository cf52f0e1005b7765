"""The inference model of a packed file as ONNX (the optional `export` extra)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from ...errors import UserError
from ...files import atomic_write, refuse_overwrite
from .packed import load


def require_onnx() -> None:
    # torch.onnx's exporter needs onnx and onnxscript, which are optional.
    if not all(importlib.util.find_spec(name) for name in ("onnx", "onnxscript")):
        raise UserError("onnx= needs the optional export packages: pip install 'bnntrain[export]'")


def export_onnx(packed: str | Path, path: Path) -> None:
    """The inference model of a packed file as ONNX: a sign is a comparison, a binary conv a
    standard Conv (ONNX has no 1-bit type, so its weights are float32 there).

    Args:
        packed: the packed file.
        path: the ONNX file to write, with a dynamic batch size.

    Raises:
        UserError: the optional export packages are missing, or `path` is the packed file.
        CheckpointError: the packed file is missing, unreadable or damaged.
    """
    require_onnx()
    path = Path(path)
    refuse_overwrite(path, "onnx", {"out": packed})  # the packed file it reads
    model = load(packed)
    config = model.export_config
    # A batch of 2, so that the exporter keeps the batch size symbolic.
    example = torch.zeros(2, config["in_channels"], config["image_size"], config["image_size"])
    program = torch.onnx.export(model, (example,), dynamo=True, verbose=False, input_names=["images"],
                                output_names=["logits"], dynamic_shapes=({0: torch.export.Dim("batch")},))
    # Saved beside the target and renamed over it: a full disk leaves an earlier file whole.
    atomic_write(path, lambda tmp: program.save(tmp, external_data=False))
