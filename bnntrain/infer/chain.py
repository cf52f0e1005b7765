"""Runs of fused binary blocks in one numba call.

Between two fused blocks that hand each other their signs (`fused.chain_blocks`), all that
happens in Python is bookkeeping: checking the input, looking up the plan, taking buffers,
wrapping the output as a tensor, calling the kernel through numba's dispatcher. At batch 1 that
is a few percent of the time: ReActNet-18 at 224 px ran 1-3% faster with its blocks in runs on
a 2-core x86 CPU (paired measurements). `ChainedBlocks` (an nn.Sequential with the same
children) runs each such run of blocks with `run_blocks`, a compiled loop over the same kernel
(`nibbles.binary_conv_nibbles`) with the same arguments, one block's output and nibbles the
next one's residual and input, so the outputs are the blocks' own bit for bit. Only the run's
output becomes a tensor.

A run is two or more consecutive nibble-kernel blocks where each hands its signs to the next
and every block after the first adds its input (an identity shortcut); the first may have any
shortcut, which runs in PyTorch (or numba's `shortcut.py`) before the call. Where any of the
run's blocks or convs has a hook, or a global hook is set, or the input is not the kernel's
(channels-last float32 on the CPU), the blocks run one by one as before.
"""
from __future__ import annotations

from collections import OrderedDict

import numpy as np
import torch
from numba import njit
from torch import Tensor, nn
from torch.nn.modules.module import _global_forward_hooks, _global_forward_pre_hooks

from .buffers import POOL
from .fused import FusedBinaryBlock
from .nibbles import GROUP, POPCOUNTS, binary_conv_nibbles
from .packed_conv import NO_NIBBLES, NO_SIGNS, _version


@njit(cache=True)
def run_blocks(nib, residual, layers, table, threads, group):
    """Each layer of `layers` (a tuple of `binary_conv_nibbles` argument tuples, as
    ChainedBlocks._run builds them) in turn on `nib` and `residual`, each layer's output and
    nibbles the next one's residual and input."""
    for layer in layers:
        wn, wpop, kw, scale, bias, sh, sw, ph, pw, cin, post, mode, threshold, out, words, next_nib = layer
        binary_conv_nibbles(nib, wn, wpop, table, kw, scale, bias, sh, sw, ph, pw, cin, out, post, residual, mode,
                            threshold, words, next_nib, threads, group)
        nib, residual = next_nib, out


def _chains(blocks: list[nn.Module], first: int) -> bool:
    """Whether blocks[first] hands its nibbles to blocks[first + 1], which adds its input."""
    before, after = blocks[first], blocks[first + 1]
    return (isinstance(before, FusedBinaryBlock) and isinstance(after, FusedBinaryBlock)
            and before.next_layer is after.conv and after.identity_shortcut
            and before.conv.nibbles is not None and after.conv.nibbles is not None
            and before.conv.sign_padding == (0, 0) and after.conv.sign_padding == (0, 0))


def find_runs(blocks: list[nn.Module]) -> list[tuple[int, int]]:
    """The runs of two or more chained blocks (see the module's docstring) in a list of modules.

    Args:
        blocks: the modules, in the order they run.

    Returns:
        (first, last) indices of each run.
    """
    runs, start = [], 0
    for i in range(len(blocks)):
        if i + 1 < len(blocks) and _chains(blocks, i):
            continue
        if i > start:
            runs.append((start, i))
        start = i + 1
    return runs


