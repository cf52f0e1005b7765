"""The config model: each value has one owner, what `--cfg job` shows is what each stage
trains, and a bad value stops before anything is written. Through the real CLI."""
import ast
import os
from pathlib import Path

import pytest
import torch
import yaml

from bnntrain.engine import Trainer
from bnntrain.errors import UserError
from bnntrain.files import atomic_write
from bnntrain.losses import Objective
from bnntrain.nn.quantizers import INPUT_QUANTIZERS
from conftest import TINY, cli_in_process, results, run_cli
from test_errors import assert_one_line_error

INPUT_NAMES = ", ".join(sorted(INPUT_QUANTIZERS.names()))  # the valid names, as the error lists them

PACKAGE = Path(__file__).resolve().parents[1] / "bnntrain"


def trained_lr(run: Path, stage: str) -> tuple[float, float]:
    """(lr, weight decay) the stage's optimizer was built with, from its checkpoint."""
    group = torch.load(run / stage / "last.pt", weights_only=True)["optimizer"]["param_groups"][0]
    return group["initial_lr"], group["weight_decay"]


def test_sgd_in_the_two_stage_recipe_asks_for_its_lr_and_writes_nothing(tmp_path):
    out = cli_in_process(TINY + ["optimizer=sgd"], tmp_path / "run")
    assert_one_line_error(out, "no lr for optimizer=sgd", "written for adam", "optimizer.lr=...")
    assert not (tmp_path / "run").exists()


def test_sgd_with_its_own_values_trains_every_stage_with_them(tmp_path):
    run = tmp_path / "run"
    out = run_cli(TINY + ["optimizer=sgd", "optimizer.lr=0.05", "optimizer.weight_decay=1e-4"], run)
    assert out.returncode == 0, out.stderr
    for stage in ("stage1", "stage2"):
        assert trained_lr(run, stage) == (0.05, 1e-4)
        ckpt = torch.load(run / stage / "last.pt", weights_only=True)
        assert ckpt["optimizer"]["param_groups"][0]["momentum"] == 0.9  # SGD's own key: SGD trained
        saved = yaml.safe_load((run / stage / "config.yaml").read_text())
        assert saved["optimizer"] == {**saved["optimizer"], "name": "sgd", "lr": 0.05, "weight_decay": 1e-4}
        assert (ckpt["num_classes"], ckpt["in_channels"]) == (10, 3)


def test_a_global_and_a_per_stage_override(tmp_path):
    run = tmp_path / "run"
    out = run_cli(TINY + ["optimizer.lr=3e-4", "stages.stage2.optimizer.lr=5e-5", "stages.stage2.schedule.epochs=2"],
                  run)
    assert out.returncode == 0, out.stderr
    assert trained_lr(run, "stage1") == (3e-4, 1e-5)  # the global lr, the recipe's weight decay
    assert trained_lr(run, "stage2") == (5e-5, 0.0)   # its own lr, its recipe's weight decay
    assert (results(run)["stage1"]["epochs"], results(run)["stage2"]["epochs"]) == (1, 2)
    # The run folder's config.yaml holds each stage's config exactly as the stage folder's does.
    top = yaml.safe_load((run / "config.yaml").read_text())
    assert list(top) == ["stage1", "stage2"]
    for stage in top:
        assert top[stage] == yaml.safe_load((run / stage / "config.yaml").read_text())
    assert top["stage2"]["init"] == str(run / "stage1" / "last.pt")
    assert "stages" not in top["stage2"] and "recipe" not in top["stage2"]["stage"]


