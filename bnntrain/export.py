"""Packed 1-bit export: `python -m bnntrain.export ckpt=PATH out=FILE [onnx=FILE]`, and `load(FILE)`.

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

BN is folded where that is exact: into a real-valued conv that it directly follows
(the stem's conv and BN, each shortcut's 1x1 conv and BN). A BN in front of a sign, after
a pooling layer or after a binary conv stays a BN.
"""
from __future__ import annotations

import importlib.util
import io
import json
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import run_tool, split_args
from .engine import layout, load_checkpoint, load_model_weights
from .engine.checkpoint import load_tensors
from .errors import CheckpointError, ConfigError, UserError
from .files import atomic_write, refuse_overwrite, save_tensors
from .models import build_model, model_from_checkpoint
from .nn.layers import BinaryMixin, binary_layers, set_precision
from .nn.quantizers import PRECISION_MODES, sign
from .runs import check_writable

FORMAT, VERSION = "bnntrain-packed", 1
USAGE = "usage: python -m bnntrain.export ckpt=PATH out=FILE [onnx=FILE.onnx]"


def compare_sign(x: Tensor) -> Tensor:
    """sign with sign(0) = +1 as a comparison and a select (ONNX's GreaterOrEqual and Where;
    ONNX has no copysign). It differs from training's sign only on IEEE negative zero."""
    return torch.where(x >= 0, 1.0, -1.0).to(x.dtype)


# What a binary layer does to its input, per activation mode, in plain ops rather than the
# training quantizers' autograd Functions, so that ONNX sees standard operators.
INPUT_FUNCTIONS = {"binary": compare_sign, **PRECISION_MODES}


class InferenceBinaryLayer(nn.Module):
    """A binary conv or linear layer for inference. Binary weights are held as their signs
    (+-1), with the per-channel scale (the training forward's mean |w|) beside them."""

    def __init__(self, layer: BinaryMixin) -> None:
        super().__init__()
        self.activations = layer.activations
        self.binary_weights = layer.weights == "binary"
        self.conv = ({"stride": layer.stride, "padding": layer.padding, "dilation": layer.dilation,
                      "groups": layer.groups} if isinstance(layer, nn.Conv2d) else None)
        weight = layer.quantized_weight().detach().clone()
        scale = None
        if self.binary_weights and layer.weight_quantizer.channel_scaled:
            # |sign(w) x s| is s itself: the scale is read back bit for bit.
            scale = weight.abs().flatten(1)[:, :1].reshape(-1, *[1] * (weight.dim() - 1)).clone()
        self.register_buffer("weight", sign(weight) if self.binary_weights else weight)
        self.register_buffer("scale", scale)
        self.register_buffer("threshold", None if layer.threshold is None else layer.threshold.detach().clone())
        self.register_buffer("bias", None if layer.bias is None else layer.bias.detach().clone())

    def extra_repr(self) -> str:
        kind = "conv" if self.conv is not None else "linear"
        bits = "1-bit" if self.binary_weights else "32-bit"
        return f"{kind} {tuple(self.weight.shape)}, {bits} weights, {self.activations} input"

    def forward(self, x: Tensor) -> Tensor:
        if self.threshold is not None:
            x = x + self.threshold
        x = INPUT_FUNCTIONS[self.activations](x)
        if not (self.binary_weights and self.activations == "binary"):
            weight = self.weight if self.scale is None else self.weight * self.scale
            return F.linear(x, weight, self.bias) if self.conv is None else F.conv2d(x, weight, self.bias, **self.conv)
        # +-1 inputs and weights: the conv's sums are whole numbers, exact in float32 in any
        # order; the scale and bias then apply once each, as a binary engine does it
        # (bnntrain.infer's outputs are these, bit for bit).
        out = F.linear(x, self.weight) if self.conv is None else F.conv2d(x, self.weight, None, **self.conv)
        shape = (1, -1) + (1,) * (out.dim() - 2)
        if self.scale is not None:
            out = out * self.scale.reshape(shape)
        return out if self.bias is None else out + self.bias.reshape(shape)


def _fold(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """conv followed by BN in eval mode, as one conv: w k and (b - mean) k + beta, k = gamma / std."""
    gamma = bn.weight if bn.weight is not None else torch.ones_like(bn.running_mean)
    beta = bn.bias if bn.bias is not None else torch.zeros_like(bn.running_mean)
    k = gamma.double() / torch.sqrt(bn.running_var.double() + bn.eps)
    bias = conv.bias.double() if conv.bias is not None else torch.zeros_like(k)
    folded = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                       conv.dilation, conv.groups, bias=True, padding_mode=conv.padding_mode)
    with torch.no_grad():
        folded.weight.copy_(conv.weight.double() * k.view(-1, 1, 1, 1))
        folded.bias.copy_((bias - bn.running_mean.double()) * k + beta.double())
    return folded.to(conv.weight.device)


