"""Binary blocks whose BN, shortcut addition and activation run in the XNOR-popcount kernel's
output pass.

A block `out = act(BN(binary_conv(x)) + shortcut(x))` (Bi-Real Net's and ReActNet's basic
blocks) costs, run module by module, more passes over its output after the conv writes it:
the BN reads and writes it, the addition reads it and the shortcut and writes it again, and
ReActNet's RPReLU three times more. `FusedBinaryBlock` computes the shortcut first and has the
kernel write `act(fma(conv, alpha, beta) + shortcut)` directly (act: none, or RPReLU as
prelu(y + shift_in) + shift_out): PyTorch's CPU batch norm in eval mode is
`fma(x, alpha, beta)` with alpha = rsqrt(var + eps) x gamma and beta = fma(-mean, alpha,
bias), so the result is the same float32 bit for bit. That depends on how the installed
PyTorch computes BN, so `fuse_blocks` checks each fused block against the block itself on a
probe batch and keeps the block as it was wherever they differ in any bit.

`chain_blocks` then has each fused block also pack, in the same pass, the signs the next
block's conv needs (its threshold added, as `pack_nhwc` does): they travel with the output
tensor as its `packed_signs` attribute, and the next block uses them only if the tensor it
gets is that very one, so that anything in between that makes a new tensor falls back to
packing. This too is kept only if the model's output on the probe stays the same.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn.modules.module import _global_forward_hooks, _global_forward_pre_hooks

from ..nn.blocks import BinaryBlock, RPReLU
from .packed_conv import PackedBinaryConv2d, _version


def batchnorm_terms(norm: nn.BatchNorm2d) -> tuple[np.ndarray, np.ndarray]:
    """alpha and beta of an eval-mode BN computed as PyTorch's CPU kernel does: float32
    alpha = rsqrt(var + eps) x gamma, beta = bias - mean x alpha rounded once."""
    invstd = torch.rsqrt(norm.running_var.float() + norm.eps)
    alpha = invstd * norm.weight.float() if norm.weight is not None else invstd
    bias = norm.bias.double() if norm.bias is not None else torch.zeros_like(alpha, dtype=torch.float64)
    beta = (bias - norm.running_mean.double() * alpha.double()).float()  # the product exact in float64
    return alpha.detach().numpy().copy(), beta.detach().numpy().copy()


def activation_mode(act: nn.Module) -> int | None:
    """The kernel epilogue's mode for a block's activation (None: it cannot run it)."""
    if isinstance(act, nn.Identity):
        return 1
    if isinstance(act, RPReLU):
        return 2
    return None


def fusable(block: nn.Module) -> bool:
    """A one-conv block with its BN after a dense packed conv, no attention branch, and an
    activation the kernel runs."""
    return (isinstance(block, BinaryBlock) and len(block.convs) == 1 and not block.norm_first
            and activation_mode(block.act) is not None
            and block.attention is None and isinstance(block.convs[0], PackedBinaryConv2d)
            and block.convs[0].dense and not block.convs[0].linear and type(block.norms[0]) is nn.BatchNorm2d
            and block.norms[0].running_mean is not None)


class FusedBinaryBlock(nn.Module):
    """A `fusable` BinaryBlock with its BN, shortcut addition and activation in the kernel's
    output pass; an input that is not channels-last (NHWC, the kernel's layout) runs the block
    as it was.

    Args:
        block: the block, its conv packed; kept for that fallback.
    """

    def __init__(self, block: BinaryBlock) -> None:
        super().__init__()
        self.block = block
        self.mode = activation_mode(block.act)
        channels = block.convs[0].out_channels
        post = np.zeros((5, channels), np.float32)
        post[0], post[1] = batchnorm_terms(block.norms[0])
        if self.mode == 2:  # RPReLU: shift_in, the PReLU's slope (one or one per channel), shift_out
            act = block.act
            post[2] = act.shift_in.detach().float().reshape(-1).numpy()
            post[3] = act.prelu.weight.detach().float().reshape(-1).expand(channels).numpy()
            post[4] = act.shift_out.detach().float().reshape(-1).numpy()
        self.post = post
        self.next_layer = None  # the next block's conv, where this block packs its input (chain_blocks)
        # Looked up once: at batch 1 a block's Python work is a fifth of its time.
        self.conv = block.convs[0]
        self.identity_shortcut = isinstance(block.shortcut, nn.Identity)

    def __setattr__(self, name: str, value: object) -> None:
        if name in ("next_layer", "conv"):  # references, not submodules: `block` and the next block own them
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    def inputs(self, x: Tensor, hooked: bool) -> tuple[np.ndarray | None, np.ndarray]:
        """The conv's packed input, where the block before packed it in its own output pass
        (None: the conv packs it), and the residual to add (NHWC), for a channels-last x.

        Args:
            x: the block's input, float32, channels-last.
            hooked: a hook could have changed x in place since it was made (a forward hook on
                the block before, a pre-hook on this one): its handed signs are not used.

        Returns:
            (signs or None, residual as a float32 NHWC array).
        """
        handed = None if hooked else getattr(x, "packed_signs", None)
        if handed is not None and (handed[0] is not self.conv or handed[2] != _version(x)):
            handed = None  # packed for another layer, or x changed in place since (its version)
        if self.identity_shortcut:
            return (None if handed is None else handed[1]), (
                handed[3] if handed is not None else x.detach().permute(0, 2, 3, 1).numpy())
        shortcut = self.block.shortcut
        # A numba shortcut (shortcut.PooledPointwise) hands its array over, where no hook watches it.
        nhwc = None if hooked or shortcut._forward_hooks or shortcut._forward_pre_hooks else getattr(
            shortcut, "nhwc", None)
        residual = nhwc(x) if nhwc is not None else None
        if residual is None:
            residual = shortcut(x).contiguous(memory_format=torch.channels_last).detach().permute(0, 2, 3, 1).numpy()
        return (None if handed is None else handed[1]), residual

    def forward(self, x: Tensor) -> Tensor:
        if (not x.is_contiguous(memory_format=torch.channels_last) or x.dtype != torch.float32
                or x.device.type != "cpu"):
            return self.block(x)  # its packed conv says so where the device is wrong
        conv = self.conv
        hooked = bool(_global_forward_hooks or _global_forward_pre_hooks)
        signs, residual = self.inputs(x, hooked or bool(self._forward_pre_hooks))
        hand_on = None if hooked or self._forward_hooks else self.next_layer
        epilogue = (self.post, residual, self.mode)
        if (hooked or conv._forward_hooks or conv._forward_pre_hooks or x.shape[1] != conv.in_channels
                or conv.sign_padding != (0, 0)):
            return conv(x, epilogue=epilogue, signs=signs, next_layer=hand_on)  # its hooks, its checks
        return conv.run_dense(x.detach(), signs, epilogue, hand_on)  # the same, less Python per call


def fuse_blocks(model: nn.Module, probe: Tensor) -> int:
    """Swap, in place, each `fusable` block of a packed channels-last model for a
    FusedBinaryBlock whose output on the probe batch is the block's own bit for bit; returns
    how many were swapped.

    Args:
        model: a model after `pack_model`, in eval mode.
        probe: an input batch for the whole model (random images will do).

    Returns:
        The number of blocks fused.
    """
    blocks = {name: m for name, m in model.named_modules() if fusable(m)}
    inputs: dict[str, Tensor] = {}
    hooks = [m.register_forward_pre_hook(lambda m, args, name=name: inputs.setdefault(name, args[0]))
             for name, m in blocks.items()]
    with torch.inference_mode():
        model(probe)
    for hook in hooks:
        hook.remove()
    fused = 0
    with torch.inference_mode():
        for name, block in blocks.items():
            candidate = FusedBinaryBlock(block)
            x = inputs.get(name)
            if x is None or not torch.equal(candidate(x), block(x)):
                continue
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, candidate)
            fused += 1
    chain_blocks(model, probe)
    return fused


def chain_blocks(model: nn.Module, probe: Tensor) -> int:
    """Have each fused block pack, in its output pass, the signs the next fused block's conv
    needs (which then skips its own packing pass), where the next block follows directly in
    the model's order and takes the output as it is; kept only if the model's output on the
    probe stays the same bit for bit. Returns how many blocks hand their signs on.

    Args:
        model: a model after the blocks' fusion, in eval mode.
        probe: an input batch for the whole model.

    Returns:
        The number of blocks that pack the next block's signs.
    """
    blocks = [m for m in model.modules() if isinstance(m, FusedBinaryBlock)]
    pairs = []
    for before, after in zip(blocks, blocks[1:]):
        conv, out = after.conv, before.conv
        if conv.groups == 1 and conv.sign_padding == (0, 0) and conv.in_channels == out.out_channels:
            pairs.append((before, conv))
    with torch.inference_mode():
        reference = model(probe)
        for before, conv in pairs:
            before.next_layer = conv
        if torch.equal(model(probe), reference):
            return len(pairs)
    for before, _ in pairs:
        before.next_layer = None
    return 0
