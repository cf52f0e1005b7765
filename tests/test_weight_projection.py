"""XNOR-Net's latent weights are mean-centred and clamped before every training forward, as
its authors' code does (`WeightProjection`): as a fresh stage starts and after each step, not
again on a resume (projecting twice is not projecting once)."""
from pathlib import Path

import torch

from bnntrain.engine.stage import train_stage
from bnntrain.nn import binary_layers
from bnntrain.nn.quantizers import WEIGHT_QUANTIZERS, build_quantizer
from test_config import make

XNOR = ["stage='2'", "stage.needs_init=false", "model.width=0.125", "data=synthetic", "data.train_size=16",
        "data.test_size=8", "data.batch_size=8", "trainer.device=cpu", "trainer.progress=plain",
        "~model.weight_quantizer", "+model.weight_quantizer={name:xnor_weight}"]


def project(w):
    return (w - w.mean(1, keepdim=True)).clamp(-1, 1)  # util.lua: meancenterConvParms, clampConvParms


def test_the_projection_is_the_authors():
    w = torch.randn(4, 3, 3, 3, dtype=torch.float64) * 2
    got = w.clone()
    build_quantizer(WEIGHT_QUANTIZERS, "xnor_weight").project_(got)
    torch.testing.assert_close(got, project(w), rtol=0, atol=1e-15)


def test_every_step_trains_projected_weights(tmp_path: Path, monkeypatch):
    """Each forward in training sees weights that are a projection's output: as the stage
    starts and after each of its two steps."""
    cfg = make(*XNOR, "schedule.epochs=1")
    seen = []
    original = train_stage.__globals__["build_stage"]

    def build_and_watch(*args, **kwargs):
        parts = original(*args, **kwargs)
        for _, layer in binary_layers(parts.model):
            layer.register_forward_pre_hook(lambda m, x: seen.append(m.weight.detach().clone()) if m.training else None)
        return parts

    monkeypatch.setitem(train_stage.__globals__, "build_stage", build_and_watch)
    train_stage(cfg, tmp_path / "stage2")
    assert len(seen) >= 2 * 16  # two steps of sixteen binary layers
    for w in seen:
        assert w.abs().max() <= 1
        inside = (w.abs() < 1).all(1)  # where nothing was clamped, the mean over inputs is 0
        assert torch.allclose(w.mean(1)[inside], torch.zeros(()), atol=1e-6)
    saved = torch.load(tmp_path / "stage2" / "last.pt", weights_only=True)
    assert saved["hooks"]["weight_projection"] == {"projected": True}


def test_a_resumed_stage_is_not_projected_again(tmp_path: Path):
    """Two epochs in one go, and one then a resume for the second, end with the same weights."""
    straight = train_stage(make(*XNOR, "schedule.epochs=2"), tmp_path / "a" / "stage2")
    train_stage(make(*XNOR, "schedule.epochs=1"), tmp_path / "b" / "stage2")
    resumed = train_stage(make(*XNOR, "schedule.epochs=2"), tmp_path / "b" / "stage2",
                          resume=tmp_path / "b" / "stage2" / "last.pt")
    assert straight["top1"] == resumed["top1"]
    a = torch.load(tmp_path / "a" / "stage2" / "last.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "b" / "stage2" / "last.pt", weights_only=True)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
