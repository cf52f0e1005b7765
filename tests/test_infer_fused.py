"""bnntrain.infer's fused blocks (infer/fused.py): the BN, shortcut addition and RPReLU run in
the kernel's output pass give the blocks' own outputs bit for bit, with every parameter
trained-looking (not the zeros and ones of a fresh model), and a fusion that would not is
refused at load."""
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from bnntrain.engine import save_checkpoint
from bnntrain.errors import UserError
from bnntrain.models import build_model
from bnntrain.nn.blocks import RPReLU
from bnntrain.tools import export
from conftest import need
from test_config import make
from test_export import randomize_batchnorms

numba = need("numba", extra="infer")
from bnntrain import infer  # noqa: E402  (needs numba)
from bnntrain.infer import fused  # noqa: E402

numba.set_num_threads(1)  # the suite's two workers share two cores


def exported(tmp_path, model_name: str, image_size: int = 32, *overrides: str):
    """A 1/4-width stage-2 model with random BN statistics, RPReLU shifts and slopes and RSign
    thresholds, exported to tmp_path/m.bnn; `overrides`: more config overrides."""
    cfg = make("stage='2'", "data=synthetic", f"data.image_size={image_size}", "model.width=0.25", f"model={model_name}",
               *overrides)
    torch.manual_seed(0)
    model = build_model(cfg.model, num_classes=10, in_channels=3)
    randomize_batchnorms(model)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("threshold", "shift_in", "shift_out")):
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
            elif name.endswith("prelu.weight"):
                p.copy_(torch.rand(p.shape, generator=g))
    save_checkpoint({"model": model.state_dict(), "num_classes": 10, "in_channels": 3, "epoch": 1, "stage": cfg.stage.name,
                     "config": OmegaConf.to_container(cfg, resolve=True)}, tmp_path / "c.pt")
    export.export_checkpoint(tmp_path / "c.pt", tmp_path / "m.bnn")
    return tmp_path / "m.bnn"


@pytest.mark.parametrize("model_name, blocks, rprelu", [("birealnet18", 16, False), ("reactnet18", 16, True),
                                                          ("reactnet_a", 26, True), ("resnet18", 0, False)])
def test_fused_blocks_give_the_blocks_outputs_bit_for_bit(model_name, blocks, rprelu, tmp_path):
    """Bi-Real's and ReActNet's blocks fuse; the default ResNet-18's (BN before the sign) do not."""
    path = exported(tmp_path, model_name)
    model, unfused = infer.load(path), infer.load(path, fuse=False)
    assert model.fused_blocks == blocks and unfused.fused_blocks == 0
    kinds = [m for m in model.modules() if isinstance(m, fused.FusedBinaryBlock)]
    assert len(kinds) == blocks and all((m.mode == 2) == rprelu for m in kinds)
    # Each block but the last packs the next one's signs in its output pass.
    assert [m.next_layer is not None for m in kinds] == [True] * (blocks - 1) + [False] * (blocks > 0)
    assert all(m.next_layer is n.block.convs[0] for m, n in zip(kinds, kinds[1:]))
    if rprelu:  # the parameters really are not a fresh model's
        act = kinds[0].block.act
        assert isinstance(act, RPReLU) and act.shift_in.abs().sum() > 0 and not torch.all(act.prelu.weight == 0.25)
    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        got = model(x)
        assert torch.equal(got, unfused(x))
        assert torch.equal(got, export.load(path).to(memory_format=torch.channels_last)(
            x.contiguous(memory_format=torch.channels_last)))


def test_a_fusion_that_is_not_bit_exact_is_refused(tmp_path, monkeypatch):
    """BN terms one float32 step off: the probe at load sees it and leaves every block as it was."""
    path = exported(tmp_path, "reactnet18")

    def off_by_one_step(norm):
        alpha, beta = fused_terms(norm)
        return alpha, np.nextafter(beta, np.float32(np.inf))

    fused_terms = fused.batchnorm_terms
    monkeypatch.setattr(fused, "batchnorm_terms", off_by_one_step)
    model = infer.load(path)
    assert model.fused_blocks == 0 and not any(isinstance(m, fused.FusedBinaryBlock) for m in model.modules())
    monkeypatch.undo()
    assert infer.load(path).fused_blocks == 16


