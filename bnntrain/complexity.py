"""Cost accounting in the BNN literature's convention (Bi-Real Net, Real-to-Binary, ReActNet).

A conv or linear layer whose inputs and weights are both binary contributes its
multiply-accumulates to BOPs; every other conv and linear layer (real-valued, or with
one binary and one real operand) contributes its multiply-accumulates to FLOPs.
BN, activations, pooling, additions and scaling factors are not counted, and
OPs = FLOPs + BOPs / 64. Real-to-Binary Net counted those too, by pytorch-estimate-flops's
rules: the report gives that count beside ours (`bnntrain.elementwise_flops`). The counts
come from forward hooks on a dummy input, so every model and option is covered without
per-layer tables kept by hand.

Model size counts parameters: as trained, all of them at 32 bits (the latent weights);
as deployed, the weights of binary-weight layers at 1 bit and everything else at 32.
Buffers (BN statistics) and the per-channel weight scales are not parameters and are
not counted, as in the papers.
"""
from __future__ import annotations

import json
import math
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch import Tensor, nn

from .elementwise_flops import count_elementwise_flops
from .files import write_text
from .nn.layers import BinaryMixin, binary_layers

# Multiply-accumulates of one call, from the module and its output. A grouped conv's
# weight holds in_channels / groups inputs per filter, so its true MACs follow from it.
MAC_COUNTERS: dict[type, Callable[[nn.Module, Tensor], int]] = {
    nn.Conv2d: lambda m, out: out.numel() * math.prod(m.weight.shape[1:]),
    nn.Linear: lambda m, out: out.numel() * m.in_features,
}
BOPS_PER_OP = 64  # a 64-bit XNOR-popcount does the work of one FLOP (Bi-Real Net)


@dataclass
class LayerCost:
    """The cost of one conv or linear layer, for one sample.

    Attributes:
        name: the layer's name in the model.
        kind: its class's name.
        input_bits: bits per input value: 1 where binary, else 32.
        weight_bits: bits per weight: 1 where binary, else 32.
        output_shape: its output's shape, of one sample.
        binary_params: its parameters counted at 1 bit when deployed.
        real_params: its other parameters.
        binary_macs: multiply-accumulates with binary inputs and weights (BOPs).
        real_macs: its other multiply-accumulates (FLOPs).
    """

    name: str
    kind: str
    input_bits: int
    weight_bits: int
    output_shape: tuple[int, ...]  # of one sample
    binary_params: int
    real_params: int
    binary_macs: int = 0
    real_macs: int = 0


@dataclass
class CostReport:
    """The costs of a model for one sample: per layer, and in total.

    Attributes:
        layers: one entry per conv and linear layer, in `named_modules` order.
        binary_params: the model's parameters counted at 1 bit when deployed.
        real_params: all its other parameters (BN, activations, ... included).
        input_shape: the sample's shape (C, H, W).
        pthflops: FLOPs by pytorch-estimate-flops's rules (BN, ReLU, pooling, additions and
            products counted too; Real-to-Binary Net's convention).
    """

    layers: list[LayerCost]
    binary_params: int  # of the whole model, counted at 1 bit when deployed
    real_params: int    # of the whole model (BN, activations, ... included)
    input_shape: tuple[int, ...]
    pthflops: int = 0

    @property
    def bops(self) -> int:
        """Binary operations: the multiply-accumulates with binary inputs and weights."""
        return sum(layer.binary_macs for layer in self.layers)

    @property
    def flops(self) -> int:
        """Floating-point operations: every other multiply-accumulate of conv and linear layers."""
        return sum(layer.real_macs for layer in self.layers)

    @property
    def ops(self) -> float:
        """OPs = FLOPs + BOPs / 64."""
        return self.flops + self.bops / BOPS_PER_OP

    @property
    def trained_bits(self) -> int:
        """The model's size as trained: every parameter at 32 bits."""
        return 32 * (self.binary_params + self.real_params)

    @property
    def deployed_bits(self) -> int:
        """The model's size as deployed: binary weights at 1 bit, the others at 32."""
        return self.binary_params + 32 * self.real_params

    @property
    def compression(self) -> float:
        """Trained size / deployed size."""
        return self.trained_bits / self.deployed_bits

    def totals(self) -> dict[str, float]:
        """The model's totals.

        Returns:
            Parameters, sizes in bits and bytes, compression, BOPs, FLOPs and OPs, by name.
        """
        return {"binary_params": self.binary_params, "real_params": self.real_params,
                "trained_bits": self.trained_bits, "deployed_bits": self.deployed_bits,
                "trained_bytes": self.trained_bits // 8, "deployed_bytes": math.ceil(self.deployed_bits / 8),
                "compression": self.compression, "bops": self.bops, "flops": self.flops, "ops": self.ops,
                "pthflops": self.pthflops, "pthflops_ops": self.pthflops + self.bops / BOPS_PER_OP}

    def to_dict(self) -> dict:
        """Everything in the report, as cost.json holds it.

        Returns:
            `input_shape`, `totals` and `layers` (one dict per layer).
        """
        return {"input_shape": list(self.input_shape), "totals": self.totals(),
                "layers": [asdict(layer) for layer in self.layers]}

    def table(self) -> str:
        """The report as the commands print it.

        Returns:
            The per-layer table and the totals (`format_table`).
        """
        return format_table(self)

    def save(self, folder: Path) -> None:
        """cost.txt (the table) and cost.json (everything in it) in `folder`.

        Args:
            folder: where to write them.
        """
        write_text(folder / "cost.txt", self.table() + "\n")
        write_text(folder / "cost.json", json.dumps(self.to_dict(), indent=1) + "\n")


