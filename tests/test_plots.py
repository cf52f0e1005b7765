"""The docs' figures are the committed JSON, drawn (scripts/plot_results.py): what each figure
plots is read back from its axes and compared with the JSON. And the default run's curves are
read from a real run folder (scripts/record_default_run.py)."""
import importlib.util
import json
from pathlib import Path

import pytest

from conftest import need

need("matplotlib", extra="docs")
from matplotlib.colors import to_rgb  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ROOT / "scripts"
FIGURES = ("figures/default_run.svg", "figures/stage2_study.svg", "figures/preset_speed.svg")


def script(name: str):
    spec = importlib.util.spec_from_file_location(f"scripts_{name}", SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


plots = script("plot_results")
recorder = script("record_default_run")
RESULTS = plots.load_results()


def rows_by_label(ax) -> dict[float, str]:
    """y position -> the row's tick label."""
    return {round(y, 6): label.get_text() for y, label in zip(ax.get_yticks(), ax.get_yticklabels())}


def test_the_committed_default_run_has_a_curve_per_stage_that_ends_at_its_results():
    run = RESULTS["default_run"]
    assert run["command"] == "python -m bnntrain" and list(run["stages"]) == ["stage1", "stage2"]
    for name, stage in run["stages"].items():
        curves = stage["curves"]
        assert curves["epoch"] == list(range(1, stage["epochs"] + 1)) and len(curves["top1"]) == stage["epochs"]
        # The events hold float32: the curve's last and best points are results.json's top-1s.
        assert curves["top1"][-1] == pytest.approx(stage["top1"], rel=1e-6)
        assert max(curves["top1"]) == pytest.approx(stage["best_top1"], rel=1e-6)
    assert "flip_ratio" not in run["stages"]["stage1"]["curves"]  # real weights: nothing flips
    flips = run["stages"]["stage2"]["curves"]["flip_ratio"]
    assert len(flips) == run["stages"]["stage2"]["epochs"] and all(0 < ratio < 1 for ratio in flips)


def test_default_run_figure_plots_each_stages_curves():
    run = RESULTS["default_run"]
    top1, flips = plots.default_run_figure(run).axes
    assert len(top1.get_lines()) == len(run["stages"])
    for line, stage in zip(top1.get_lines(), run["stages"].values()):
        assert list(line.get_xdata()) == stage["curves"]["epoch"] and list(line.get_ydata()) == stage["curves"]["top1"]
    binary = [stage["curves"] for stage in run["stages"].values() if "flip_ratio" in stage["curves"]]
    assert len(flips.get_lines()) == len(binary) == 1
    (line,) = flips.get_lines()
    assert list(line.get_xdata()) == binary[0]["epoch"] and list(line.get_ydata()) == binary[0]["flip_ratio"]


def test_stage2_study_figure_plots_each_seed_and_each_mean():
    studies = RESULTS["stage2_study"]
    axes = plots.stage2_study_figure(studies).axes
    assert len(axes) == len(studies) == 2
    for ax, study in zip(axes, studies.values()):
        rows = rows_by_label(ax)
        assert sorted(rows.values()) == sorted(study["arms"])
        dots = [c for c in ax.collections if c.__class__.__name__ == "PathCollection"]
        assert len(dots) == len(ax.containers) == len(study["arms"])
        for collection in dots:
            (y,), xs = set(collection.get_offsets()[:, 1]), collection.get_offsets()[:, 0]
            assert list(xs) == study["arms"][rows[round(y, 6)]]["top1"]
        for bar in ax.containers:  # errorbar: the mean's marker and its +- std segment
            line, _, (segments,) = bar.lines
            (x,), (y,) = line.get_xdata(), line.get_ydata()
            arm = study["arms"][rows[round(y, 6)]]
            assert x == arm["mean"]
            (low, _), (high, _) = segments.get_segments()[0]
            assert (low, high) == pytest.approx((arm["mean"] - arm["spread"], arm["mean"] + arm["spread"]))


def test_preset_speed_figure_plots_each_ratio_and_target():
    rows = RESULTS["preset_speed"]
    drawn, targets, over = {}, {}, set()
    for ax in plots.preset_speed_figure(rows).axes:
        labels = rows_by_label(ax)
        for bar in ax.patches:  # bars from 1: where a bar ends is the ratio
            label = labels[round(bar.get_y() + bar.get_height() / 2, 6)]
            drawn[label] = bar.get_x() + bar.get_width()
            if bar.get_facecolor()[:3] == pytest.approx(to_rgb(plots.MISSES)):
                over.add(label)
        (marks,) = ax.collections
        targets.update({labels[round(y, 6)]: x for x, y in marks.get_offsets()})
    expected = {plots.preset_label(row): row for row in rows}
    assert len(expected) == len(rows) == len(drawn)
    assert drawn == pytest.approx({label: row["ratio"] for label, row in expected.items()})
    assert targets == {label: float(row["target"].removeprefix("<= ")) for label, row in expected.items()}
    assert over == {label for label, row in expected.items() if row["ratio"] > targets[label]}
    assert over == {"birealnet18 vs torchvision resnet18 (channels_last)"}  # 1.068 against <= 1.00


@pytest.fixture(scope="module")
def svgs() -> dict[str, bytes]:
    return plots.render_svgs()


def test_svgs_are_the_same_bytes_every_time_and_main_writes_them(tmp_path, svgs):
    assert list(svgs) == list(FIGURES)
    for svg in svgs.values():
        assert svg.startswith(b"<?xml") and b"<dc:date>" not in svg  # no build date to differ by
    plots.main(["--out", str(tmp_path)])  # drawn a second time
    assert {path: (tmp_path / path).read_bytes() for path in FIGURES} == svgs


def test_the_hook_draws_the_figures_into_a_strict_build(tmp_path, svgs):
    """A page showing the figures builds under --strict: the hook put each file where it links,
    drawn from the JSON even where docs/ holds a file of that name."""
    from mkdocs.commands.build import build
    from mkdocs.config import load_config

    docs = tmp_path / "docs"
    (docs / "figures").mkdir(parents=True)
    (docs / "index.md").write_text("# Figures\n\n" + "".join(f"![a figure]({path})\n\n" for path in FIGURES))
    (docs / "figures" / "default_run.svg").write_text("<svg>stale</svg>")
    (tmp_path / "mkdocs.yml").write_text(f"site_name: figures\ndocs_dir: docs\nsite_dir: site\nstrict: true\n"
                                         f"hooks:\n  - {SCRIPTS / 'plot_results.py'}\n")
    build(load_config(str(tmp_path / "mkdocs.yml")))
    assert {path: (tmp_path / "site" / path).read_bytes() for path in FIGURES} == svgs


@pytest.mark.slow  # trains through the CLI: several seconds
def test_record_reads_each_stages_curves_from_a_run_folder(tmp_path):
    run = recorder.record(["schedule.epochs=2", "model.width=0.125"], machine="test", run_dir=tmp_path / "run")
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert run["command"] == "python -m bnntrain schedule.epochs=2 model.width=0.125" and run["seed"] == 0
    assert list(run["stages"]) == ["stage1", "stage2"]
    for name, stage in run["stages"].items():
        assert stage["curves"]["epoch"] == [1, 2] and stage["top1"] == results[name]["top1"]
        assert stage["curves"]["top1"][-1] == pytest.approx(results[name]["top1"], rel=1e-6)
    assert "flip_ratio" not in run["stages"]["stage1"]["curves"]
    assert len(run["stages"]["stage2"]["curves"]["flip_ratio"]) == 2
    stages = sum(stage["seconds"] for stage in run["stages"].values())
    assert stages <= run["log_seconds"] + 0.15 and run["log_seconds"] <= run["process_seconds"]  # 0.1 s roundings
    assert json.loads(recorder.to_json(run)) == run  # as the script writes it
    assert len(plots.default_run_figure(run).axes[1].get_lines()) == 1  # what the figure draws from
