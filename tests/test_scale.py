"""Speed and scale options on the CPU: AMP, channels_last, compile, clipping, accumulation,
torchrun data parallelism with gloo, and the Hydra launchers."""
import shutil
import subprocess

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bnntrain.config import compose
from bnntrain.engine import Trainer
from bnntrain.losses import Objective
from bnntrain.models import build_model
from conftest import TINY, results, run_cli
from test_config import make


def tiny_model():
    torch.manual_seed(0)
    return build_model(make("model.width=0.125").model, num_classes=10, in_channels=3)


def batches(n=4, bs=8):
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(bs, 3, 16, 16, generator=g), torch.randint(10, (bs,), generator=g)) for _ in range(n)]


def run_epoch(model, **options):
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    trainer = Trainer(model, Objective(model), opt, torch.device("cpu"), log_every=1, **options)
    out = trainer.train_epoch(batches())
    return trainer, out


def test_bf16_autocast_and_channels_last_on_the_cpu():
    model = tiny_model().to(memory_format=torch.channels_last)
    trainer, out = run_epoch(model, amp="bf16", channels_last=True)
    assert trainer.step == 4 and out["loss"] > 0
    with trainer.autocast():
        assert model(batches()[0][0]).dtype == torch.bfloat16
    assert trainer.evaluate(batches())["top1"] >= 0


def test_fp16_autocast_with_a_gradient_scaler_on_the_cpu():
    model = tiny_model()
    try:
        trainer, out = run_epoch(model, amp="fp16")
    except RuntimeError as err:  # an old CPU build without fp16 autocast
        pytest.skip(f"fp16 autocast does not run on this CPU: {err}")
    assert trainer.scaler.is_enabled() and trainer.step == 4 and torch.isfinite(torch.tensor(out["loss"]))


def test_a_short_last_window_is_averaged_over_its_own_size():
    """Three batches, accumulate=2: steps on batches 1+2 (mean) and on batch 3 alone."""
    torch.manual_seed(0)
    model = nn.Linear(3, 2, bias=False)
    start = model.weight.detach().clone()
    data = [(torch.randn(4, 3), torch.randint(2, (4,))) for _ in range(3)]
    trainer = Trainer(model, Objective(model), torch.optim.SGD(model.parameters(), lr=1.0), torch.device("cpu"),
                      accumulate=2)
    trainer.train_epoch(data)
    reference = nn.Linear(3, 2, bias=False)
    with torch.no_grad():
        reference.weight.copy_(start)
    opt = torch.optim.SGD(reference.parameters(), lr=1.0)
    for window in (data[:2], data[2:]):
        opt.zero_grad()
        sum(F.cross_entropy(reference(x), y) for x, y in window).div(len(window)).backward()
        opt.step()
    assert trainer.step == 2 and torch.allclose(model.weight, reference.weight, atol=1e-6)


def test_accumulation_steps_the_optimizer_once_per_window():
    model = tiny_model()
    before = [p.detach().clone() for p in model.parameters()]
    trainer, out = run_epoch(model, accumulate=2)
    assert out["steps"] == 4 and trainer.step == 2
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_gradient_clipping_bounds_the_update():
    model = nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    trainer = Trainer(model, Objective(model), opt, torch.device("cpu"), grad_clip=0.01)
    before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    trainer.train_step(torch.randn(8, 4) * 100, torch.zeros(8, dtype=torch.long))
    after = torch.cat([p.detach().flatten() for p in model.parameters()])
    assert (after - before).norm() <= 0.01 + 1e-6  # SGD lr 1: the step is the clipped gradient


def test_compile_trains_a_binary_block_on_the_cpu():
    """torch.compile through the stage's own model preparation (inductor builds C++ on the
    CPU; skipped where it cannot). Outputs are not compared with eager mode: a fused BN may
    round a value at the sign's threshold the other way, which a binary network amplifies."""
    from omegaconf import OmegaConf

    from bnntrain.engine.setup import prepare_model
    from bnntrain.nn import BinaryBlock, BlockOptions

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), BinaryBlock(8, 8, 1, BlockOptions()),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))
    cfg = OmegaConf.create({"compile": True, "sync_bn": False})
    net = prepare_model(model, torch.device("cpu"), cfg, channels_last=False)
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    trainer = Trainer(net, Objective(model), opt, torch.device("cpu"))
    try:
        out = trainer.train_epoch(batches(n=2))
    except Exception as err:  # no working C++ toolchain for inductor here
        pytest.skip(f"torch.compile does not run on this machine: {type(err).__name__}")
    assert out["steps"] == 2 and torch.isfinite(torch.tensor(out["loss"]))
    assert not any(k.startswith("_orig_mod") for k in model.state_dict())


