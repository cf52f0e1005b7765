"""Every recipe option on, end to end through the CLI on tiny data (the other tests run them off).
test_behaviours.py watches the same options act on each training step."""
import csv
import hashlib

import pytest
import torch
from omegaconf import OmegaConf
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn

from bnntrain.distill import build_teacher
from bnntrain.engine import load_checkpoint
from bnntrain.models import model_from_checkpoint
from bnntrain.run import pipeline
from conftest import TINY, results, run_cli, write_image_folder
from test_behaviours import no_decay_on_norm_and_bias

pytestmark = pytest.mark.slow  # every test here trains through the CLI: several seconds each


def sha256(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_augmentation_loss_and_optimizer_options_together(tmp_path):
    run = tmp_path / "run"
    out = run_cli(TINY + ["augment.mixup=0.2", "augment.cutmix=1.0", "+augment.train.autoaugment=cifar10",
                          "+augment.train.lighting.alphastd=0.1", "loss.label_smoothing=0.1", "loss.center.weight=0.01",
                          "optimizer.gradient_centralization=true", no_decay_on_norm_and_bias()], run)
    assert out.returncode == 0, out.stderr
    s1, s2 = (torch.load(run / f"stage{i}/last.pt", weights_only=True) for i in (1, 2))
    assert s1["objective"] == {} and s2["objective"]["center.centers"].shape == (10, 64)  # stage 2 only
    # The centres took gradients: their Adam moments are not zero.
    *_, centres = s2["optimizer"]["param_groups"]
    (index,) = centres["params"]
    assert centres["weight_decay"] == 0.0 and s2["optimizer"]["state"][index]["exp_avg"].abs().max() > 0
    # Weight decay (stage 1's 1e-5) on conv and linear weights only; BN, PReLU and biases exempt.
    model = model_from_checkpoint(s1)
    exempt = [p for m in model.modules() for n, p in m.named_parameters(recurse=False)
              if isinstance(m, (nn.BatchNorm2d, nn.PReLU)) or n == "bias"]
    decayed, spared = s1["optimizer"]["param_groups"]
    assert (decayed["weight_decay"], spared["weight_decay"]) == (1e-5, 0.0)
    assert len(spared["params"]) == len(exempt) and len(decayed["params"]) == len(list(model.parameters())) - len(exempt)
    state = s1["optimizer"]["state"]  # the exempt group's moments have the exempt parameters' shapes, in order
    assert [state[i]["exp_avg"].shape for i in spared["params"]] == [p.shape for p in exempt]
    assert len(s2["optimizer"]["param_groups"]) == 3  # decayed, exempt, centres


def test_distillation_from_a_real_valued_teacher(tmp_path):
    teacher = tmp_path / "teacher"
    pipeline.run(TINY + ["stage=1", "model.binarize=false"], teacher)  # the teacher: what the CLI would run
    teacher_file = teacher / "stage1/last.pt"
    before = sha256(teacher_file)
    run = tmp_path / "run"
    out = run_cli(TINY + ["distill=features", f"distill.teacher.checkpoint={teacher_file}",
                          "distill.kd_weight=0.5", "distill.temperature=4"], run)
    assert out.returncode == 0, out.stderr
    assert list(results(run)) == ["stage1", "stage2"]
    assert sha256(teacher_file) == before  # the frozen teacher is read, never written
    for stage in ("stage1", "stage2"):  # the teacher is neither trained nor saved with the student
        ckpt = torch.load(run / stage / "last.pt", weights_only=True)
        assert ckpt["model"].keys() == torch.load(teacher_file, weights_only=True)["model"].keys()
        trained = sum(len(group["params"]) for group in ckpt["optimizer"]["param_groups"])
        assert trained == len(list(model_from_checkpoint(ckpt).parameters()))  # the student's own
    bad = run_cli(TINY + ["distill=features", f"distill.teacher.checkpoint={teacher / 'stage1/last.pt'}",
                          "model.width=0.25"], tmp_path / "bad")
    assert bad.returncode != 0 and "student 'stages.0' gives" in bad.stderr


def test_label_refinery_in_stage_two(tmp_path):
    run = tmp_path / "run"
    out = run_cli(TINY + ["distill=refinery"], run)
    assert out.returncode == 0, out.stderr
    s2 = load_checkpoint(run / "stage2/last.pt")
    cfg = s2["config"]["distill"]
    assert cfg["teacher"]["checkpoint"] == "init" and cfg["stages"] == ["stage2"] and cfg["kd_weight"] == 1.0
    # The teacher stage 2 builds from its own saved config is the model stage 1 ended with.
    teacher = build_teacher(OmegaConf.create(cfg), s2["init_from"], s2["num_classes"])
    stage1 = model_from_checkpoint(load_checkpoint(run / "stage1/last.pt")).eval()
    x = torch.randn(8, 3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(teacher(x), stage1(x), atol=1e-5)
        assert not torch.allclose(model_from_checkpoint(s2).eval()(x), stage1(x), atol=1e-2)  # not the student


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
    events = EventAccumulator(str(run / "stage2"))
    events.Reload()
    # One warm-up epoch at 1e-3, then the recipe's 4e-3, x0.1 from epoch 2.
    assert [e.value for e in events.Scalars("train/lr")] == pytest.approx([1e-3, 4e-3, 4e-4], rel=1e-6)
    assert "lr 1.00e-03" in out.stdout and "lr 4.00e-03" in out.stdout and "lr 4.00e-04" in out.stdout


def test_ablation_sweep_writes_one_table(tmp_path):
    out = run_cli(["experiment=ablation", "+ablation=baseline,relu,mixup", f"hydra.sweep.dir={tmp_path}"] + TINY)
    assert out.returncode == 0, out.stderr
    rows = list(csv.DictReader(open(tmp_path / "ablation.csv")))
    assert [r["run"] for r in rows] == ["baseline", "relu", "mixup"]
    for job, row in enumerate(rows):  # the table holds each job's own results
        for stage, r in results(tmp_path / str(job)).items():
            assert float(row[f"{stage} top1"]) == round(r["top1"], 2)
            assert float(row[f"{stage} best top1"]) == round(r["best_top1"], 2)
    assert (tmp_path / "ablation.md").read_text().startswith("| run |")
    # The relu job trained ReLU after each addition where the baseline trained PReLU.
    activations = {}
    for job in ("0", "1"):
        model = model_from_checkpoint(torch.load(tmp_path / job / "stage2/last.pt", weights_only=True))
        activations[job] = {type(m) for m in model.stages.modules()} & {nn.ReLU, nn.PReLU}
    assert activations == {"0": {nn.PReLU}, "1": {nn.ReLU}}


def test_kd_from_a_torchvision_teacher(tmp_path):
    import torchvision

    weights = tmp_path / "resnet18.pt"
    torch.save(torchvision.models.resnet18(num_classes=10).state_dict(), weights)
    before = sha256(weights)
    out = run_cli(TINY + ["stage=1", "distill=kd", "distill.teacher.torchvision=resnet18",
                          f"distill.teacher.weights={weights}", "distill.kd_weight=0.7"], tmp_path / "run")
    assert out.returncode == 0, out.stderr
    ckpt = torch.load(tmp_path / "run/stage1/last.pt", weights_only=True)
    assert ckpt["config"]["distill"]["kd_weight"] == 0.7
    assert sha256(weights) == before  # the teacher's weights are read, never written
    assert not any(k.startswith(("teacher", "layer1")) for k in ckpt["model"])  # nor saved with the student


def test_a_failed_ablation_job_is_listed_and_the_others_run(tmp_path):
    out = run_cli(["experiment=ablation", "+ablation=baseline", "optimizer.lr=1e30,1e-3", "stage=1",
                   f"hydra.sweep.dir={tmp_path}"] + TINY)
    assert out.returncode != 0  # the sweep reports its failure...
    rows = list(csv.DictReader(open(tmp_path / "ablation.csv")))
    assert [r["status"] for r in rows] == ["failed", "done"]  # ...after the other job ran
    assert float(rows[1]["stage1 top1"]) == round(results(tmp_path / "1")["stage1"]["top1"], 2)
    assert not (tmp_path / "0/results.json").exists() and "loss became nan" in (tmp_path / "0/failed.txt").read_text()