class ChainedBlocks(nn.Sequential):
    """An nn.Sequential whose runs of chained fused blocks (`find_runs`) run in one numba call
    each; its children, their names and its state are the sequential's.

    Args:
        sequential: the sequential; its modules become this one's.
        runs: (first, last) indices of the runs.
    """

    def __init__(self, sequential: nn.Sequential, runs: list[tuple[int, int]]) -> None:
        super().__init__(OrderedDict(sequential._modules))
        self.train(sequential.training)
        modules = list(self)
        self._steps = []  # a module, or a run's blocks, in order
        i = 0
        for first, last in runs + [(len(modules), len(modules))]:
            self._steps += modules[i:first]
            if first < len(modules):
                self._steps.append(modules[first:last + 1])
            i = last + 1
        # What a hook could sit on and the fast path would skip: the blocks, their convs.
        self._watched = [m for first, last in runs for b in modules[first:last + 1] for m in (b, b.conv)]
        self._plans: dict[tuple, list] = {}

    def forward(self, x: Tensor) -> Tensor:
        if (_global_forward_hooks or _global_forward_pre_hooks
                or any(m._forward_hooks or m._forward_pre_hooks for m in self._watched)):
            return super().forward(x)  # block by block, each with its hooks
        for step in self._steps:
            x = self._run(step, x) if isinstance(step, list) else step(x)
        return x

    @staticmethod
    def _one_by_one(blocks: list[nn.Module], x: Tensor) -> Tensor:
        for block in blocks:  # each block's own checks, fallbacks and errors
            x = block(x)
        return x

    def _plan(self, blocks: list[FusedBinaryBlock], n: int, h: int, w: int) -> list | None:
        # Per block: its output's shape, and the threshold, shape and type of what it hands on.
        # None where a block after the first would add an input of another shape than its
        # output (the kernel reads the residual unchecked; the block itself says what is wrong).
        key = (id(blocks[0]), n, h, w)
        if key not in self._plans:
            plan = []
            for block in blocks:
                plan.append(block.conv._plan(n, h, w, block.next_layer))
                h, w = plan[-1][0][1:3]
            shapes = [step[0] for step in plan]
            self._plans[key] = plan if all(a == b for a, b in zip(shapes, shapes[1:])) else None
        return self._plans[key]

    def _run(self, blocks: list[FusedBinaryBlock], x: Tensor) -> Tensor:
        first = blocks[0]
        if (not x.is_contiguous(memory_format=torch.channels_last) or x.dtype != torch.float32
                or x.device.type != "cpu" or x.dim() != 4 or x.shape[1] != first.conv.in_channels):
            return self._one_by_one(blocks, x)
        n, _, h, w = x.shape
        plan = self._plan(blocks, n, h, w)
        if plan is None:
            return self._one_by_one(blocks, x)
        signs, residual = first.inputs(x, hooked=False)  # x itself: its handed signs go with it
        x = x.detach()
        if residual.shape != plan[0][0]:  # a shortcut of the wrong shape: the block's own error
            return self._one_by_one(blocks, x)
        nib = first.conv._as_nibbles(first.conv.pack(x) if signs is None else signs, plan[0][4])
        layers, outs, handed = [], [], None
        for block, (shape, threshold, next_shape, next_type, _) in zip(blocks, plan):
            out = POOL.empty(shape, np.float32)
            words, next_nib = NO_SIGNS[1], NO_NIBBLES
            if next_shape is not None:
                handed = POOL.empty(next_shape, next_type)
                words, next_nib = (NO_SIGNS[1], handed) if next_type is np.uint8 else (handed, NO_NIBBLES)
            conv = block.conv
            layers.append((*conv.nibbles, conv.kw, conv.scale, conv.bias, *conv.stride, *conv.padding,
                           conv.in_channels, block.post, block.mode, threshold, out, words, next_nib))
            outs.append(out)
        run_blocks(nib, residual, tuple(layers), POPCOUNTS, torch.get_num_threads(), GROUP)
        last = blocks[-1]
        result = torch.from_numpy(outs[-1]).permute(0, 3, 1, 2)
        if last.next_layer is not None:  # as run_dense hands it on
            result.packed_signs = (last.next_layer, handed, _version(result), outs[-1])
        return result


def chain_runs(model: nn.Module, probe: Tensor) -> int:
    """Swap, in place, each nn.Sequential of a fused model that holds a run of chained blocks
    for a ChainedBlocks, kept only if the model's output on the probe stays the same bit for
    bit; returns how many blocks run in chains.

    Args:
        model: a model after `fused.fuse_blocks`, in eval mode.
        probe: an input batch for the whole model.

    Returns:
        The number of blocks in runs.
    """
    swapped = []
    for name, module in list(model.named_modules()):
        if name and type(module) is nn.Sequential:
            runs = find_runs(list(module))
            if runs:
                swapped.append((name, module, sum(last - first + 1 for first, last in runs)))
    if not swapped:
        return 0
    with torch.inference_mode():
        reference = model(probe)
        for name, module, _ in swapped:
            _replace(model, name, ChainedBlocks(module, find_runs(list(module))))
        if torch.equal(model(probe), reference):
            return sum(count for _, _, count in swapped)
        for name, module, _ in swapped:
            _replace(model, name, module)
    return 0


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, module)
