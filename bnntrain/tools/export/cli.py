"""`python -m bnntrain.tools.export ckpt=PATH out=FILE [onnx=FILE] [openvino=DIR]`: a checkpoint's
packed 1-bit file (packed.py), and optionally its ONNX model (onnx.py) and its OpenVINO model
(openvino.py)."""
from __future__ import annotations

import io
import json
import math
from pathlib import Path
from typing import Any

import torch

from ...engine import load_checkpoint
from ...errors import ConfigError
from ...files import refuse_overwrite, same_file, save_tensors
from ...models import model_from_checkpoint
from ...run.config import run_tool, split_args
from ...run.folders import check_writable
from .onnx import export_onnx, require_onnx
from .openvino import export_openvino, require_openvino
from .packed import export_model

USAGE = "usage: python -m bnntrain.tools.export ckpt=PATH out=FILE [onnx=FILE.onnx] [openvino=DIR]"


def _nbytes(obj: Any) -> int:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.tell()


def _output(value: str, ckpt: Path, key: str) -> Path:
    """Where to write, checked before any work: an existing folder, never the checkpoint."""
    path = Path(value).expanduser()
    if path.is_dir():
        raise ConfigError(f"{key}={path} is a folder; give a file name")
    if not path.parent.is_dir():
        raise ConfigError(f"{key}={path}: the folder {path.parent} does not exist")
    refuse_overwrite(path, key, {"ckpt": ckpt})
    check_writable(path, key)
    return path


def export_checkpoint(ckpt: str | Path, out: str | Path) -> dict[str, int]:
    """Write the packed file of a checkpoint; return the sizes in bytes that `main` prints.

    Args:
        ckpt: the checkpoint.
        out: the packed file to write; not the checkpoint, in an existing folder.

    Returns:
        The sizes in bytes: `file` (the packed file), `checkpoint`, `fp32_weights` (the
            model's state dict), `binary_fp32` and `binary_packed` (the binary weights as float32
            and packed), `scales` (the per-channel scales).

    Raises:
        ConfigError: `out` is a folder or its folder does not exist.
        UserError: `out` is the checkpoint, or cannot be written.
        CheckpointError: the checkpoint is missing, unreadable or does not build.
    """
    ckpt = Path(ckpt).expanduser()
    out = _output(str(out), ckpt, "out")
    state = load_checkpoint(ckpt)
    model = model_from_checkpoint(state, str(ckpt))
    blob = export_model(model, state, str(ckpt))
    save_tensors(blob, out)
    packed = [v for k, v in blob["tensors"].items() if k.endswith(".weight_bits")]
    shapes = json.loads(blob["config"])["packed"].values()
    return {"file": out.stat().st_size, "checkpoint": ckpt.stat().st_size, "fp32_weights": _nbytes(state["model"]),
            "binary_fp32": 4 * sum(math.prod(s) for s in shapes), "binary_packed": sum(p.numel() for p in packed),
            "scales": sum(v.numel() * 4 for k, v in blob["tensors"].items() if k.endswith(".scale"))}


def _openvino_folder(value: str, out: Path, ckpt: Path) -> Path:
    """Where the OpenVINO model goes, checked before any work: a folder (made if missing, in an
    existing one) that holds no model yet."""
    folder = Path(value).expanduser()
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"openvino={folder} is a file; give a folder (the model is written as model.xml and model.bin)")
    if not folder.parent.is_dir():
        raise ConfigError(f"openvino={folder}: the folder {folder.parent} does not exist")
    if (folder / "model.xml").exists():
        raise ConfigError(f"openvino={folder} holds a model already ({folder / 'model.xml'}); give another folder")
    for name, path in (("out", out), ("ckpt", ckpt)):
        if same_file(folder / "model.bin", path) or same_file(folder / "model.xml", path):
            raise ConfigError(f"openvino={folder} would write over {name}={path}; give another folder")
    return folder


def _mb(n: int) -> str:
    return f"{n / 1e6:.3f} MB"


def run(argv: list[str]) -> None:
    """The command: write the packed file (and the ONNX model), and print their sizes.

    Args:
        argv: `ckpt=PATH out=FILE [onnx=FILE] [openvino=DIR]`.

    Raises:
        UserError: a missing or unknown argument, an output that is an input or cannot be
            written, `onnx=` or `openvino=` without the optional packages, or what
            `export_checkpoint` raises.
    """
    own, rest = split_args(argv, ("ckpt", "out", "onnx", "openvino"))
    if rest or "ckpt" not in own or "out" not in own:
        unknown = f"unknown argument(s): {' '.join(rest)}; " if rest else ""
        raise ConfigError(f"{unknown}expected ckpt=PATH out=FILE [onnx=FILE] [openvino=DIR]")
    ckpt = Path(own["ckpt"]).expanduser()
    out = _output(own["out"], ckpt, "out")
    onnx_path = _output(own["onnx"], ckpt, "onnx") if "onnx" in own else None
    if onnx_path is not None:  # before the work, not after it
        refuse_overwrite(onnx_path, "onnx", {"out": out})
        require_onnx()
    openvino = _openvino_folder(own["openvino"], out, ckpt) if "openvino" in own else None
    if openvino is not None:
        require_openvino()
    sizes = export_checkpoint(own["ckpt"], own["out"])
    file = sizes["file"]
    print(f"wrote {own['out']}: {_mb(file)}\n"
          f"  checkpoint {own['ckpt']}: {_mb(sizes['checkpoint'])}, {sizes['checkpoint'] / file:.1f}x the export "
          f"(it also holds the optimizer state)\n"
          f"  fp32 model weights: {_mb(sizes['fp32_weights'])}, {sizes['fp32_weights'] / file:.1f}x the export\n"
          f"  binary weights: {_mb(sizes['binary_fp32'])} as fp32, {_mb(sizes['binary_packed'])} packed "
          f"({sizes['binary_fp32'] / max(sizes['binary_packed'], 1):.1f}x), "
          f"plus {_mb(sizes['scales'])} of per-channel scales")
    if onnx_path is not None:
        export_onnx(own["out"], onnx_path)
        print(f"wrote {onnx_path}: {_mb(onnx_path.stat().st_size)}")
    if openvino is not None:
        layers = export_openvino(own["out"], openvino)
        left = "".join(f"; {n} stay float ({why})" for why, n in layers["left"].items())
        print(f"wrote {openvino / 'model.xml'}: {_mb((openvino / 'model.bin').stat().st_size)} of weights; "
              f"{layers['binarized']} of {layers['binary_layers']} binary layers run as OpenVINO's BinaryConvolution"
              f"{left}")


def main(argv: list[str] | None = None) -> None:
    """`python -m bnntrain.tools.export ...`: `run`, with `-h` printing the usage and an error printed as one
    `error:` line with exit status 2.

    Args:
        argv: the command's arguments; None reads `sys.argv[1:]`.
    """
    run_tool(run, argv, USAGE)
