"""End-to-end: the real CLI in a subprocess, on tiny settings."""
import json

import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import TINY, results, run_cli, write_cifar100, write_image_folder

CHECKPOINT_KEYS = {"model", "num_classes", "in_channels", "optimizer", "scheduler", "epoch", "stage", "metrics",
                   "best_top1", "config", "init_from", "objective", "trainer", "precision"}


def test_default_pipeline_runs_both_stages_and_hands_over(tmp_path):
    run = tmp_path / "run"
    out = run_cli(["schedule.epochs=2", "model.width=0.125", "trainer.log_every=5"], run)
    assert out.returncode == 0, out.stderr
    r = results(run)
    assert list(r) == ["stage1", "stage2"]
    for stage in ("stage1", "stage2"):
        assert {"top1", "top5", "best_top1", "epochs", "checkpoint"} <= set(r[stage])
        assert r[stage]["epochs"] == 2 and 0 <= r[stage]["top1"] <= 100 and r[stage]["checkpoint"] == f"{stage}/last.pt"
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


def test_tensorboard_scalars_and_hparams(tmp_path):
    run = tmp_path / "run"
    assert run_cli(TINY + ["stage=1", "trainer.log_every=1"], run).returncode == 0
    events = EventAccumulator(str(run / "stage1"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/lr", "val/top1", "val/top5", "val/loss"} <= tags
    assert len(events.Scalars("train/loss")) == 4  # 64 images / batch 16, logged every step
    assert list((run / "stage1" / "hparams").glob("events.out.tfevents.*"))


def test_stage1_alone_then_stage2_from_its_checkpoint(tmp_path):
    first, second = tmp_path / "s1", tmp_path / "s2"
    assert run_cli(TINY + ["stage=1"], first).returncode == 0
    assert list(results(first)) == ["stage1"]
    out = run_cli(TINY + ["stage=2", f"init={first / 'stage1/last.pt'}"], second)
    assert out.returncode == 0, out.stderr
    ckpt = torch.load(second / "stage2/last.pt", weights_only=True)
    assert ckpt["init_from"] == str(first / "stage1/last.pt") and list(results(second)) == ["stage2"]


def test_reverse_stage1_variant(tmp_path):
    out = run_cli(TINY + ["stage=1", "stage.activations=real", "stage.weights=binary"], tmp_path / "r")
    assert out.returncode == 0, out.stderr
    cfg = torch.load(tmp_path / "r/stage1/last.pt", weights_only=True)["config"]["stage"]
    assert (cfg["activations"], cfg["weights"]) == ("real", "binary")


def test_sweep_runs_each_job_in_its_own_folder(tmp_path):
    out = run_cli(["-m", "stage=1", "data=digits", "optimizer.lr=1e-3,2e-3", "schedule.epochs=1",
                   "model.width=0.125", f"hydra.sweep.dir={tmp_path}"])
    assert out.returncode == 0, out.stderr
    lrs = []
    for job in ("0", "1"):
        assert "stage1" in results(tmp_path / job)
        lrs.append(torch.load(tmp_path / job / "stage1/last.pt", weights_only=True)["config"]["optimizer"]["lr"])
    assert lrs == [1e-3, 2e-3]


def test_cifar100_pickles_through_the_cli(tmp_path):
    root = write_cifar100(tmp_path / "cifar", n_train=32, n_test=16)
    out = run_cli(["stage=1", "data=cifar100", f"data.root={root}", "data.num_workers=0", "data.batch_size=16",
                   "model.width=0.125", "schedule.epochs=1", "schedule.milestones=[]"], tmp_path / "run")
    assert out.returncode == 0, out.stderr
    assert results(tmp_path / "run")["stage1"]["epochs"] == 1


def test_image_folder_through_the_cli_with_workers(tmp_path):
    root = write_image_folder(tmp_path / "imgs")
    out = run_cli(["stage=1", "data=folder", f"data.root={root}", "data.num_workers=2", "data.batch_size=6",
                   "data.image_size=16", "model.width=0.125", "schedule.epochs=1"], tmp_path / "run")
    assert out.returncode == 0, out.stderr
    cfg = json.loads((tmp_path / "run/results.json").read_text())
    assert cfg["stage1"]["top1"] is not None
