"""Binary inference on the CPU: bit-packed XNOR-popcount convolutions for exported models.

    python -m bnntrain.infer model=FILE images=FOLDER     # the predicted class of each image
    python -m bnntrain.infer model=FILE --bench           # latency, batch 1 and 16, against PyTorch

`load(FILE)` rebuilds the packed file's inference model (`bnntrain.tools.export.load`) and swaps
each binary layer whose inputs and weights are both binary for a `PackedBinaryConv2d`
(`packed_conv.py`: the XNOR-popcount kernels of `kernels.py`; numba is the optional extra
`infer`: `pip install 'bnntrain[infer]'`). Everything else (the real-valued stem, shortcuts,
BN, activations, pooling, the classifier) stays the PyTorch module it was, except where a
block's BN, shortcut addition and activation run in the kernel's output pass (`fused.py`),
runs of such blocks in one call (`chain.py`), and a stem conv and its max-pool, a
downsampling shortcut or a max-pool in numba (`stem.py`, `shortcut.py`, `pooling.py`), each
checked bit for bit, so the outputs are those of `bnntrain.tools.export.load`.

A binary layer the kernels cannot run (a stage-1 checkpoint's layers: binary activations,
real weights; a stage-0 one's: real activations; padding given as a string) stops `load`
with one line naming it, unless `strict=False`, which leaves such layers to PyTorch as float
convolutions (listed in `model.fallbacks`, with a warning). Grouped, strided and dilated
convs, 1x1 convs and binary linear layers all run packed.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ..errors import ConfigError
from ..tools.export import inference, packed
from .packed_conv import PackedBinaryConv2d, require_numba, why_not_packed

__all__ = ["PackedBinaryConv2d", "fallback_note", "load", "pack_model", "require_numba", "set_threads"]


def set_threads(threads: int) -> None:
    """The same number of threads for PyTorch and for the kernels.

    Args:
        threads: at least 1; numba's share is capped at the threads it was started with.

    Raises:
        ConfigError: fewer than 1.
    """
    if threads < 1:
        raise ConfigError(f"threads={threads}: expected a whole number >= 1")
    torch.set_num_threads(threads)
    import numba
    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))


def _swap(model: nn.Module, make: Callable[[str, inference.InferenceBinaryLayer], nn.Module | None]) -> None:
    for name, layer in [(n, m) for n, m in model.named_modules() if isinstance(m, inference.InferenceBinaryLayer)]:
        new = make(name, layer)
        if new is not None:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, new)


def pack_model(model: nn.Module, nibbles: bool = True) -> dict[str, str]:
    """Swap, in place, each binary layer of an inference model (`bnntrain.tools.export.load`) that
    the kernels run for a PackedBinaryConv2d; returns {layer: why it stays in PyTorch} for the
    others.

    Args:
        model: an inference model, as `bnntrain.tools.export.load` returns it.
        nibbles: dense layers run the nibble kernel where the CPU has AVX2 (False: the word
            kernel; the same outputs).

    Returns:
        {layer name: why it stays in PyTorch}, for the binary layers the kernels cannot run.
    """
    left: dict[str, str] = {}

    def make(name: str, layer: inference.InferenceBinaryLayer) -> nn.Module | None:
        reason = why_not_packed(layer)
        if reason is not None:
            left[name] = reason
            return None
        return PackedBinaryConv2d(layer, use_nibbles=nibbles)

    _swap(model, make)
    return left


def fallback_note(left: dict[str, str], total: int) -> str:
    """One line on the binary layers that stay in PyTorch."""
    reasons = sorted(set(left.values()))
    return (f"{len(left)} of {total} binary layers run as float convs in PyTorch (not packed): "
            f"{'; '.join(reasons)} (first: {next(iter(left))})")


def _to_channels_last(module: nn.Module, args: tuple) -> tuple:
    return (args[0].contiguous(memory_format=torch.channels_last), *args[1:])


def load(path: str | Path, channels_last: bool = True, strict: bool = True, fuse: bool = True,
         nibbles: bool = True) -> nn.Module:
    """The inference model of a packed file with its binary layers run by the XNOR-popcount
    kernels; in eval mode, its outputs those of `bnntrain.tools.export.load(path)` bit for bit
    in the same memory layout. `model.export_config` holds the file's config.

    `strict` (default): a binary layer the kernels cannot run is an error (ConfigError, one
    line). `strict=False` leaves such layers to PyTorch, lists them in `model.fallbacks`
    ({layer: reason}) and warns.

    `channels_last` (default): the real-valued layers run on channels-last tensors, the
    layout the kernels write and read fastest (the input is converted on the way in).

    `fuse` (default, with `channels_last`): blocks of binary conv, BN and shortcut addition
    run their BN and addition in the kernel's output pass, where that gives the block's own
    outputs bit for bit (`bnntrain.infer.fused`); `model.fused_blocks` counts them, and
    `model.chained_blocks` those that run in runs of one numba call each
    (`bnntrain.infer.chain`). The real-valued stem runs a few samples at a time where that
    gives the batched stem's outputs bit for bit, so that its large output stays in reused
    memory; a 7x7 stem conv, with the max-pool after it in the same pass, and a downsampling
    shortcut (average pool, 1x1 conv) and a max-pool run in numba for each input shape where
    that gives PyTorch's outputs bit for bit (`bnntrain.infer.stem`,
    `bnntrain.infer.shortcut`, `bnntrain.infer.pooling`).

    Args:
        path: the packed file.
        channels_last: run the real-valued layers on channels-last tensors.
        strict: refuse a binary layer the kernels cannot run, rather than leave it to PyTorch.
        fuse: fuse BN and shortcut additions into the kernels where exact (channels-last only).
        nibbles: run dense binary convs with the nibble kernel where the CPU has AVX2 (x86-64),
            the word kernel otherwise (`bnntrain.infer.nibbles`; the outputs are the same).

    Returns:
        The model, in eval mode, on the CPU.

    Raises:
        UserError: numba is not installed.
        ConfigError: `strict` and a binary layer the kernels cannot run.
        CheckpointError: the file is not a readable packed file.
    """
    require_numba()
    model = packed.load(path)
    total = sum(isinstance(m, inference.InferenceBinaryLayer) for m in model.modules())
    left = pack_model(model, nibbles)
    if strict and left:
        raise ConfigError(f"{path}: {fallback_note(left, total)}; the XNOR-popcount kernels need binary "
                          f"activations and binary weights (a stage-2 export); strict=false runs such layers "
                          f"as float convs")
    model.fallbacks = left  # model.export_config: set by packed.load, which read (and checked) the file once
    model.fused_blocks = model.chained_blocks = 0
    if channels_last:
        model.to(memory_format=torch.channels_last)
        model.register_forward_pre_hook(_to_channels_last)
        if fuse:
            from .chain import chain_runs
            from .fused import fuse_blocks  # it imports this module
            from .pooling import speed_up_pools
            from .shortcut import speed_up_shortcuts
            from .stem import chunk_stem, hand_on_signs, speed_up_stem_convs
            config = model.export_config
            probe = torch.randn(2, config["in_channels"], config["image_size"], config["image_size"],
                                generator=torch.Generator().manual_seed(0))
            model.fused_blocks = fuse_blocks(model, probe)
            speed_up_shortcuts(model)
            speed_up_pools(model)
            model.chained_blocks = chain_runs(model, probe)
            speed_up_stem_convs(model)
            chunk_stem(model)
            hand_on_signs(model, probe)
    if left:
        warnings.warn(fallback_note(left, total), stacklevel=2)
    return model