def test_cfg_job_shows_each_stage_of_a_pipeline_as_it_trains(tmp_path):
    out = run_cli(["--cfg", "job"], cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    stages = yaml.safe_load(out.stdout)
    assert list(stages) == ["stage1", "stage2"]
    s1, s2 = stages["stage1"], stages["stage2"]
    assert (s1["optimizer"]["lr"], s1["optimizer"]["weight_decay"]) == (1e-3, 1e-5)
    assert (s2["optimizer"]["lr"], s2["optimizer"]["weight_decay"]) == (2e-4, 0.0)
    assert (s1["stage"]["weights"], s2["stage"]["weights"]) == ("real", "binary")
    assert s2["init"] == "<run folder>/stage1/last.pt" and "${" not in out.stdout
    assert not list(tmp_path.iterdir())  # printing writes no run folder
    # The real command above; the same `main` in this process for the others.
    single = cli_in_process(["stage=1", "data=imagenet", "--cfg", "job"], cwd=tmp_path)
    cfg = yaml.safe_load(single.stdout)
    assert cfg["stage"]["name"] == "stage1" and cfg["optimizer"]["lr"] == 1e-3 and cfg["model"]["stem"] == "imagenet"
    lrs = yaml.safe_load(cli_in_process(["--cfg", "job", "--package", "optimizer.lr"], cwd=tmp_path).stdout)
    assert lrs == {"stage1": 1e-3, "stage2": 2e-4}


def test_the_old_model_name_still_works_with_a_note(tmp_path):
    old = cli_in_process(["model=seed_resnet18", "--cfg", "job"], cwd=tmp_path)
    new = cli_in_process(["model=tricks_resnet18", "--cfg", "job"], cwd=tmp_path)
    assert old.returncode == 0 and old.stdout == new.stdout
    assert "model=seed_resnet18 is now model=tricks_resnet18" in old.stderr


LONG = "x" * 300
INVALID = {
    "model.width=0": (["model.width=0"], ["model.width must be a positive number", "got 0"]),
    "negative width": (["model.width=-0.5"], ["model.width"]),
    "batch size not a number": (["data.batch_size=abc"], ["data.batch_size must be a whole number", "'abc'"]),
    "fractional epochs": (["schedule.epochs=1.5"], ["schedule.epochs must be a whole number", "1.5"]),
    "seed not a number": (["seed=abc"], ["seed must be a whole number"]),
    "run folder name too long": ([f"hydra.run.dir={{tmp}}/{LONG}"], ["hydra.run.dir", "300 bytes", "allows 255"]),
    "data.root too long": (["data=folder", f"data.root=/tmp/{LONG}"], ["data.root", "300 bytes"]),
    "precision mode as quantizer": (["model.input_quantizer.name=clamp"], ["precision mode", "stage.activations",
                                                                          INPUT_NAMES]),
    "precision mode by the old key": (["model.quantizer=clamp"], ["precision mode",
                                                                  INPUT_NAMES]),
    "identity as quantizer": (["model.input_quantizer.name=identity"],
                              ["model.input_quantizer", INPUT_NAMES]),
    "argument the quantizer lacks": (["+model.input_quantizer.beta=3"], ["model.input_quantizer=ste_sign",
                                                                          "takes clip_value; got beta"]),
    "unknown weight gradient": (["model.weight_quantizer.gradient=both"], ["model.weight_quantizer.gradient",
                                                                           "scaled, unscaled"]),
    "old weight_scale not a flag": (["model.weight_scale=maybe"], ["model.weight_scale", "true or false"]),
    "unknown block activation": (["model.activation=gelu"], ["model.activation", "identity, maxout, prelu, relu, rprelu"]),
    "unknown optimizer": (["optimizer.name=lion", "optimizer.lr=1e-3", "optimizer.weight_decay=0"],
                          ["optimizer.name", "adam, adamw, bop, case, sgd"]),
    "unknown schedule": (["schedule.name=poly"], ["schedule.name", "cosine, cosine_per_step, linear, multistep, timm_cosine"]),
    "unknown transform": (["+augment.train.posterize=4"], ["augment transform", "center_crop"]),
    "per-stage key the config lacks": (["stages.stage2.optimizer.lrr=1"], ["stages.stage2", "lrr"]),
    "per-stage override of a stage not run": (["stage=1", "stages.stage2.optimizer.lr=1"],
                                              ["stages.stage2", "trains stage1"]),
    "amp mode": (["trainer.amp=fp8"], ["trainer.amp must be one of auto, bf16, fp16, null"]),
    "bad milestone": (["data=cifar100", "schedule.epochs=10", "schedule.milestones=[2.5]"], ["milestones"]),
}


@pytest.mark.parametrize("case", INVALID)
def test_invalid_values_stop_before_anything_is_written(case, tmp_path):
    """The CLI's `main` in this process (conftest.cli_in_process, which test_errors holds to a
    real process): a refusal before the run needs none of a process's seconds of imports."""
    args, words = INVALID[case]
    args = [a.format(tmp=tmp_path) for a in args]
    run = None if any(a.startswith("hydra.run.dir") for a in args) else tmp_path / "run"
    out = cli_in_process(TINY + args if not any(a.startswith("data=") for a in args) else args, run, cwd=tmp_path)
    assert_one_line_error(out, *words)
    assert not (tmp_path / "run").exists() and not (tmp_path / "outputs").exists()


def module_imports(path: Path) -> set[str]:
    """The bnntrain modules a file imports at module level (not inside functions)."""
    tree = ast.parse(path.read_text())
    package = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if path.name == "__init__.py":
        package = package.rsplit(".", 1)[0] + "." + "__init__"
    out = set()
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package.rsplit(".", node.level)[0]
            target = f"{base}.{node.module}" if node.module else base
            names = [f"{target}.{a.name}" for a in node.names]
            out |= {n for n in names + [target] if (PACKAGE.parent / (n.replace(".", "/") + ".py")).exists()
                    or (PACKAGE.parent / n.replace(".", "/") / "__init__.py").exists()}
    return {n[:-len(".__init__")] if n.endswith(".__init__") else n for n in out}


def test_no_import_cycles():
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        name = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        modules[name.removesuffix(".__init__")] = module_imports(path)

    def visit(name, trail):
        if name in trail:
            raise AssertionError(" -> ".join(trail[trail.index(name):] + [name]))
        for dep in modules.get(name, ()):
            if dep != name and not name.startswith(dep + "."):  # a package's own submodules
                visit(dep, trail + [name])

    for name in modules:
        visit(name, [])
    assert "bnntrain.run.cli" not in modules["bnntrain.tools.summary"] and "bnntrain.tools.summary" not in modules["bnntrain.engine.stage"]


def test_trainer_state_round_trips_step_and_scaler():
    model = torch.nn.Linear(4, 2)
    make = lambda: Trainer(model, Objective(model), torch.optim.SGD(model.parameters(), 0.1),  # noqa: E731
                           torch.device("cpu"), amp="fp16")
    trainer = make()
    x, y = torch.randn(8, 4), torch.randint(2, (8,))
    trainer.train_epoch([(x, y)] * 3)
    trainer.scaler.update(1234.0)
    other = make()
    other.load_state_dict(trainer.state_dict())
    assert other.step == 3 and other.scaler.get_scale() == 1234.0


def test_a_failed_write_leaves_the_earlier_file_whole(tmp_path):
    path = tmp_path / "last.pt"
    path.write_bytes(b"the earlier checkpoint")

    def half_then_fail(tmp):
        tmp.write_bytes(b"half of a new one")
        raise OSError(28, os.strerror(28))  # ENOSPC, as a full disk raises it

    with pytest.raises(UserError, match="cannot write .*last.pt: No space left on device"):
        atomic_write(path, half_then_fail)
    assert path.read_bytes() == b"the earlier checkpoint" and sorted(tmp_path.iterdir()) == [path]


def test_old_quantizer_keys_build_the_same_model_with_one_note():
    """A config saved before input_quantizer / weight_quantizer (the fixture checkpoint's) and
    the old keys on the command line build what the new keys build."""
    from bnntrain import notes
    from bnntrain.models import build_model
    from bnntrain.nn import binary_layers
    from test_config import make

    def quantizers(model_cfg):
        torch.manual_seed(0)
        model = build_model(model_cfg, num_classes=10, in_channels=1)
        return ([(layer.input_quantizer.config(), layer.weight_quantizer.config(), layer.threshold is not None)
                 for _, layer in binary_layers(model)], model.state_dict())

    saved = torch.load(PACKAGE.parent / "tests/fixtures/reactnet18_w0.0625_v0.1.pt", weights_only=True)["config"]
    assert "quantizer" in saved["model"] and "input_quantizer" not in saved["model"]
    notes.drain()
    old, old_weights = quantizers(saved["model"])
    assert any("model.quantizer, model.weight_scale, model.weight_gradient are now read as" in n for n in notes.drain())
    new, new_weights = quantizers(make("model=reactnet18", "model.width=0.0625").model)
    assert old == new and old[0] == ({"name": "approx_sign"}, {"name": "scaled_sign", "gradient": "unscaled"}, True)
    assert old_weights.keys() == new_weights.keys()
    assert all(torch.equal(old_weights[k], new_weights[k]) for k in old_weights)
    cli, _ = quantizers(make("model=tricks_resnet18", "model.width=0.0625", "model.quantizer=approx_sign",
                             "model.weight_gradient=unscaled", "model.learnable_threshold=true",
                             "model.bn_position=after_conv", "model.activation=rprelu", "model.downsample=v2",
                             "model.stem_activation=identity", "model.bn_momentum=0.1").model)
    assert cli == new
