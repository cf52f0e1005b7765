"""End-to-end: the real CLI in a subprocess, on tiny settings."""
import math

import pytest
import torch
from omegaconf import OmegaConf
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from bnntrain.data import build_loaders
from bnntrain.engine import load_checkpoint
from bnntrain.models import model_from_checkpoint
import forked_cli
from conftest import TINY, results, run_cli, write_cifar100, write_image_folder

pytestmark = pytest.mark.slow  # every test here trains through the CLI: several seconds each

CHECKPOINT_KEYS = {"model", "num_classes", "in_channels", "optimizer", "scheduler", "epoch", "stage", "metrics",
                   "best_top1", "config", "init_from", "objective", "trainer", "precision"}


def test_default_pipeline_runs_both_stages_and_hands_over(tmp_path):
    run = tmp_path / "run"
    out = run_cli(["schedule.epochs=2", "model.width=0.125", "trainer.log_every=5"], run)
    assert out.returncode == 0, out.stderr
    r = results(run)
    assert list(r) == ["stage1", "stage2"]
    # Measured on the bundled digits (360 test images), seed 0: stage 1 77.78%, stage 2 68.89%.
    assert r["stage1"]["top1"] >= 72 and r["stage2"]["top1"] >= 63
    for stage in ("stage1", "stage2"):
        assert {"top1", "top5", "best_top1", "epochs", "checkpoint"} <= set(r[stage])
        assert r[stage]["epochs"] == 2 and r[stage]["checkpoint"] == f"{stage}/last.pt"
        assert r[stage]["best_top1"] >= r[stage]["top1"] and r[stage]["top5"] >= r[stage]["top1"]
        ckpt = torch.load(run / r[stage]["checkpoint"], weights_only=True)
        assert CHECKPOINT_KEYS <= set(ckpt) and ckpt["epoch"] == 2 and ckpt["stage"] == stage
        assert (run / stage / "best.pt").exists() and (run / stage / "config.yaml").exists()
        assert list((run / stage).glob("events.out.tfevents.*"))
    s1 = torch.load(run / "stage1/last.pt", weights_only=True)
    s2 = torch.load(run / "stage2/last.pt", weights_only=True)
    assert s1["init_from"] is None and s2["init_from"] == str(run / "stage1/last.pt")
    assert s1["config"]["optimizer"]["lr"] == 1e-3 and s1["config"]["optimizer"]["weight_decay"] == 1e-5
    assert s2["config"]["optimizer"]["lr"] == 2e-4 and s2["config"]["optimizer"]["weight_decay"] == 0
    assert s2["config"]["stage"]["weights"] == "binary" and s1["config"]["stage"]["weights"] == "real"
    assert "stage1 epoch 1/2" in out.stdout and "stage2 epoch 2/2" in out.stdout  # plain lines, not a bar
    assert "stage2" in out.stdout.split("results")[-1]  # the final table
    assert (run / "config.yaml").exists() and (run / ".hydra" / "overrides.yaml").exists()


