"""scripts/methods_study.py: every arm is the method it names, the noise rule, and the study
itself on a tiny class-folder dataset, its JSON holding the runs' own numbers."""
import importlib.util
import json
import sys
from pathlib import Path

import pytest

from conftest import write_image_folder

ROOT = Path(__file__).resolve().parents[1]


def load_script():
    spec = importlib.util.spec_from_file_location("scripts_methods_study", ROOT / "scripts" / "methods_study.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks its module up there
    spec.loader.exec_module(module)
    return module


study = load_script()


def test_the_noise_rule():
    """A difference counts only beyond twice the larger std; one seed gives no verdict."""
    runs = {"bnn": [{"top1": t, "best_top1": t + 1, "seconds": 10.0} for t in (50.0, 51.0, 52.0)],
            "bop": [{"top1": t, "best_top1": t, "seconds": 12.0} for t in (54.5, 55.0, 55.5)],
            "fda": [{"top1": t, "best_top1": t, "seconds": 11.0} for t in (51.5, 52.5, 53.5)],
            "recu": [{"top1": t, "best_top1": t, "seconds": 11.0} for t in (47.5, 47.0, 46.5)]}
    table = study.summarize(runs)
    assert table["bnn"]["verdict"] == "baseline" and table["bnn"]["std"] == pytest.approx(1.0)
    assert table["bop"]["diff"] == pytest.approx(4.0) and table["bop"]["verdict"] == "above BNN"  # 4 > 2 x 1
    assert table["fda"]["verdict"] == "within the noise"  # 1.5 <= 2 x 1
    assert table["recu"]["verdict"] == "below BNN"
    assert table["bnn"]["best_top1"] == [51.0, 52.0, 53.0] and table["bop"]["seconds"] == [12.0] * 3
    assert study.verdict(9.0, 0.0, 0.0, seeds=1) == "one seed: no noise estimate"


def test_arms_are_chosen_by_name_with_the_baseline_first():
    assert study.chosen("bop,bireal") == ["bnn", "bop", "bireal"]
    assert study.chosen(None) == list(study.ARMS)
    with pytest.raises(SystemExit, match="--arms nope"):
        study.chosen("bnn,nope")


@pytest.mark.slow
def test_every_arm_is_the_method_it_names():
    """Composed as the study composes a run: the quantizers as their papers pair them, AdaBin's
    Maxout, Bop's optimizer, and the same network and budget for every arm."""
    shared = [*study.preset(Path("/data"), False, []), *study.one_stage(8)]
    want = {"bnn": ("ste_sign", "sign"), "xnor": ("xnor_sign", "xnor_weight"), "dorefa": ("ste_sign", "dorefa_sign"),
            "bireal": ("approx_sign", "scaled_sign"), "bnnplus": ("swish_sign", "scaled_sign"),
            "xnorpp": ("ste_sign", "xnor_plus_plus"), "irnet": ("ede_sign", "irnet_libra_pb"),
            "recu": ("recu_sign", "recu"), "fda": ("fda_sign", "fda"), "adabin": ("adabin_sign", "adabin"),
            "heaviside": ("ste_heaviside", "sign"), "bop": ("ste_sign", "sign")}
    assert set(want) == set(study.ARMS)
    for name, arm in study.ARMS.items():
        cfg = study.last_stage([*shared, *arm.overrides()])
        assert (cfg.model.input_quantizer.name, cfg.model.weight_quantizer.name) == want[name], name
        network = (cfg.model.name, cfg.model.width, cfg.schedule.epochs, cfg.stage.weights)
        assert network == ("resnet18", 0.25, 8, "binary"), name
        assert cfg.model.activation == ("maxout" if name == "adabin" else "prelu"), name
        assert cfg.optimizer.name == ("bop" if name == "bop" else "adam") and cfg.optimizer.lr == 1e-3, name
    assert study.last_stage([*shared, *study.ARMS["bireal"].overrides()]).model.weight_quantizer.gradient == "unscaled"


@pytest.mark.slow
def test_the_study_writes_the_runs_own_numbers(tmp_path):
    """Two arms, one seed, one epoch on a tiny class-folder dataset; a second call reads the
    finished runs and resumes an unfinished one."""
    data = write_image_folder(tmp_path / "data", classes=("cat", "dog"), per_class=8, size=32)
    out = tmp_path / "study"
    argv = ["--data", str(data), "--out", str(out), "--arms", "bop", "--seeds", "0", "--epochs", "1",
            "--repeats", "1", "--extra", "data.batch_size=8", "--extra", "data.num_workers=0",
            "--extra", "model.width=0.0625", "--extra", "data.image_size=16"]
    study.main(argv)
    written = json.loads((out / "methods.json").read_text())
    assert list(written["arms"]) == ["bnn", "bop"] and written["seeds"] == [0] and written["epochs"] == 1
    assert written["noise_rule"] == study.NOISE_RULE
    for name, arm in written["arms"].items():
        run = out / f"{name}_seed0"
        own = json.loads((run / "results.json").read_text())["stage2"]
        assert (arm["top1"], arm["best_top1"], arm["seconds"]) == ([own["top1"]], [own["best_top1"]], [own["seconds"]])
        assert arm["mean"] == own["top1"] and arm["std"] == 0.0 and arm["resumed"] == [False]
        assert arm["overrides"] == study.ARMS[name].overrides()
        trained = (run / "stage2" / "config.yaml").read_text()  # the arm's settings reached the run
        assert "name: bop" in trained if name == "bop" else "name: bop" not in trained
        assert arm["saved_mib"] > 0 and arm["step_seconds"] > 0
    bnn, bop = written["arms"]["bnn"], written["arms"]["bop"]
    assert bnn["verdict"] == "baseline" and bop["verdict"] == "one seed: no noise estimate"
    assert bnn["step_ratio"] == 1.0 and bnn["saved_ratio"] == 1.0
    assert bop["saved_ratio"] == 1.0  # Bop changes the optimizer, not what the network saves
    assert bop["diff"] == pytest.approx(bop["mean"] - bnn["mean"])
    table = (out / "methods.md").read_text()
    assert f"| Bop | `{{name:ste_sign}}` + `{{name:sign}}`, `optimizer=bop` | {bop['mean']:.2f} +- 0.00 |" in table
    assert f"against a copy of itself {bnn['step_noise_floor']:.2f}" in table

    # Again, with bop's run as if it had been stopped before its results were written: the
    # finished run is read, not trained again, and the other continues from its checkpoint.
    finished = (out / "bnn_seed0" / "results.json").stat().st_mtime_ns
    (out / "bop_seed0" / "results.json").unlink()
    study.main(argv)
    assert (out / "bnn_seed0" / "results.json").stat().st_mtime_ns == finished
    again = json.loads((out / "methods.json").read_text())["arms"]
    assert again["bop"]["top1"] == bop["top1"] and again["bop"]["resumed"] == [True]
    assert again["bnn"]["top1"] == bnn["top1"] and again["bnn"]["resumed"] == [False]


@pytest.mark.parametrize("data", ["cifar10", "imagenette"])
def test_the_methods_page_shows_the_committed_study(data):
    """docs/methods.md's measured tables are the committed JSON, line for line, as the script
    writes them, and say how many seeds and epochs they rest on."""
    from docs_pages import flat, page

    written = json.loads((ROOT / "scripts" / f"results_methods_study_{data}.json").read_text())
    assert written["imagenette"] == (data == "imagenette")
    assert written["noise_rule"] == study.NOISE_RULE and list(written["arms"]) == list(study.ARMS)
    for line in study.markdown(written["arms"]).splitlines():
        assert line in page("methods.md"), line
    seeds = ", ".join(str(s) for s in written["seeds"])
    assert f"seeds {seeds}, {written['epochs']} epochs" in flat("methods.md")


def test_the_methods_page_compares_the_two_studies_as_measured():
    """The sentence on which verdicts hold from CIFAR-10 to Imagenette is the two JSONs'."""
    from docs_pages import flat

    verdicts = {data: {name: arm["verdict"] for name, arm in json.loads(
        (ROOT / "scripts" / f"results_methods_study_{data}.json").read_text())["arms"].items()}
        for data in ("cifar10", "imagenette")}
    both = {name for name in verdicts["cifar10"] if verdicts["cifar10"][name] == verdicts["imagenette"][name]}
    assert both == {"bnn", "xnor", "dorefa", "bireal", "bnnplus", "xnorpp", "recu", "fda", "adabin", "bop"}
    assert (verdicts["cifar10"]["irnet"], verdicts["imagenette"]["irnet"]) == ("below BNN", "within the noise")
    assert (verdicts["cifar10"]["heaviside"], verdicts["imagenette"]["heaviside"]) == ("above BNN", "within the noise")
    assert "Two change: IR-Net, below BNN on CIFAR-10, and SteHeaviside, above it there" in flat("methods.md")