@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun is installed with torch")
def test_torchrun_two_ranks_match_one_process_over_the_same_global_batch(tmp_path):
    """Two gloo ranks with batch 64 each against one process with batch 128. Without
    SyncBatchNorm (CUDA only) each rank normalises over its own half, so the runs agree
    closely but not exactly; a process with the per-rank batch is the contrast."""
    common = ["data=synthetic", "data.image_size=16", "data.train_size=512", "data.test_size=64",
              "model.width=0.125", "model.binarize=false", "schedule.epochs=1", "stage=1", "trainer.device=cpu",
              "optimizer=sgd", "optimizer.lr=0.02", "optimizer.momentum=0", "optimizer.weight_decay=0"]
    ddp = tmp_path / "ddp"
    out = subprocess.run(["torchrun", "--standalone", "--nproc-per-node=2", "-m", "bnntrain", *common,
                          "data.batch_size=64", f"hydra.run.dir={ddp}"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "stage1: weights identical on all 2 ranks" in out.stdout
    assert out.stdout.count("stage1 epoch 1/1") == 1  # only rank 0 reports
    assert len(list((ddp / "stage1").glob("events.out.tfevents.*"))) == 1  # and writes
    assert results(ddp)["stage1"]["epochs"] == 1
    assert run_cli(common + ["data.batch_size=128"], tmp_path / "one").returncode == 0
    assert run_cli(common + ["data.batch_size=64"], tmp_path / "half").returncode == 0
    weights = {k: torch.load(tmp_path / k / "stage1/last.pt", weights_only=True)["model"] for k in ("ddp", "one", "half")}
    names = [n for n, _ in build_model(make("model.width=0.125").model, num_classes=10, in_channels=3).named_parameters()]
    dist = lambda a, b: sum((weights[a][n] - weights[b][n]).norm() ** 2 for n in names) ** 0.5  # noqa: E731
    assert dist("ddp", "one") < 0.3 * dist("half", "one")


@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun is installed with torch")
def test_torchrun_scales_the_lr_when_asked(tmp_path):
    out = subprocess.run(["torchrun", "--standalone", "--nproc-per-node=2", "-m", "bnntrain", *TINY, "stage=1",
                          "trainer.device=cpu", "trainer.scale_lr=true", f"hydra.run.dir={tmp_path / 'run'}"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert torch.load(tmp_path / "run/stage1/last.pt", weights_only=True)["config"]["optimizer"]["lr"] == 2e-3


def test_joblib_launcher_runs_a_sweep_in_parallel(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    out = run_cli(["-m", "hydra/launcher=local_parallel", "stage=1", "optimizer.lr=1e-3,2e-3",
                   f"hydra.sweep.dir={tmp_path}"] + TINY)
    assert out.returncode == 0, out.stderr
    lrs = [torch.load(tmp_path / j / "stage1/last.pt", weights_only=True)["config"]["optimizer"]["lr"] for j in "01"]
    assert sorted(lrs) == [1e-3, 2e-3]


def test_slurm_launcher_preset_composes():
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    cfg = compose(["hydra/launcher=slurm", "hydra.launcher.partition=gpu", "experiment=imagenet_two_stage"],
                  hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert (launcher.partition, launcher.gpus_per_node, launcher.tasks_per_node) == ("gpu", 8, 8)
    assert launcher.timeout_min > 0 and cfg.data.name == "imagenet"


def test_submitit_launcher_runs_a_job_as_two_ranks(tmp_path):
    """The path a SLURM job takes, on this machine: Hydra's submitit launcher with its local
    executor starts two tasks, submitit's variables make them two gloo ranks of one run."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    out = run_cli(["-m", "hydra/launcher=submitit_local", "hydra.launcher.tasks_per_node=2", "stage=1",
                   "trainer.device=cpu", f"hydra.sweep.dir={tmp_path}"] + TINY)
    assert out.returncode == 0, out.stderr
    log = (tmp_path / "0" / "cli.log").read_text()
    assert "data parallel over 2 ranks, backend gloo" in log
    assert log.count("stage1 epoch 1/1") == 1 and "stage1: weights identical on all 2 ranks" in log
    assert len(list((tmp_path / "0" / "stage1").glob("events.out.tfevents.*"))) == 1  # rank 0 writes
    assert results(tmp_path / "0")["stage1"]["epochs"] == 1