def fold_batchnorms(model: nn.Module) -> dict[str, str]:
    """Fold every BN that directly follows a real-valued conv in a sequential container
    (the only place where the data flow from one to the other is certain); returns {conv: bn}."""
    folded = {}
    for name, seq in [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Sequential)]:
        prefix = f"{name}." if name else ""
        for i in range(len(seq) - 1):
            conv, bn = seq[i], seq[i + 1]
            if type(conv) is nn.Conv2d and isinstance(bn, nn.BatchNorm2d) and bn.running_mean is not None:
                seq[i], seq[i + 1] = _fold(conv, bn), nn.Identity()
                folded[f"{prefix}{i}"] = f"{prefix}{i + 1}"
    return folded


def to_inference(model: nn.Module) -> dict[str, str]:
    """Turn a trained model, in place, into its inference form: binary layers of plain ops,
    BN folded where exact, eval mode. Returns the folded {conv: bn}."""
    model.eval()
    for name, layer in list(binary_layers(model)):
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, InferenceBinaryLayer(layer))
    folded = fold_batchnorms(model)
    model.requires_grad_(False)
    return folded


def pack_signs(weight: Tensor) -> Tensor:
    """Signs of `weight` (w >= 0 -> 1), row-major, 8 per byte, most significant bit first."""
    bits = (weight.flatten() >= 0).to(torch.uint8)
    bits = torch.cat([bits, bits.new_zeros(-len(bits) % 8)])
    shifts = torch.arange(7, -1, -1, dtype=torch.uint8, device=bits.device)
    return (bits.view(-1, 8) << shifts).sum(1, dtype=torch.uint8).cpu()


def unpack_signs(packed: Tensor, shape: list[int]) -> Tensor:
    """The +1/-1 float32 tensor of `shape` that `pack_signs` packed."""
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
    turned into its inference form on the way)."""
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
    """The packed file's dict, checked to be one."""
    blob = load_tensors(path, "export file", expect_checksum=True)
    if not isinstance(blob, dict) or blob.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a {FORMAT} file")
    if blob.get("version") != VERSION:
        raise CheckpointError(f"{path} is version {blob.get('version')} of {FORMAT}; this bnntrain reads {VERSION}")
    return blob


def load(path: str | Path) -> nn.Module:
    """The inference model of a packed file, in eval mode, its outputs those of the checkpoint;
    `model.export_config` holds the file's config."""
    blob = read(path)
    config = json.loads(blob["config"])
    model = build_model(config["model"], num_classes=config["num_classes"], in_channels=config["in_channels"])
    set_precision(model, config["activations"], config["weights"])
    if to_inference(model) != config["folded"]:
        raise CheckpointError(f"{path} folds BN differently from this bnntrain's {config['model']['name']}")
    tensors = dict(blob["tensors"])
    for layer, shape in config["packed"].items():
        tensors[f"{layer}.weight"] = unpack_signs(tensors.pop(f"{layer}.weight_bits"), shape)
    load_model_weights(model, tensors, path)
    model.export_config = config
    return model


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
    """Write the packed file of a checkpoint; return the sizes in bytes that `main` prints."""
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


def _require_onnx() -> None:
    # torch.onnx's exporter needs onnx and onnxscript, which are optional.
    if not all(importlib.util.find_spec(name) for name in ("onnx", "onnxscript")):
        raise UserError("onnx= needs the optional export packages: pip install 'bnntrain[export]'")


def export_onnx(packed: str | Path, path: Path) -> None:
    """The inference model of a packed file as ONNX: a sign is a comparison, a binary conv a
    standard Conv (ONNX has no 1-bit type, so its weights are float32 there)."""
    _require_onnx()
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


def _mb(n: int) -> str:
    return f"{n / 1e6:.3f} MB"


def run(argv: list[str]) -> None:
    own, rest = split_args(argv, ("ckpt", "out", "onnx"))
    if rest or "ckpt" not in own or "out" not in own:
        unknown = f"unknown argument(s): {' '.join(rest)}; " if rest else ""
        raise ConfigError(f"{unknown}expected ckpt=PATH out=FILE [onnx=FILE]")
    ckpt = Path(own["ckpt"]).expanduser()
    out = _output(own["out"], ckpt, "out")
    onnx_path = _output(own["onnx"], ckpt, "onnx") if "onnx" in own else None
    if onnx_path is not None:  # before the work, not after it
        refuse_overwrite(onnx_path, "onnx", {"out": out})
        _require_onnx()
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


def main(argv: list[str] | None = None) -> None:
    run_tool(run, argv, USAGE)


if __name__ == "__main__":
    main()
