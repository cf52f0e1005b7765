"""Every recipe option on, end to end through the CLI on tiny data (the other tests run them off)."""
import csv

import torch

from conftest import TINY, results, run_cli, write_image_folder


def test_augmentation_loss_and_optimizer_options_together(tmp_path):
    run = tmp_path / "run"
    out = run_cli(TINY + ["augment.mixup=0.2", "augment.cutmix=1.0", "+augment.train.autoaugment=cifar10",
                          "+augment.train.lighting.alphastd=0.1", "loss.label_smoothing=0.1", "loss.center.weight=0.01",
                          "optimizer.gradient_centralization=true", "optimizer.weight_decay_norm_and_bias=false"], run)
    assert out.returncode == 0, out.stderr
    s1, s2 = (torch.load(run / f"stage{i}/last.pt", weights_only=True) for i in (1, 2))
    assert s1["objective"] == {} and s2["objective"]["center.centers"].shape == (10, 64)  # stage 2 only
    assert len(s2["optimizer"]["param_groups"]) == 3  # decayed, exempt, centres


def test_distillation_from_a_real_valued_teacher(tmp_path):
    teacher = tmp_path / "teacher"
    assert run_cli(TINY + ["stage=1", "model.binarize=false"], teacher).returncode == 0
    run = tmp_path / "run"
    out = run_cli(TINY + ["distill=features", f"distill.teacher.checkpoint={teacher / 'stage1/last.pt'}",
                          "distill.kd_weight=0.5", "distill.temperature=4"], run)
    assert out.returncode == 0, out.stderr
    assert results(run)["stage2"]["epochs"] == 1
    bad = run_cli(TINY + ["distill=features", f"distill.teacher.checkpoint={teacher / 'stage1/last.pt'}",
                          "model.width=0.25"], tmp_path / "bad")
    assert bad.returncode != 0 and "student 'stages.0' gives" in bad.stderr


def test_label_refinery_in_stage_two(tmp_path):
    run = tmp_path / "run"
    out = run_cli(TINY + ["distill=refinery"], run)
    assert out.returncode == 0, out.stderr
    cfg = torch.load(run / "stage2/last.pt", weights_only=True)["config"]["distill"]
    assert cfg["teacher"]["checkpoint"] == "init" and cfg["stages"] == ["stage2"]


def test_one_stage_imagenet_recipe_with_the_image_scale_setting(tmp_path):
    root = write_image_folder(tmp_path / "inet", size=40, test_split="val")
    run = tmp_path / "run"
    out = run_cli(["experiment=imagenet_one_stage", f"data.root={root}", "data.num_workers=0", "data.batch_size=6",
                   "model.width=0.125", "augment=imagenet_rescale", "augment.train.resize=36",
                   "augment.train.random_crop=32", "augment.test.resize=43", "augment.test.center_crop=32",
                   "+augment.train.lighting.alphastd=0.1", "schedule.epochs=3", "schedule.milestones=[2]",
                   "schedule.warmup_epochs=1"], run)
    assert out.returncode == 0, out.stderr
    assert list(results(run)) == ["stage2"]
    assert "lr 1.00e-03" in out.stdout and "lr 4.00e-03" in out.stdout and "lr 4.00e-04" in out.stdout


def test_ablation_sweep_writes_one_table(tmp_path):
    out = run_cli(["experiment=ablation", "+ablation=baseline,relu,mixup", f"hydra.sweep.dir={tmp_path}"] + TINY)
    assert out.returncode == 0, out.stderr
    rows = list(csv.DictReader(open(tmp_path / "ablation.csv")))
    assert [r["run"] for r in rows] == ["baseline", "relu", "mixup"]
    assert all(0 <= float(r["stage2 top1"]) <= 100 and float(r["stage2 best top1"]) >= float(r["stage2 top1"])
               for r in rows)
    assert (tmp_path / "ablation.md").read_text().startswith("| run |")
    relu = torch.load(tmp_path / "1/stage2/last.pt", weights_only=True)["config"]["model"]["activation"]
    assert relu == "relu"


def test_kd_from_a_torchvision_teacher(tmp_path):
    import torchvision

    weights = tmp_path / "resnet18.pt"
    torch.save(torchvision.models.resnet18(num_classes=10).state_dict(), weights)
    out = run_cli(TINY + ["stage=1", "distill=kd", "distill.teacher.torchvision=resnet18",
                          f"distill.teacher.weights={weights}", "distill.kd_weight=0.7"], tmp_path / "run")
    assert out.returncode == 0, out.stderr
    assert torch.load(tmp_path / "run/stage1/last.pt", weights_only=True)["config"]["distill"]["kd_weight"] == 0.7


def test_a_failed_ablation_job_is_listed_and_the_others_run(tmp_path):
    out = run_cli(["experiment=ablation", "+ablation=baseline", "optimizer.lr=1e30,1e-3", "stage=1",
                   f"hydra.sweep.dir={tmp_path}"] + TINY)
    assert out.returncode != 0  # the sweep reports its failure...
    rows = list(csv.DictReader(open(tmp_path / "ablation.csv")))
    assert [r["status"] for r in rows] == ["failed", "done"]  # ...after the other job ran
    assert float(rows[1]["stage1 top1"]) >= 0