def test_tensorboard_scalars_hparams_and_the_cosine_lr(tmp_path):
    run = tmp_path / "run"
    out = run_cli(TINY + ["stage=1", "trainer.log_every=1", "schedule.epochs=3"], run)  # synthetic: cosine
    assert out.returncode == 0, out.stderr
    events = EventAccumulator(str(run / "stage1"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/lr", "val/top1", "val/top5", "val/loss"} <= tags
    assert [e.step for e in events.Scalars("train/loss")] == list(range(1, 13))  # 64 / 16 = 4 steps x 3 epochs
    assert list((run / "stage1" / "hparams").glob("events.out.tfevents.*"))
    # Each epoch's lr is the closed-form cosine from stage 1's lr (1e-3) down to 0 over 3 epochs.
    logged = [(e.step, e.value) for e in events.Scalars("train/lr")]
    assert [step for step, _ in logged] == [1, 2, 3]
    expected = [1e-3 * (1 + math.cos(math.pi * e / 3)) / 2 for e in range(3)]  # 1e-3, 7.5e-4, 2.5e-4
    assert [lr for _, lr in logged] == pytest.approx(expected, rel=1e-6)
    last = torch.load(run / "stage1/last.pt", weights_only=True)
    assert last["optimizer"]["param_groups"][0]["lr"] == pytest.approx(0.0, abs=1e-12)  # after the last epoch


@torch.no_grad()
def evaluate_checkpoint(path):
    """Top-1 and top-5 (%) of a checkpoint's model on the test split it was trained with, counted here."""
    state = load_checkpoint(path)
    cfg = OmegaConf.create(state["config"])
    loaders = build_loaders(cfg.data, cfg.augment, seed=cfg.seed)
    model = model_from_checkpoint(state, str(path)).eval()
    logits, labels = zip(*[(model(x), y) for x, y in loaders.test])
    logits, labels = torch.cat(logits), torch.cat(labels)
    assert len(labels) == len(loaders.test.dataset)
    top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices
    return {"top1": 100.0 * (logits.argmax(1) == labels).float().mean().item(),
            "top5": 100.0 * (top5 == labels[:, None]).any(1).float().mean().item()}


def test_stage1_alone_then_stage2_from_its_checkpoint(tmp_path):
    first, second = tmp_path / "s1", tmp_path / "s2"
    assert run_cli(TINY + ["stage=1"], first).returncode == 0
    assert list(results(first)) == ["stage1"]
    # An lr of 1e-12 keeps stage 2 where it started: its weights show where that was.
    out = run_cli(TINY + ["stage=2", f"init={first / 'stage1/last.pt'}", "optimizer.lr=1e-12"], second)
    assert out.returncode == 0, out.stderr
    ckpt = torch.load(second / "stage2/last.pt", weights_only=True)
    assert ckpt["init_from"] == str(first / "stage1/last.pt") and list(results(second)) == ["stage2"]
    assert_same_weights(torch.load(first / "stage1/last.pt", weights_only=True)["model"], ckpt["model"])


def assert_same_weights(before, after, atol=1e-6):
    """Every parameter equal to within `atol`. BN running statistics follow the batches of the
    new stage whatever its lr, so they are left out (and only they)."""
    assert before.keys() == after.keys()
    skipped = [k for k in before if k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    assert skipped and all(".norm" in k or "bn" in k or k.startswith("stem.") or "shortcut" in k for k in skipped)
    compared = [k for k in before if k not in skipped]
    assert len(compared) > 50
    worst = max((before[k].float() - after[k].float()).abs().max().item() for k in compared)
    assert worst <= atol, worst  # training stage 1 moved its weights by ~1e-3: another start would show


def test_reverse_stage1_variant(tmp_path):
    out = run_cli(TINY + ["stage=1", "stage.activations=real", "stage.weights=binary"], tmp_path / "r")
    assert out.returncode == 0, out.stderr
    ckpt = torch.load(tmp_path / "r/stage1/last.pt", weights_only=True)
    assert (ckpt["config"]["stage"]["activations"], ckpt["config"]["stage"]["weights"]) == ("real", "binary")
    assert ckpt["precision"] == {"activations": "real", "weights": "binary"}  # what the layers trained at
    events = EventAccumulator(str(tmp_path / "r/stage1"))
    events.Reload()
    assert "train/flip_ratio" in events.Tags()["scalars"]  # binary weights: their sign flips are tracked
    model = model_from_checkpoint(ckpt)
    layers = [m for m in model.modules() if hasattr(m, "weight_bits")]
    assert layers and all((m.input_bits, m.weight_bits) == (32, 1) for m in layers)


def test_sweep_runs_each_job_in_its_own_folder(tmp_path):
    out = run_cli(["-m", "stage=1", "optimizer.lr=1e-3,2e-3", *TINY, f"hydra.sweep.dir={tmp_path}"])
    assert out.returncode == 0, out.stderr
    lrs = []
    for job in ("0", "1"):
        assert "stage1" in results(tmp_path / job)
        group = torch.load(tmp_path / job / "stage1/last.pt", weights_only=True)["optimizer"]["param_groups"][0]
        lrs.append(group["initial_lr"])  # the lr each job's optimizer was built with
    assert lrs == [1e-3, 2e-3]


def test_cifar100_pickles_through_the_cli(tmp_path):
    root = write_cifar100(tmp_path / "cifar", n_train=32, n_test=16)
    out = run_cli(["stage=1", "data=cifar100", f"data.root={root}", "data.num_workers=0", "data.batch_size=16",
                   "model.width=0.125", "schedule.epochs=1", "schedule.milestones=[]"], tmp_path / "run")
    assert out.returncode == 0, out.stderr
    ckpt = torch.load(tmp_path / "run/stage1/last.pt", weights_only=True)
    assert ckpt["num_classes"] == 100 and ckpt["model"]["classifier.weight"].shape[0] == 100  # the files' classes
    assert ckpt["trainer"]["step"] == 2  # 32 images in batches of 16
    reported = results(tmp_path / "run")["stage1"]
    assert reported["top1"] == pytest.approx(evaluate_checkpoint(tmp_path / "run/stage1/last.pt")["top1"])


def test_loader_workers_started_by_forkserver(tmp_path):
    """Python 3.14 starts processes with forkserver on Linux: the workers then receive the image
    folder pickled, which a lambda in it made impossible."""
    root = write_image_folder(tmp_path / "imgs", per_class=4, size=20)
    code = ("import multiprocessing; multiprocessing.set_start_method('forkserver', force=True); "
            "from bnntrain.run.cli import main; main()")
    out = forked_cli.run(["-c", code, "stage=1", "data=folder", f"data.root={root}", "data.image_size=16",
                          "data.batch_size=6", "data.num_workers=1", "model.width=0.125", "schedule.epochs=1",
                          f"hydra.run.dir={tmp_path / 'run'}", "trainer.progress=plain"])
    assert out.returncode == 0, out.stderr
    assert results(tmp_path / "run")["stage1"]["epochs"] == 1


def test_image_folder_through_the_cli_with_workers(tmp_path):
    root = write_image_folder(tmp_path / "imgs")
    out = run_cli(["stage=1", "data=folder", f"data.root={root}", "data.num_workers=2", "data.batch_size=6",
                   "data.image_size=16", "model.width=0.125", "schedule.epochs=1"], tmp_path / "run")
    assert out.returncode == 0, out.stderr
    reported = results(tmp_path / "run")["stage1"]
    ckpt = tmp_path / "run/stage1/last.pt"
    assert torch.load(ckpt, weights_only=True)["num_classes"] == 3
    # The reported accuracy is that of the saved model on the 18 test images, counted again here.
    again = evaluate_checkpoint(ckpt)
    assert reported["top1"] == pytest.approx(again["top1"]) and reported["top5"] == pytest.approx(again["top5"])
    assert round(reported["top1"] * 18 / 100, 6).is_integer()
