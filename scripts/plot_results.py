"""The docs' figures, drawn from the committed JSON in scripts/ every time the site builds.

    python scripts/plot_results.py --out DIR     # writes DIR/figures/*.svg

As a MkDocs hook (mkdocs.yml: `hooks: [scripts/plot_results.py]`), `on_files` adds each figure
to the site as a generated file, so a page shows `![...](figures/default_run.svg)` and nothing
drawn is committed: a figure can only say what its JSON says.

- figures/default_run.svg: `python -m bnntrain`'s test top-1 and flip ratio per epoch
  (results_default_run_cpu.json, written by record_default_run.py);
- figures/stage2_study.svg: what stage 2 buys, each arm's per-seed top-1 and mean +- std
  (results_stage2_study_{cifar10,imagenette}.json, written by stage2_study.py);
- figures/preset_speed.svg: each paper preset's memory and step-time ratio against its
  baseline, with its target (bench_results_presets_cpu.json, written by bench_presets.py).
"""
from __future__ import annotations

import argparse
import io
import json
from pathlib import Path
from typing import Any, Sequence

SCRIPTS = Path(__file__).resolve().parent
# What each study's JSON measured (stage2_study.py's presets), for the panel titles.
STUDIES = {"cifar10": "CIFAR-10 JPEGs (5,000 training images)",
           "imagenette": "Imagenette at 64 px (5,000 training images)"}
STAGES = {"stage1": "stage 1: binary activations, real weights", "stage2": "stage 2: fully binary, from stage 1's weights"}
# Fixed so that the SVG's ids, and so its bytes, are the same at every build.
STYLE = {"svg.hashsalt": "bnntrain-figures", "font.size": 9, "axes.titlesize": 9, "axes.grid": True,
         "grid.alpha": 0.3, "legend.fontsize": 8, "legend.framealpha": 0.9}
MEETS, MISSES = "#3a78b5", "#c8553d"


def load_results(folder: Path = SCRIPTS) -> dict[str, Any]:
    """The JSON each figure is drawn from, by figure."""
    read = lambda name: json.loads((folder / name).read_text())  # noqa: E731
    return {"default_run": read("results_default_run_cpu.json"),
            "stage2_study": {key: read(f"results_stage2_study_{key}.json") for key in STUDIES},
            "preset_speed": read("bench_results_presets_cpu.json")}


def _figure(width: float, height: float, **grid: Any) -> tuple[Any, Any]:
    """A Figure on the Agg canvas (no pyplot: no global state), and its grid of axes."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.subplots(**grid)


def _legend(fig: Any, ax: Any) -> None:
    """One legend for the figure, below it, each label once (the panels share their entries)."""
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles))
    fig.legend(list(unique.values()), list(unique), loc="outside lower center", ncols=len(unique))


def default_run_figure(run: dict) -> Any:
    """Both stages' test top-1 per epoch (left) and the flip ratio of the stages with binary
    weights (right: the fraction of binary weights whose sign changed in the epoch)."""
    fig, (acc, flips) = _figure(8.5, 3.6, ncols=2)
    for i, (stage, numbers) in enumerate(run["stages"].items()):
        curves, label = numbers["curves"], STAGES.get(stage, stage)
        acc.plot(curves["epoch"], curves["top1"], marker="o", ms=3.5, color=f"C{i}", label=label)
        if "flip_ratio" in curves:
            flips.plot(curves["epoch"], curves["flip_ratio"], marker="o", ms=3.5, color=f"C{i}", label=label)
    acc.set(xlabel="epoch of the stage", ylabel="test top-1 (%)", title="Test top-1 after each epoch")
    flips.set(xlabel="epoch of the stage", ylabel="fraction of binary weights (log scale)", yscale="log",
              title="Flip ratio: signs changed in the epoch")
    for ax in (acc, flips):
        ax.xaxis.get_major_locator().set_params(integer=True)
    _legend(fig, acc)
    fig.suptitle(f"The default run, {run['command']}: scikit-learn's digits, seed {run['seed']}\n"
                 f"{run['log_seconds']:.0f} s on a {run['machine']}", fontsize=10)
    return fig


def stage2_study_figure(studies: dict[str, dict]) -> Any:
    """One panel per study: each arm's final test top-1 per seed (dots) and its mean +- std."""
    sizes = [len(study["arms"]) for study in studies.values()]
    fig, axes = _figure(8.0, 1.2 + 0.42 * sum(sizes), nrows=len(studies), gridspec_kw={"height_ratios": sizes})
    for ax, (key, study) in zip(axes, studies.items()):
        names = list(study["arms"])
        rows = range(len(names))[::-1]  # the first arm at the top
        for row, name in zip(rows, names):
            arm = study["arms"][name]
            ax.scatter(arm["top1"], [row] * len(arm["top1"]), s=24, color="C0", alpha=0.7, zorder=3, label="one seed")
            ax.errorbar([arm["mean"]], [row], xerr=[arm["spread"]], fmt="|", ms=14, mew=2, color="black",
                        capsize=4, zorder=4, label="mean ± std over the seeds")
        ax.set_yticks(list(rows), names)
        ax.set_ylim(-0.6, len(names) - 0.4)
        ax.grid(False, axis="y")
        ax.set(xlabel="final test top-1 (%)",
               title=f"{STUDIES.get(key, key)}, seeds {', '.join(map(str, study['seeds']))}")
    _legend(fig, axes[0])
    epochs = {study["epochs"] for study in studies.values()}
    fig.suptitle(f"What stage 2 buys: quarter-width tricks_resnet18, {2 * max(epochs)} epochs per arm, 2-core CPU",
                 fontsize=10)
    return fig


