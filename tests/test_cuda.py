"""The CUDA paths: mixed precision, channels_last, the fused sign-conv, compile, and DDP with
NCCL. Skipped where no GPU is present."""
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from bnntrain.engine import Trainer
from bnntrain.losses import Objective
from bnntrain.models import build_model
from bnntrain.nn import BinaryConv2d, set_precision
from bnntrain.nn.quantizers import INPUT_QUANTIZERS
from conftest import TINY, results
from test_config import make
from test_scale import adam_steps, record_convs, skipped_steps

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "0"}

# `python -m bnntrain ARGS`, watched: a global forward hook notes each conv call's output dtype,
# device and whether its input was channels_last, by phase (training; evaluation, which runs in
# inference mode; the cost report's one no-grad float32 pass is "other"), and the modules that
# ran; at exit the record goes to argv[1] (one file per rank under torchrun) with the number of
# graphs torch.compile built. A compiled model calls no Python hooks, so those runs are not watched.
RECORD = """
import atexit, json, os, sys

import torch
from torch import nn

path = sys.argv.pop(1) + (f".rank{os.environ['RANK']}" if "RANK" in os.environ else "")
convs, modules = set(), set()


def record(module, args, output):
    modules.add(type(module).__name__)
    if isinstance(module, nn.Conv2d) and isinstance(output, torch.Tensor):
        phase = ("eval" if torch.is_inference_mode_enabled() else
                 "train" if torch.is_grad_enabled() and module.training else "other")
        convs.add((phase, str(output.dtype), output.device.type,
                   args[0].is_contiguous(memory_format=torch.channels_last)))


def dump():
    from torch._dynamo.utils import counters
    with open(path, "w") as f:
        json.dump({"convs": sorted(convs), "modules": sorted(modules),
                   "graphs": counters["stats"]["unique_graphs"]}, f)


if "trainer.compile=true" not in sys.argv:
    nn.modules.module.register_module_forward_hook(record)
atexit.register(dump)

from bnntrain.run.cli import main

main()
"""


def watched_run(tmp_path, args, launcher=(sys.executable, "-c")):
    """Run the CLI under RECORD; return the process and the path its record(s) start with."""
    record = tmp_path / "record.json"
    if launcher[-1] == "-c":
        cmd = [*launcher, RECORD, str(record), *args]
    else:  # torchrun runs a script file
        script = tmp_path / "record.py"
        script.write_text(RECORD)
        cmd = [*launcher, str(script), str(record), *args]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=ENV)
    return out, record


def assert_bf16_channels_last_on_cuda(record):
    """Every conv of training and evaluation ran in bf16, on the GPU, on channels_last input."""
    convs = {tuple(c) for c in record["convs"] if c[0] in ("train", "eval")}
    assert {c[0] for c in convs} == {"train", "eval"}, record
    assert convs == {("train", "torch.bfloat16", "cuda", True), ("eval", "torch.bfloat16", "cuda", True)}, record


