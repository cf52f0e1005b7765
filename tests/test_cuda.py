"""The CUDA paths: mixed precision, channels_last, the fused sign-conv, compile, and DDP with
NCCL. Skipped where no GPU is present."""
import os
import shutil
import subprocess

import pytest
import torch
import torch.nn.functional as F

from bnntrain.engine import Trainer
from bnntrain.losses import Objective
from bnntrain.models import build_model
from bnntrain.nn import BinaryConv2d, set_precision
from bnntrain.nn.quantizers import SteSign
from conftest import TINY, results, run_cli
from test_config import make

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


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
    ref = F.conv2d(SteSign.apply(x), conv.quantized_weight(), None, 1, 1)
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
    trainer = Trainer(model, Objective(model), torch.optim.Adam(model.parameters(), 1e-3), torch.device("cuda"),
                      amp=amp, channels_last=channels_last, log_every=1)
    x, y = torch.randn(8, 3, 64, 64), torch.randint(10, (8,))
    out = trainer.train_epoch([(x, y)] * 3)
    assert torch.isfinite(torch.tensor(out["loss"])) and trainer.step == 3
    assert trainer.scaler.is_enabled() == (amp == "fp16")
    metrics = trainer.evaluate([(x, y)])
    assert 0 <= metrics["top1"] <= 100


def test_cli_on_cuda_with_the_defaults_and_compile(tmp_path):
    out = run_cli(TINY + ["trainer.device=cuda"], tmp_path / "run")  # amp and channels_last on by default
    assert out.returncode == 0, out.stderr
    cfg = torch.load(tmp_path / "run/stage2/last.pt", weights_only=True)["config"]["trainer"]
    assert cfg["amp"] == "auto" and results(tmp_path / "run")["stage2"]["epochs"] == 1
    out = run_cli(TINY + ["stage=1", "trainer.device=cuda", "trainer.compile=true"], tmp_path / "compiled")
    assert out.returncode == 0, out.stderr


@pytest.mark.skipif(shutil.which("torchrun") is None, reason="needs torchrun")
def test_torchrun_with_nccl_and_sync_batchnorm(tmp_path):
    n = torch.cuda.device_count()
    out = subprocess.run(["torchrun", "--standalone", f"--nproc-per-node={n}", "-m", "bnntrain", *TINY,
                          "trainer.device=cuda", "trainer.sync_bn=true", f"hydra.run.dir={tmp_path / 'run'}"],
                         capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr
    assert list(results(tmp_path / "run")) == ["stage1", "stage2"]
    assert f"data parallel over {n} ranks, backend nccl" in out.stdout


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