def target_value(target: str) -> float:
    """'<= 1.35' -> 1.35: every preset target is an upper bound on the ratio."""
    bound, value = target.split()
    if bound != "<=":
        raise ValueError(f"unexpected target {target!r}")
    return float(value)


def preset_label(row: dict) -> str:
    """'birealnet18 vs torchvision resnet18 (NCHW)': the preset is the benchmark's second field."""
    return f"{row['benchmark'].split(', ')[1]} vs {row['baseline']}"


def _ratio_panel(ax: Any, members: list[dict], title: str, limits: tuple[float, float]) -> None:
    """One bar per preset from 1 to its ratio, coloured by whether it meets its target, and the
    target's mark on the same row."""
    ys = list(range(len(members)))[::-1]  # the first row at the top
    ratios = [r["ratio"] for r in members]
    targets = [target_value(r["target"]) for r in members]
    ax.barh(ys, [ratio - 1 for ratio in ratios], left=1, height=0.6,
            color=[MEETS if ratio <= target else MISSES for ratio, target in zip(ratios, targets)])
    ax.scatter(targets, ys, marker="|", s=260, linewidths=2, color="black", zorder=3, label="target (at most)")
    for y, ratio, target in zip(ys, ratios, targets):
        # The value beside its bar's end, clear of the target's mark where the two are close.
        at = max(ratio, target) if ratio >= 1 and abs(ratio - target) < 0.03 else ratio
        ax.annotate(f"{ratio:.3f}", (at, y), xytext=(5 if ratio >= 1 else -5, 0), textcoords="offset points",
                    ha="left" if ratio >= 1 else "right", va="center", fontsize=8)
    ax.axvline(1, color="gray", lw=0.8)
    ax.set_yticks(ys, [preset_label(r) for r in members])
    ax.grid(False, axis="y")
    ax.set(xlim=limits, xlabel="ratio to the baseline (below 1: less than the baseline)", title=title)


def preset_speed_figure(rows: list[dict]) -> Any:
    """Memory (top) and training-step (bottom) ratios of each preset against its baseline, as
    bars from 1 (left of 1: the preset needs less), each with its target."""
    from matplotlib.patches import Patch

    groups = {"Memory saved for backward, batch 8":
              [r for r in rows if r["unit"] == "MiB"],
              "CPU training step, batch 16": [r for r in rows if r["unit"] == "s/step"]}
    values = [r["ratio"] for r in rows] + [target_value(r["target"]) for r in rows]
    limits = (min(0.8, min(values) - 0.05), max(1.45, max(values) + 0.1))  # one scale for both panels
    fig, axes = _figure(8.0, 1.4 + 0.4 * len(rows), nrows=2,
                        gridspec_kw={"height_ratios": [len(members) for members in groups.values()]})
    for ax, (title, members) in zip(axes, groups.items()):
        _ratio_panel(ax, members, title, limits)
    # The colours' legend entries are handles drawn nowhere: a zero-sized bar would count as data.
    handles = [Patch(color=MEETS, label="ratio within its target"), Patch(color=MISSES, label="ratio over its target"),
               *axes[0].get_legend_handles_labels()[0]]
    fig.legend(handles, [h.get_label() for h in handles], loc="outside lower center", ncols=3)
    fig.suptitle("The paper presets against real-valued baselines on the CPU (224 px, stage 2, Adam)", fontsize=10)
    return fig


def render_svgs(results: dict[str, Any] | None = None) -> dict[str, bytes]:
    """Each figure as SVG bytes, by its path in the site; the same bytes for the same JSON."""
    from matplotlib import rc_context

    results = load_results() if results is None else results
    draw = {"figures/default_run.svg": lambda: default_run_figure(results["default_run"]),
            "figures/stage2_study.svg": lambda: stage2_study_figure(results["stage2_study"]),
            "figures/preset_speed.svg": lambda: preset_speed_figure(results["preset_speed"])}
    svgs = {}
    for path, make in draw.items():
        with rc_context(STYLE):
            buffer = io.BytesIO()
            make().savefig(buffer, format="svg", metadata={"Date": None})  # no build date in the file
        svgs[path] = buffer.getvalue()
    return svgs


def on_files(files: Any, config: Any) -> Any:
    """MkDocs hook: each figure, drawn now from the JSON, joins the site's files."""
    from mkdocs.structure.files import File

    for path, svg in render_svgs().items():
        if (existing := files.get_file_from_path(path)) is not None:
            files.remove(existing)  # a stale drawing in docs/ never wins over the JSON
        files.append(File.generated(config, path, content=svg))
    return files


def on_serve(server: Any, config: Any, builder: Any) -> Any:
    """MkDocs hook: under `mkdocs serve`, a change to a figure's JSON redraws the site."""
    for name in ("results_default_run_cpu.json", "bench_results_presets_cpu.json",
                 *(f"results_stage2_study_{key}.json" for key in STUDIES)):
        server.watch(str(SCRIPTS / name))
    return server


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="folder to write figures/*.svg into")
    args = parser.parse_args(argv)
    for path, svg in render_svgs().items():
        target = args.out / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(svg)
        print(target)


if __name__ == "__main__":
    main()
