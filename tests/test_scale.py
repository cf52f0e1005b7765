"""Speed and scale options on the CPU: AMP, channels_last, compile, clipping, accumulation,
torchrun data parallelism with gloo, and the Hydra launchers."""
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn

from bnntrain.run import pipeline
from bnntrain.run.config import compose
from bnntrain.engine import Trainer
from bnntrain.losses import Objective
from bnntrain.models import build_model
from conftest import TINY, need, results, run_cli
from test_config import make

# torchrun is torch.distributed.run; launched through this interpreter it needs nothing on PATH.
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]


def torchrun(args: list[str], timeout: int = 300, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc-per-node=2 ARGS` (ARGS: `-m bnntrain ...` or a script), captured."""
    return subprocess.run(TORCHRUN + args, capture_output=True, text=True, timeout=timeout, cwd=cwd,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "0"})


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


def record_convs(model):
    """Every conv call of `model`, as (output dtype, input in channels_last, training)."""
    calls = []

    def hook(module, args, output):
        calls.append((output.dtype, args[0].is_contiguous(memory_format=torch.channels_last), module.training))

    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    for conv in convs:
        conv.register_forward_hook(hook)
    return calls, len(convs)


def adam_steps(optimizer):
    """The optimizer steps Adam actually took, per parameter (a step skipped for an inf is not counted)."""
    return {int(state["step"]) for state in optimizer.state.values()}


def skipped_steps(scaler) -> int:
    """Steps the gradient scaler skipped for overflowing gradients: each halved its scale (it
    grows back only after 2,000 good steps)."""
    return round(math.log2(65536.0 / scaler.get_scale()))


def test_bf16_autocast_and_channels_last_on_the_cpu():
    model = tiny_model().to(memory_format=torch.channels_last)
    calls, n_convs = record_convs(model)
    trainer, out = run_epoch(model, amp="bf16", channels_last=True)
    trainer.evaluate(batches())
    assert trainer.step == 4 and math.isfinite(out["loss"]) and adam_steps(trainer.optimizer) == {4}
    assert [training for _, _, training in calls].count(True) == 4 * n_convs  # four training batches
    assert [training for _, _, training in calls].count(False) == 4 * n_convs  # and four evaluated
    # Every conv, in training and in evaluation, ran in bf16 on channels_last input ...
    assert {dtype for dtype, _, _ in calls} == {torch.bfloat16}
    assert all(channels_last for _, channels_last, _ in calls)
    # ... while the weights the optimizer updates stay float32.
    assert {p.dtype for p in model.parameters()} == {torch.float32}


def test_fp16_autocast_with_a_gradient_scaler_on_the_cpu():
    # Whether this CPU build runs fp16 autocast at all, asked of bare torch ops: where it does
    # not, autocast raises or warns and runs float32.
    try:
        with torch.autocast("cpu", dtype=torch.float16):
            probe = [torch.ones(2, 2) @ torch.ones(2, 2), F.conv2d(torch.ones(1, 1, 3, 3), torch.ones(1, 1, 1, 1))]
    except RuntimeError as err:
        pytest.skip(f"fp16 autocast does not run on this CPU: {err}")
    if any(t.dtype != torch.float16 for t in probe):
        pytest.skip("fp16 autocast is not supported on this CPU build")

    model = tiny_model()
    calls, n_convs = record_convs(model)
    trainer, out = run_epoch(model, amp="fp16")
    assert trainer.scaler.is_enabled() and math.isfinite(out["loss"])
    assert {dtype for dtype, _, _ in calls} == {torch.float16} and len(calls) == 4 * n_convs
    # Four optimizer steps, less any the scaler skipped because the scaled gradients overflowed.
    skipped = skipped_steps(trainer.scaler)
    assert trainer.step == 4 and skipped < 4 and adam_steps(trainer.optimizer) == {4 - skipped}
    assert {p.dtype for p in model.parameters()} == {torch.float32}

    # The scaler unscales before the step: one SGD step equals the float32 step to fp16 rounding
    # (a scaled gradient would move the weights 65,536 times as far).
    torch.manual_seed(0)
    x, y = torch.randn(16, 8), torch.randint(3, (16,))
    steps = []
    for amp in ("fp16", None):
        torch.manual_seed(1)
        linear = nn.Linear(8, 3)
        start = linear.weight.detach().clone()
        trainer = Trainer(linear, Objective(linear), torch.optim.SGD(linear.parameters(), lr=0.1),
                          torch.device("cpu"), amp=amp)
        trainer.train_step(x, y)
        steps.append(linear.weight.detach() - start)
    assert steps[1].abs().max() > 1e-3
    assert torch.allclose(steps[0], steps[1], rtol=2e-2, atol=1e-4)


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
    trainer, out = run_epoch(model, accumulate=2)
    assert out["steps"] == 4 and trainer.step == 2
    assert adam_steps(trainer.optimizer) == {2}  # four batches, two optimizer steps for every parameter


def test_gradient_clipping_bounds_the_update():
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    trainer = Trainer(model, Objective(model), opt, torch.device("cpu"), grad_clip=0.01)
    before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    trainer.train_step(torch.randn(8, 4) * 100, torch.zeros(8, dtype=torch.long))
    after = torch.cat([p.detach().flatten() for p in model.parameters()])
    # SGD with lr 1: the step is the gradient, whose norm (far above 0.01 here) was clipped to 0.01.
    assert (after - before).norm().item() == pytest.approx(0.01, rel=1e-4)


@pytest.mark.slow
def test_compile_trains_a_binary_block_on_the_cpu():
    """torch.compile through the stage's own model preparation (inductor builds C++ on the
    CPU; skipped only where torch.compile cannot compile a trivial function). Outputs are not
    compared with eager mode: a fused BN may round a value at the sign's threshold the other
    way, which a binary network amplifies."""
    from torch._dynamo.utils import counters

    from bnntrain.engine.setup import prepare_model
    from bnntrain.nn import BinaryBlock, BlockOptions

    try:
        torch.compile(lambda t: torch.sin(t) + 1)(torch.randn(4))
    except Exception as err:  # the probe is bare torch: no working C++ toolchain for inductor here
        pytest.skip(f"torch.compile does not run on this machine: {type(err).__name__}: {err}")
    torch._dynamo.reset()
    counters.clear()

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), BinaryBlock(8, 8, 1, BlockOptions.from_config(make().model)),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))
    before = [p.detach().clone() for p in model.parameters()]
    cfg = OmegaConf.create({"compile": True, "sync_bn": False})
    net = prepare_model(model, torch.device("cpu"), cfg, channels_last=False)
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    trainer = Trainer(net, Objective(model), opt, torch.device("cpu"))
    out = trainer.train_epoch(batches(n=2))
    assert out["steps"] == 2 and math.isfinite(out["loss"]) and adam_steps(opt) == {2}
    assert net is not model and net._orig_mod is model  # the compiled wrapper around our model
    assert counters["stats"]["unique_graphs"] >= 1  # dynamo compiled the model's forward
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert not any(k.startswith("_orig_mod") for k in model.state_dict())


@pytest.mark.slow
def test_torchrun_two_ranks_match_one_process_over_the_same_global_batch(tmp_path):
    """Two gloo ranks with batch 64 each against one process with batch 128, the centre loss
    on. Without SyncBatchNorm (CUDA only) each rank normalises over its own half, so the runs
    agree closely but not exactly; a process with the per-rank batch is the contrast. The
    centres live outside DDP and have their gradients averaged by our loop: summed or left
    per rank, they would land twice as far or the ranks would part."""
    common = ["data=synthetic", "data.image_size=16", "data.train_size=512", "data.test_size=64",
              "model.width=0.125", "model.binarize=false", "schedule.epochs=1", "stage=1", "trainer.device=cpu",
              "optimizer=sgd", "optimizer.lr=0.02", "optimizer.momentum=0", "optimizer.weight_decay=0",
              "loss.center.weight=0.01", "loss.center.stages=[stage1]"]
    ddp = tmp_path / "ddp"
    out = torchrun(["-m", "bnntrain", *common, "data.batch_size=64", f"hydra.run.dir={ddp}"])
    assert out.returncode == 0, out.stderr
    assert "data parallel over 2 ranks, backend gloo" in out.stdout
    assert "stage1: weights identical on all 2 ranks" in out.stdout  # the model and the centres
    assert out.stdout.count("stage1 epoch 1/1") == 1  # only rank 0 reports
    assert len(list((ddp / "stage1").glob("events.out.tfevents.*"))) == 1  # and writes
    assert results(ddp)["stage1"]["epochs"] == 1
    # The one-process references, by the pipeline the CLI runs, here: no process to start.
    pipeline.run(common + ["data.batch_size=128"], tmp_path / "one")
    pipeline.run(common + ["data.batch_size=64"], tmp_path / "half")
    saved = {k: torch.load(tmp_path / k / "stage1/last.pt", weights_only=True) for k in ("ddp", "one", "half")}
    model = build_model(make("model.width=0.125").model, num_classes=10, in_channels=3)
    names = [n for n, _ in model.named_parameters()]

    def dist(a, b, part, keys):
        return sum((saved[a][part][k] - saved[b][part][k]).norm() ** 2 for k in keys) ** 0.5

    assert dist("ddp", "one", "model", names) < 0.3 * dist("half", "one", "model", names)
    centres = ["center.centers"]
    assert dist("ddp", "one", "objective", centres) < 0.3 * dist("half", "one", "objective", centres)


@pytest.mark.slow
def test_torchrun_scales_the_lr_splits_the_evaluation_and_shares_rank_0s_folder(tmp_path):
    """One run under torchrun, for four things: the lr scaled by the number of ranks when
    asked; 33 test images on two ranks, 17 and 16, each counted once (the accuracy the run
    reports is that of one process evaluating the same weights on the whole test set, where
    a padded split would count one image twice, out of 34); with no hydra.run.dir, the
    ranks share the one run folder rank 0 made; and ReCU's weights in stage 1, whose alpha
    gets no gradient while the weights are real (DDP refuses that at the second step unless
    told to look for unused parameters)."""
    from bnntrain.data import build_loaders
    from bnntrain.nn import set_precision

    out = torchrun(["-m", "bnntrain", *TINY, "stage=1", "data.test_size=33", "trainer.device=cpu",
                    "trainer.scale_lr=true", "~model.weight_quantizer", "+model.weight_quantizer={name:recu}"],
                   cwd=tmp_path)  # no hydra.run.dir
    assert out.returncode == 0, out.stderr
    assert "data parallel over 2 ranks, backend gloo" in out.stdout
    (run,) = (tmp_path / "outputs").glob("*/*")
    assert (run / "stage1/last.pt").exists() and (run / ".hydra/overrides.yaml").exists()
    saved = torch.load(run / "stage1/last.pt", weights_only=True)
    # The lr the optimizer trained with (before the schedule), not just the config's.
    assert {g["initial_lr"] for g in saved["optimizer"]["param_groups"]} == {2e-3}
    assert "lr 2.00e-03" in out.stdout and saved["config"]["optimizer"]["lr"] == 2e-3

    cfg = OmegaConf.create(saved["config"])
    loaders = build_loaders(cfg.data, cfg.augment, seed=cfg.seed)
    assert len(loaders.test.dataset) == 33
    model = build_model(cfg.model, num_classes=saved["num_classes"], in_channels=saved["in_channels"])
    model.load_state_dict(saved["model"])
    set_precision(model, **saved["precision"])
    trainer = Trainer(model, Objective(model), torch.optim.SGD(model.parameters(), lr=0.1), torch.device("cpu"))
    alone = trainer.evaluate(loaders.test)
    reported = saved["metrics"]
    hits = round(reported["top1"] * 33 / 100)
    assert 0 < hits < 33 and reported["top1"] == pytest.approx(100 * hits / 33, abs=1e-9)  # out of 33
    assert reported["top1"] == alone["top1"] and reported["top5"] == alone["top5"]
    assert reported["loss"] == pytest.approx(alone["loss"], rel=1e-5)
    assert results(run)["stage1"]["top1"] == reported["top1"]


DIVERGE = """
import sys

import torch

from bnntrain.run.cli import main
from bnntrain.engine import distributed

agree = distributed.weights_agree
perturbed = []


def diverge_then_check(module):
    # The stage's end-of-stage check, after rank 1's weights have drifted (once).
    if distributed.rank() == 1 and not perturbed:
        with torch.no_grad():
            next(module.parameters()).add_(1e-3)
        perturbed.append(True)
    return agree(module)


distributed.weights_agree = diverge_then_check
main()
"""

AGREE = """
import sys

import torch
from torch import nn

from bnntrain.engine import distributed

distributed.init("cpu")
assert distributed.world_size() == 2
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
verdicts = [distributed.weights_agree(model)]
if distributed.rank() == 1:
    with torch.no_grad():
        model[0].weight[0, 0] += 1e-3
verdicts.append(distributed.weights_agree(model))  # a parameter differs
if distributed.rank() == 1:
    with torch.no_grad():
        model[0].weight[0, 0] -= 1e-3
        model[1].running_mean[0] += 1e-3
verdicts.append(distributed.weights_agree(model))  # a buffer differs
with open(f"{sys.argv[1]}/rank{distributed.rank()}.txt", "w") as f:  # a file each: ranks' stdout lines interleave
    f.write(str(verdicts))
distributed.shutdown()
"""


@pytest.mark.slow
def test_weights_agree_tells_every_rank_when_one_differs(tmp_path):
    script = tmp_path / "agree.py"
    script.write_text(AGREE)
    out = torchrun([str(script), str(tmp_path)], timeout=120)
    assert out.returncode == 0, out.stderr
    for rank in (0, 1):
        assert (tmp_path / f"rank{rank}.txt").read_text() == "[True, False, False]", rank


@pytest.mark.slow
def test_ranks_that_end_a_stage_with_different_weights_stop_the_run(tmp_path):
    """The real CLI under torchrun, rank 1's weights nudged just before the end-of-stage
    check: the run stops there and the stage is not recorded as finished."""
    script, run = tmp_path / "diverge.py", tmp_path / "run"
    script.write_text(DIVERGE)
    out = torchrun([str(script), *TINY, "stage=1", "trainer.device=cpu", f"hydra.run.dir={run}"])
    assert out.returncode != 0
    assert "stage1: the ranks ended with different weights" in out.stderr, out.stderr
    assert "weights identical" not in out.stdout + out.stderr
    assert not (run / "results.json").exists()


@pytest.mark.slow
def test_joblib_launcher_runs_a_sweep_in_parallel(tmp_path):
    need("hydra_plugins.hydra_joblib_launcher", extra="joblib")
    out = run_cli(["-m", "hydra/launcher=local_parallel", "stage=1", "optimizer.lr=1e-3,2e-3",
                   f"hydra.sweep.dir={tmp_path}"] + TINY)
    assert out.returncode == 0, out.stderr
    assert "Joblib.Parallel" in out.stdout + out.stderr and "launching 2 jobs" in out.stdout + out.stderr
    saved = [torch.load(tmp_path / j / "stage1/last.pt", weights_only=True) for j in "01"]
    # Each job trained with its own lr: the optimizer's, not only the config's.
    trained = sorted(g["initial_lr"] for s in saved for g in s["optimizer"]["param_groups"][:1])
    assert trained == [1e-3, 2e-3]
    assert sorted(s["config"]["optimizer"]["lr"] for s in saved) == [1e-3, 2e-3]
    assert all(results(tmp_path / j)["stage1"]["epochs"] == 1 for j in "01")


def test_slurm_launcher_preset_composes():
    need("hydra_plugins.hydra_submitit_launcher", extra="slurm")
    cfg = compose(["hydra/launcher=slurm", "hydra.launcher.partition=gpu", "experiment=imagenet_two_stage"],
                  hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert (launcher.partition, launcher.gpus_per_node, launcher.tasks_per_node) == ("gpu", 8, 8)
    assert launcher.timeout_min > 0 and cfg.data.name == "imagenet"


@pytest.mark.slow
def test_submitit_launcher_runs_a_job_as_two_ranks(tmp_path):
    """The path a SLURM job takes, on this machine: Hydra's submitit launcher with its local
    executor starts two tasks, submitit's variables make them two gloo ranks of one run."""
    need("hydra_plugins.hydra_submitit_launcher", extra="slurm")
    out = run_cli(["-m", "hydra/launcher=submitit_local", "hydra.launcher.tasks_per_node=2", "stage=1",
                   "trainer.device=cpu", f"hydra.sweep.dir={tmp_path}"] + TINY)
    assert out.returncode == 0, out.stderr
    log = (tmp_path / "0" / "cli.log").read_text()
    assert "data parallel over 2 ranks, backend gloo" in log
    assert log.count("stage1 epoch 1/1") == 1 and "stage1: weights identical on all 2 ranks" in log
    assert len(list((tmp_path / "0" / "stage1").glob("events.out.tfevents.*"))) == 1  # rank 0 writes
    assert results(tmp_path / "0")["stage1"]["epochs"] == 1