@contextmanager
def precision(model: nn.Module, activations: str, weights: str) -> Iterator[nn.Module]:
    """Switch the binary layers to a stage's precision and back again afterwards, so that
    counting never changes the mode a caller left the model in.

    Args:
        model: the model whose binary layers are switched.
        activations: one of `ACTIVATION_MODES`.
        weights: one of `WEIGHT_MODES`.

    Yields:
        The model, at that precision until the `with` block ends.
    """
    saved = [(layer, layer.activations, layer.weights) for _, layer in binary_layers(model)]
    for layer, _, _ in saved:
        layer.set_precision(activations, weights)
    try:
        yield model
    finally:
        for layer, act, w in saved:
            layer.set_precision(act, w)


def _counter(module: nn.Module) -> Callable[[nn.Module, Tensor], int] | None:
    return next((count for kind, count in MAC_COUNTERS.items() if isinstance(module, kind)), None)


def _layer_entry(name: str, module: nn.Module) -> LayerCost:
    is_binary = isinstance(module, BinaryMixin)
    input_bits = module.input_bits if is_binary else 32
    weight_bits = module.weight_bits if is_binary else 32
    own = sum(p.numel() for p in module.parameters(recurse=False))
    binary = module.weight.numel() if weight_bits == 1 else 0
    return LayerCost(name, type(module).__name__, input_bits, weight_bits, (), binary, own - binary)


def count_costs(model: nn.Module, input_shape: tuple[int, ...]) -> CostReport:
    """Per-layer and total costs of one sample of `input_shape` (C, H, W) at the model's
    current precision (see `precision`).

    Args:
        model: the model; it runs once, in eval mode, on a sample of zeros.
        input_shape: the sample's shape (C, H, W).

    Returns:
        The report.
    """
    entries: dict[nn.Module, LayerCost] = {}
    handles = []
    for name, module in model.named_modules():
        count = _counter(module)
        if count is None:
            continue
        entries[module] = entry = _layer_entry(name, module)

        def hook(mod: nn.Module, _inputs: tuple, out: Tensor, entry: LayerCost = entry,
                 count: Callable = count) -> None:
            macs = count(mod, out) // out.shape[0]
            if entry.input_bits == 1 and entry.weight_bits == 1:
                entry.binary_macs += macs
            else:  # real-valued, or one binary and one real operand
                entry.real_macs += macs
            entry.output_shape = tuple(out.shape[1:])

        handles.append(module.register_forward_hook(hook))
    param = next(model.parameters())
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, *input_shape, device=param.device, dtype=param.dtype))
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    params = {id(p): p for p in model.parameters()}  # each shared parameter once
    binary = sum(entry.binary_params for entry in entries.values())
    return CostReport(list(entries.values()), binary, sum(p.numel() for p in params.values()) - binary,
                      tuple(input_shape), count_elementwise_flops(model, input_shape).flops)


def _shape(shape: tuple[int, ...]) -> str:
    return "x".join(map(str, shape)) if shape else "-"


def format_table(report: CostReport) -> str:
    """The per-layer table, a row for the parameters outside conv and linear layers, and the totals.

    Args:
        report: the cost report.

    Returns:
        The table and the totals' lines, as text.
    """
    header = ("layer", "type", "in", "w", "output", "binary params", "real params", "binary MACs", "real MACs")
    rows = [(layer.name, layer.kind, str(layer.input_bits), str(layer.weight_bits), _shape(layer.output_shape),
             f"{layer.binary_params:,}", f"{layer.real_params:,}", f"{layer.binary_macs:,}", f"{layer.real_macs:,}")
            for layer in report.layers]
    other = report.real_params - sum(layer.real_params for layer in report.layers)
    rows.append(("(BN, activations, ...)", "", "", "", "", "0", f"{other:,}", "0", "0"))
    rows.append(("total", "", "", "", "", f"{report.binary_params:,}", f"{report.real_params:,}",
                 f"{report.bops:,}", f"{report.flops:,}"))
    widths = [max(len(row[i]) for row in rows + [header]) for i in range(len(header))]
    left = 2  # name and type are left-aligned, numbers right-aligned
    fmt = lambda row: "  ".join(c.ljust(w) if i < left else c.rjust(w)  # noqa: E731
                                for i, (c, w) in enumerate(zip(row, widths)))
    lines = [fmt(header), "  ".join("-" * w for w in widths)] + [fmt(row) for row in rows]
    return "\n".join(lines + [""] + format_totals(report))


def format_totals(report: CostReport) -> list[str]:
    """The totals as lines of text: parameters, sizes as trained and deployed, BOPs, FLOPs, OPs.

    Args:
        report: the cost report.

    Returns:
        The lines.
    """
    t = report.totals()
    return [
        f"parameters: {report.binary_params:,} binary, {report.real_params:,} real",
        f"model size as trained (32-bit latent weights): {t['trained_bits']:,} bits = {t['trained_bytes'] / 1e6:.3f} MB",
        f"model size as deployed (1-bit binary weights): {t['deployed_bits']:,} bits = "
        f"{t['deployed_bytes'] / 1e6:.3f} MB  (compression {report.compression:.2f}x)",
        f"BOPs {report.bops:.4g}  FLOPs {report.flops:.4g}  OPs {report.ops:.4g}  (OPs = FLOPs + BOPs / 64)",
        f"with BN, ReLU, pooling, additions and products (pytorch-estimate-flops's rules, Real-to-Binary "
        f"Net's count): FLOPs {report.pthflops:.4g}  OPs {t['pthflops_ops']:.4g}",
    ]