def test_nchw_runs_unfused(tmp_path):
    path = exported(tmp_path, "birealnet18")
    model = infer.load(path, channels_last=False)
    assert model.fused_blocks == 0
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        assert torch.equal(model(x), export.load(path)(x))


@pytest.mark.parametrize("mode", ["inference_mode", "no_grad"])
def test_a_hook_that_changes_a_block_output_in_place_is_seen(tmp_path, mode):
    """The signs a fused block packs for the next one are of its output as it wrote it: a forward
    hook that changes the output in place (or a pre-hook on the next block) must not leave the
    next block with the old signs. The hooked fused model equals the hooked unfused one."""
    path = exported(tmp_path, "reactnet18")
    model, unfused = infer.load(path), infer.load(path, fuse=False)
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    context = torch.inference_mode if mode == "inference_mode" else torch.no_grad
    for kind in ("forward hook on the first block", "pre-hook on the second"):
        hooks = []
        for m in (model, unfused):
            first, second = m.get_submodule("stages.0.0"), m.get_submodule("stages.0.1")
            if kind.startswith("forward"):
                hooks.append(first.register_forward_hook(lambda mod, args, out: out.mul_(-1)))
            else:
                hooks.append(second.register_forward_pre_hook(lambda mod, args: args[0].mul_(-1)))
        with context():
            assert torch.equal(model(x), unfused(x)), kind
        for hook in hooks:
            hook.remove()
    with context():  # and the hand-over is back once the hooks are gone
        assert torch.equal(model(x), unfused(x))


def test_an_output_changed_in_place_between_blocks_is_repacked(tmp_path):
    """Blocks called one by one outside inference mode: an output changed in place before the
    next block gets it has a new version, so the next block packs its signs (and reads its
    residual) anew rather than take the ones handed on with it."""
    path = exported(tmp_path, "reactnet18")
    model, unfused = infer.load(path), infer.load(path, fuse=False)
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        outputs = []
        for m in (model, unfused):
            y = m.get_submodule("stages.0.0")(m.stem(x.contiguous(memory_format=torch.channels_last)))
            y.mul_(-1)
            outputs.append(m.get_submodule("stages.0.1")(y))
    assert model.get_submodule("stages.0.0").next_layer is not None  # the fused model does hand signs on
    assert torch.equal(outputs[0], outputs[1])


def test_hooks_on_a_fused_blocks_conv_still_fire(tmp_path):
    """A fused block calls its packed conv's dense path directly, but not past a hook on that
    conv: the hook sees the block's input, and the outputs stay the unfused model's."""
    path = exported(tmp_path, "birealnet18")
    model, unfused = infer.load(path), infer.load(path, fuse=False)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    seen = []
    conv = model.get_submodule("stages.0.1").conv
    hook = conv.register_forward_pre_hook(lambda mod, args: seen.append(args[0].shape))
    with torch.inference_mode():
        assert torch.equal(model(x), unfused(x))
        assert len(seen) == 1
        hook.remove()
        model(x)
    assert len(seen) == 1


def test_a_shortcut_of_the_wrong_shape_is_an_error(tmp_path):
    path = exported(tmp_path, "birealnet18")
    model = infer.load(path)
    block = model.get_submodule("stages.0.1")
    x = torch.randn(2, block.conv.in_channels, 8, 8).contiguous(memory_format=torch.channels_last)
    wrong = np.zeros((2, 7, 8, block.conv.out_channels), np.float32)
    with torch.inference_mode(), pytest.raises(UserError, match="shortcut gave shape"):
        block.conv(x, epilogue=(block.post, wrong, block.mode))