def test_fused_sign_conv_matches_the_reference_on_cuda():
    torch.manual_seed(0)
    conv = BinaryConv2d(16, 32, 3, padding=1).cuda()
    conv.set_precision("binary", "binary")
    x = torch.randn(4, 16, 12, 12, device="cuda", requires_grad=True)
    y = conv(x)
    g = torch.randn_like(y)
    y.backward(g)
    gx, gw = x.grad.clone(), conv.weight.grad.clone()
    x.grad, conv.weight.grad = None, None
    ref = F.conv2d(INPUT_QUANTIZERS.get("ste_sign")()(x), conv.quantized_weight(), None, 1, 1)
    ref.backward(g)
    assert torch.allclose(y, ref, atol=1e-4) and torch.allclose(gx, x.grad, atol=1e-4)
    assert torch.allclose(gw, conv.weight.grad, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("amp", [None, "bf16", "fp16"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_training_steps_with_amp_and_channels_last(amp, channels_last):
    torch.manual_seed(0)
    model = build_model(make("data=imagenet", "model.width=0.25").model, num_classes=10, in_channels=3)
    set_precision(model, "binary", "binary")
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model.cuda().to(memory_format=fmt)
    calls, n_convs = record_convs(model)
    trainer = Trainer(model, Objective(model), torch.optim.Adam(model.parameters(), 1e-3), torch.device("cuda"),
                      amp=amp, channels_last=channels_last, log_every=1)
    x, y = torch.randn(8, 3, 64, 64), torch.randint(10, (8,))
    out = trainer.train_epoch([(x, y)] * 3)
    trainer.evaluate([(x, y)])
    assert torch.isfinite(torch.tensor(out["loss"])) and trainer.step == 3
    assert trainer.scaler.is_enabled() == (amp == "fp16")
    skipped = skipped_steps(trainer.scaler) if amp == "fp16" else 0
    assert skipped < 3 and adam_steps(trainer.optimizer) == {3 - skipped}
    expected = {None: torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[amp]
    assert len(calls) == 4 * n_convs  # three training batches, one evaluated
    assert {dtype for dtype, _, _ in calls} == {expected}  # in training and in evaluation
    if channels_last:
        assert all(cl for _, cl, _ in calls)
    assert {p.dtype for p in model.parameters()} == {torch.float32}


@pytest.mark.slow
def test_cli_on_cuda_runs_bf16_and_channels_last_by_default(tmp_path):
    out, record = watched_run(tmp_path, TINY + [f"hydra.run.dir={tmp_path / 'run'}"])  # trainer.* all auto
    assert out.returncode == 0, out.stderr
    assert_bf16_channels_last_on_cuda(json.loads(record.read_text()))
    assert [results(tmp_path / "run")[s]["epochs"] for s in ("stage1", "stage2")] == [1, 1]


@pytest.mark.slow
def test_cli_on_cuda_compiles_the_model(tmp_path):
    out, record = watched_run(tmp_path, TINY + ["stage=1", "trainer.device=cuda", "trainer.compile=true",
                                                f"hydra.run.dir={tmp_path / 'run'}"])
    assert out.returncode == 0, out.stderr
    assert json.loads(record.read_text())["graphs"] >= 1  # torch.compile built graphs for the model
    saved = torch.load(tmp_path / "run/stage1/last.pt", weights_only=True)
    assert not any(k.startswith("_orig_mod") for k in saved["model"])
    assert results(tmp_path / "run")["stage1"]["epochs"] == 1


@pytest.mark.slow
def test_torchrun_with_nccl_and_sync_batchnorm(tmp_path):
    n = torch.cuda.device_count()
    torchrun = (sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}")
    out, record = watched_run(tmp_path, TINY + ["trainer.device=cuda", "trainer.sync_bn=true",
                                                f"hydra.run.dir={tmp_path / 'run'}"], launcher=torchrun)
    assert out.returncode == 0, out.stderr
    assert list(results(tmp_path / "run")) == ["stage1", "stage2"]
    assert f"data parallel over {n} ranks, backend nccl" in out.stdout
    if n > 1:
        assert f"stage2: weights identical on all {n} ranks" in out.stdout
    for rank in range(n):
        seen = json.loads(record.with_name(f"{record.name}.rank{rank}").read_text())
        assert "SyncBatchNorm" in seen["modules"] and "BatchNorm2d" not in seen["modules"]  # every BN synced
        assert_bf16_channels_last_on_cuda(seen)


def test_batches_are_normalised_and_mixed_on_the_gpu(tmp_path):
    from bnntrain.data import build_loaders
    from conftest import write_image_folder

    root = write_image_folder(tmp_path / "imgs", size=20)
    cfg = make("data=folder", f"data.root={root}", "data.image_size=16", "data.batch_size=4", "data.num_workers=2",
               "augment.mixup=0.2")
    gpu = build_loaders(cfg.data, cfg.augment, device="cuda")
    cpu = build_loaders(cfg.data, cfg.augment, device="cpu")
    assert gpu.test.loader.pin_memory and not cpu.test.loader.pin_memory
    (x, y), (x_cpu, y_cpu) = next(iter(gpu.test)), next(iter(cpu.test))
    assert x.is_cuda and x.dtype == torch.float32 and torch.allclose(x.cpu(), x_cpu, atol=1e-5)
    assert torch.equal(y.cpu(), y_cpu)
    images, targets = next(iter(gpu.train))
    assert images.is_cuda and targets.is_cuda and targets.shape == (4, 3)  # mixed: class probabilities
    assert torch.allclose(targets.sum(1), torch.ones(4, device="cuda"))
