"""Bop (bnntrain/bop.py) against larq's update written out from its code, in float64; Adam
unchanged for the other parameters; gamma's schedules; its state across a resume; and the
stage that may use it."""
import copy
import logging
from pathlib import Path

import pytest
import torch
from torch import nn

from bnntrain.bop import Bop
from bnntrain.engine.stage import train_stage
from bnntrain.errors import ConfigError
from bnntrain.nn import BinaryConv2d, binary_layers
from bnntrain.run.config import plan
from test_config import make


def larq_bop(w, m, g, gamma, threshold):
    """larq/optimizers.py, Bop._resource_apply_dense: m_t = (1 - gamma) m + gamma g;
    w_t = larq.math.sign(-tf.sign(w m_t - threshold) w), larq.math.sign(x) = tf.sign(tf.sign(x) + 0.1)."""
    m_t = (1 - gamma) * m + gamma * g
    x = -torch.sign(w * m_t - threshold) * w
    return torch.sign(torch.sign(x) + 0.1), m_t


def small_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4),
                         BinaryConv2d(4, 6, 3, padding=1, weight_quantizer="sign"), nn.Flatten(), nn.Linear(6 * 25, 3))


def test_bop_flips_as_larq_and_trains_the_rest_with_adam():
    model = small_model().double()
    twin = small_model().double()  # the real parameters, trained by torch's Adam alone
    binary = model[2].weight
    with torch.no_grad():  # +-1 weights, some real ones (a first step binarizes them)
        binary.copy_(torch.sign(binary) * torch.where(torch.rand_like(binary) < 0.8, 1.0, 0.3))
    bop = Bop([{"params": list(model.parameters())}], model, lr=1e-2, gamma=0.3, threshold=1e-3)
    real = [p for n, p in twin.named_parameters() if n != "2.weight"]
    adam = torch.optim.Adam(real, lr=1e-2)
    w, m = binary.detach().clone(), torch.zeros_like(binary)
    x = torch.randn(4, 3, 5, 5, dtype=torch.float64)
    for step in range(4):
        for net, opt in ((model, bop), (twin, adam)):
            opt.zero_grad()
            net(x).square().mean().backward()
        g = binary.grad.detach().clone()
        if step == 2:  # w m exactly at the threshold: larq's sign(0) = +1
            g[0, 0, 0, 0] = ((1e-3 / w[0, 0, 0, 0]) - (1 - 0.3) * m[0, 0, 0, 0]) / 0.3
            binary.grad[0, 0, 0, 0] = g[0, 0, 0, 0]
        bop.step()
        adam.step()
        twin[2].weight.data.copy_(binary.data)  # the twin's forward sees the same binary weights
        w, m = larq_bop(w, m, g, 0.3, 1e-3)
        torch.testing.assert_close(binary.detach(), w, rtol=0, atol=0)
        torch.testing.assert_close(bop.state[binary]["m"], m, rtol=0, atol=1e-12)
        for p, q in zip([p for n, p in model.named_parameters() if n != "2.weight"], real):
            torch.testing.assert_close(p, q, rtol=0, atol=1e-12)
    assert set(binary.detach().unique().tolist()) == {-1.0, 1.0}


@pytest.mark.parametrize("schedule, expected", [
    ("constant", {0: 1e-4, 150: 1e-4, 299: 1e-4}),
    ("step", {0: 1e-4, 99: 1e-4, 100: 1e-5, 199: 1e-5, 200: 1e-6, 299: 1e-6}),  # binarynet.py bop_sec52, by epoch
    ("linear", {0: 1e-4, 150: 1e-4 + (1e-6 - 1e-4) * 0.5, 300: 1e-6}),
])
def test_gamma_schedules(schedule, expected):
    model = small_model()
    bop = Bop([{"params": list(model.parameters())}], model, gamma=1e-4, gamma_schedule=schedule,
              gamma_decay=0.1, gamma_every=100, gamma_end=1e-6, epochs=300)
    for epoch, gamma in expected.items():
        bop.set_progress(epoch / 300)
        assert bop.param_groups[0]["lr"] == pytest.approx(gamma, rel=1e-12)
    assert [g["lr"] for g in bop.param_groups[1:]] == [1e-3]  # Adam's lr is the schedule's, untouched


