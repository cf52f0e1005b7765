"""bnntrain.infer's runs of fused blocks in one numba call (infer/chain.py): the same outputs as
the blocks run one by one, bit for bit, and the blocks one by one wherever something could
watch or change what passes between them (hooks, another layout)."""
from collections import OrderedDict

import pytest
import torch
from torch import nn

from conftest import need
from test_infer_fused import exported

numba = need("numba", extra="infer")
from bnntrain import infer  # noqa: E402  (needs numba)
from bnntrain.infer import chain, fused, nibbles  # noqa: E402

numba.set_num_threads(1)  # the suite's two workers share two cores
pytestmark = pytest.mark.skipif(not nibbles.available(), reason="runs of blocks need the nibble kernel (AVX2)")


def unchained(model):
    """The model with each ChainedBlocks back as the plain nn.Sequential it was."""
    for name, module in list(model.named_modules()):
        if isinstance(module, chain.ChainedBlocks):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, nn.Sequential(OrderedDict(module._modules)))
    return model


@pytest.mark.parametrize("model_name, chained", [("reactnet18", 16), ("birealnet18", 16)])
def test_runs_give_the_blocks_outputs_bit_for_bit(model_name, chained, tmp_path):
    path = exported(tmp_path, model_name)
    model = infer.load(path)
    assert model.chained_blocks == chained
    stages = [m for m in model.modules() if isinstance(m, chain.ChainedBlocks)]
    assert len(stages) == 4 and all(len(s._steps) == 1 for s in stages)  # each stage one run
    one_by_one = unchained(infer.load(path))
    reference = infer.load(path, fuse=False)
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        got = model(x)
        assert torch.equal(got, one_by_one(x)) and torch.equal(got, reference(x))
        assert torch.equal(model(x), got)  # the buffers reused


def test_hooks_and_other_layouts_run_the_blocks_one_by_one(tmp_path):
    model = infer.load(exported(tmp_path, "reactnet18"))
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        expected = model(x)
        seen = []
        block = model.stages[1][2]
        handle = block.register_forward_hook(lambda m, args, out: seen.append(out.shape))
        assert torch.equal(model(x), expected) and len(seen) == 1 and seen[0][:2] == (2, 32)
        handle.remove()
        handle = block.conv.register_forward_pre_hook(lambda m, args: seen.append("conv"))
        assert torch.equal(model(x), expected) and seen[-1] == "conv"
        handle.remove()
        # An input in the other layout (here: a stage called on its own) runs block by block.
        stage = model.stages[0]
        inner = model.stem(x.contiguous(memory_format=torch.channels_last))
        assert torch.equal(stage(inner.contiguous()), stage(inner))


def test_find_runs():
    """Only the blocks' links count: each hands its nibbles to the next, which adds its input."""
    class Block(fused.FusedBinaryBlock):
        def __init__(self, identity):
            nn.Module.__init__(self)
            self.conv = type("Conv", (), {"nibbles": (), "sign_padding": (0, 0)})()
            self.identity_shortcut, self.next_layer = identity, None

    blocks = [Block(False), Block(True), Block(True), Block(False), Block(True), nn.Identity(), Block(True)]
    for before, after in zip(blocks, blocks[1:]):
        if isinstance(before, Block) and isinstance(after, Block):
            before.next_layer = after.conv
    # blocks 0-2 chain; 3 hands to 4, which adds its input; 5 breaks the run; 6 stands alone.
    assert chain.find_runs(blocks) == [(0, 2), (3, 4)]
    blocks[0].next_layer = None
    assert chain.find_runs(blocks) == [(1, 2), (3, 4)]
    blocks[2].conv.nibbles = None  # the word kernel: no runs through it
    assert chain.find_runs(blocks) == [(3, 4)]