def test_a_loaded_state_continues_the_same_steps():
    model_a, model_b = small_model(), small_model()
    x = torch.randn(4, 3, 5, 5)

    def steps(model, opt, n):
        for _ in range(n):
            opt.zero_grad()
            model(x).square().mean().backward()
            opt.step()

    a = Bop([{"params": list(model_a.parameters())}], model_a, gamma=0.2)
    steps(model_a, a, 2)
    saved = copy.deepcopy({"model": model_a.state_dict(), "opt": a.state_dict()})  # state_dict holds live tensors
    steps(model_a, a, 2)
    model_b.load_state_dict(saved["model"])
    b = Bop([{"params": list(model_b.parameters())}], model_b, gamma=0.2)
    b.load_state_dict(saved["opt"])
    assert len(b.param_groups) == len(a.param_groups) and b.param_groups[0]["bop"]
    steps(model_b, b, 2)
    for p, q in zip(model_a.parameters(), model_b.parameters()):
        assert torch.equal(p, q)


def test_a_model_without_binary_layers_is_refused():
    with pytest.raises(ValueError, match="optimizer=bop trains binary weights, and this model has no binary layer"):
        Bop([{"params": list(nn.Linear(2, 2).parameters())}], nn.Linear(2, 2))


def test_bop_in_a_stage_with_real_weights_is_one_line():
    with pytest.raises(ConfigError, match=r"optimizer=bop trains binary weights, and stage1 has real ones"):
        plan(["stage=1", "optimizer=bop", "optimizer.lr=1e-2", "optimizer.weight_decay=0"])


def test_a_fully_binary_stage_trains_with_bop_and_resumes(tmp_path: Path, monkeypatch, caplog):
    """Two epochs straight, and one then a resume for the second, end with the same weights:
    Bop's averages and gamma schedule and Adam's moments all come back from the checkpoint."""
    options = ["stage='2'", "stage.needs_init=false", "model.width=0.125", "data=synthetic", "data.train_size=16",
               "data.test_size=8", "data.batch_size=8", "trainer.device=cpu", "trainer.progress=plain",
               "optimizer=bop", "optimizer.lr=1e-2", "optimizer.weight_decay=0", "optimizer.gamma=0.01",
               "optimizer.threshold=1e-6", "optimizer.gamma_schedule=linear", "optimizer.gamma_end=1e-3",
               "~model.weight_quantizer", "+model.weight_quantizer={name:sign}"]
    gammas, set_progress = [], Bop.set_progress

    def recorded(self, progress):
        set_progress(self, progress)
        gammas.append(self.param_groups[0]["lr"])

    monkeypatch.setattr(Bop, "set_progress", recorded)
    caplog.set_level(logging.INFO)
    straight = train_stage(make(*options, "schedule.epochs=2"), tmp_path / "a" / "stage2")
    # The log's lr is Adam's (cosine: 1e-2, then 5e-3), not Bop's gamma (1e-2, then 5.5e-3).
    assert "stage2 epoch 2/2  lr 5.00e-03" in caplog.text
    assert gammas == [0.01, pytest.approx(0.0055, rel=1e-12)]  # the stage loop sets gamma at each epoch's start
    train_stage(make(*options, "schedule.epochs=1"), tmp_path / "b" / "stage2")
    first = torch.load(tmp_path / "b" / "stage2" / "last.pt", weights_only=True)
    assert set(first["optimizer"]) == {"bop", "adam"}
    resumed = train_stage(make(*options, "schedule.epochs=2"), tmp_path / "b" / "stage2",
                          resume=tmp_path / "b" / "stage2" / "last.pt")
    a = torch.load(tmp_path / "a" / "stage2" / "last.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "b" / "stage2" / "last.pt", weights_only=True)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert straight["top1"] == resumed["top1"]
    names = [f"{name}.weight" for name, _ in binary_layers(build(options))]
    assert names and all(set(a[n].unique().tolist()) <= {-1.0, 1.0} for n in names)
    assert any(not torch.equal(a[n], first["model"][n]) for n in names)  # the second epoch flipped weights


def build(options):
    from bnntrain.models import build_model

    return build_model(make(*options).model, num_classes=10, in_channels=3)
