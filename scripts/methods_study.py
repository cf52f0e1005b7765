"""What is each binarization method worth? Every method as its paper pairs an input and a
weight quantizer (docs/methods.md), on the same network and budget: the `cifar10_folder_quick`
preset's quarter-width `tricks_resnet18` on the CIFAR-10 JPEGs (5,000 training and 2,000 test
images), trained fully binary in one stage from random weights, over a few seeds.

    python scripts/methods_study.py --data DIR/cifar10-jpg --out methods/ [--seeds 0,1,2] [--epochs 8]
    python scripts/methods_study.py --data DIR/imagenette2-224 --out methods-imagenette/ --imagenette
    python scripts/methods_study.py ... --arms bnn,bireal,bop      # a subset (the BNN baseline is always run)

Why one stage, fully binary from scratch (`stage=2 stage.needs_init=false`, Adam at stage
1's lr 1e-3, as the stage-2 study's one-stage arm): a weight quantizer acts only where the
weights are binary, so in the two-stage recipe it would train half the budget from a start
that every method shares; Bop cannot train stage 1's real weights at all; and at this budget
the one-stage network ended above the two-stage one (docs/results.md, "What stage 2 buys").

Per arm and seed: the final and the best test top-1 and the stage's seconds, read from the
run's results.json. Per arm: their mean and std (over seeds), the difference from the BNN
arm and whether it is outside the noise: |difference| > 2 x the larger of the two stds (with
one seed there is no noise estimate, and no verdict). Measured in this process on one fixed
batch of the study's size (not from the runs): the training step's time against the BNN
arm's (medians of interleaved rounds, scripts/bench.py, with a second copy of the BNN step
as the noise floor of the timing) and the bytes saved for the backward pass.

Each run is `python -m bnntrain experiment=cifar10_folder_quick ...` in `--out/<arm>_seed<N>`;
a finished run is read, not run again, and an interrupted one continues from its last
checkpoint (`resume=`; its seconds then count only what it trained after that, and the
table's seconds leave it out). The table is printed and written to `--out/methods.md` and
`--out/methods.json`.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from omegaconf import DictConfig

sys.path.insert(0, str(Path(__file__).resolve().parent))  # its neighbours, also when imported by path
from bench import interleaved, model_for, paired_ratio, saved_bytes  # noqa: E402
from stage2_study import IMAGENETTE  # noqa: E402

from bnntrain.files import write_text  # noqa: E402
from bnntrain.nn import binary_layers  # noqa: E402
from bnntrain.optim import build_optimizer  # noqa: E402
from bnntrain.run.config import last_stage  # noqa: E402


@dataclass(frozen=True)
class Arm:
    """A method: its input and weight quantizers (Hydra values) and what else it changes."""
    title: str
    input_quantizer: str
    weight_quantizer: str
    network: tuple[str, ...] = ()   # other changes to the network (AdaBin's Maxout)
    training: tuple[str, ...] = ()  # changes to how it trains (Bop)

    def overrides(self) -> list[str]:
        # The whole mapping is replaced: merged, it would keep the preset's arguments.
        return ["~model.input_quantizer", f"+model.input_quantizer={self.input_quantizer}",
                "~model.weight_quantizer", f"+model.weight_quantizer={self.weight_quantizer}",
                *self.network, *self.training]

    def twin(self) -> list[str]:
        """The real-valued twin of its network, trained by Adam."""
        return [*self.network, "model.binarize=false"]


# Bop with the Adam of every other arm (lr 1e-3, no weight decay in a binary stage) for the
# real-valued parameters, and the paper's CIFAR-10 threshold and gamma (its x0.1 step every
# 100 epochs never comes in 8). larq's SteHeaviside (0/1 activations) has no paper that pairs
# it: it takes BNN's weights, so that it differs from the baseline in its activations alone.
BOP = ("optimizer=bop", "optimizer.lr=1e-3", "optimizer.weight_decay=0.0", "optimizer.threshold=1e-8",
       "optimizer.gamma=1e-4", "optimizer.gamma_schedule=constant")
ARMS: dict[str, Arm] = {
    "bnn": Arm("BNN", "{name:ste_sign}", "{name:sign}"),
    "xnor": Arm("XNOR-Net", "{name:xnor_sign}", "{name:xnor_weight}"),
    "dorefa": Arm("DoReFa-Net", "{name:ste_sign}", "{name:dorefa_sign}"),
    "bireal": Arm("Bi-Real Net", "{name:approx_sign}", "{name:scaled_sign,gradient:unscaled}"),
    "bnnplus": Arm("BNN+", "{name:swish_sign}", "{name:scaled_sign,gradient:scaled}"),
    "xnorpp": Arm("XNOR-Net++", "{name:ste_sign}", "{name:xnor_plus_plus}"),
    "irnet": Arm("IR-Net", "{name:ede_sign}", "{name:irnet_libra_pb}"),
    "recu": Arm("ReCU", "{name:recu_sign}", "{name:recu}"),
    "fda": Arm("FDA", "{name:fda_sign}", "{name:fda}"),
    "adabin": Arm("AdaBin", "{name:adabin_sign}", "{name:adabin}", network=("model.activation=maxout",)),
    "heaviside": Arm("larq SteHeaviside (0/1)", "{name:ste_heaviside}", "{name:sign}"),
    "bop": Arm("Bop", "{name:ste_sign}", "{name:sign}", training=BOP),
}
BASELINE = "bnn"
NOISE_RULE = "|mean - BNN's mean| > 2 x the larger of the two stds over seeds"


def one_stage(epochs: int) -> list[str]:
    """Fully binary from random weights at stage 1's lr (the stage-2 study's one-stage arm)."""
    return ["stage=2", "stage.needs_init=false", f"schedule.epochs={epochs}", "stage.recipe.adam.lr=1e-3"]


def preset(data: Path, imagenette: bool, extra: list[str]) -> list[str]:
    """The overrides every arm shares: the preset, its data, Imagenette at 64 px, `extra`."""
    return ["experiment=cifar10_folder_quick", f"data.root={data}", *(IMAGENETTE if imagenette else []), *extra]


def train(overrides: list[str], folder: Path, seed: int) -> dict:
    """The run's last stage's results: read where it finished, trained (or resumed) otherwise."""
    results = folder / "results.json"
    if not results.exists():
        # A folder with Hydra's record holds an interrupted run: resume continues it there.
        where = ([f"resume={folder}"] if (folder / ".hydra").is_dir()
                 else [*overrides, f"seed={seed}", f"hydra.run.dir={folder}"])
        done = subprocess.run([sys.executable, "-m", "bnntrain", *where, "trainer.progress=plain"],
                              capture_output=True, text=True)
        if done.returncode != 0:
            sys.exit(f"error: the run in {folder} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    stages = json.loads(results.read_text())
    log = folder / "cli.log"  # a resumed run's seconds count only what it trained after the resume
    resumed = log.exists() and "resuming from" in log.read_text(errors="replace")
    return {**stages[list(stages)[-1]], "resumed": resumed}


def method_step(cfg: DictConfig, x: torch.Tensor, y: torch.Tensor, num_classes: int,
                channels_last: bool = False) -> tuple[torch.nn.Module, Callable[[], None]]:
    """`cfg`'s network and one training step of it as its stage takes one: the optimizer the
    config names (optimizer=bop flips the binary weights itself) and, after the step, the
    projection of a weight quantizer that keeps its latent weights in a set (XNOR-Net's), as
    the stage's `WeightProjection` hook does. The loss is plain cross-entropy for every arm."""
    model = model_for(cfg, num_classes, x.device.type)
    if channels_last:  # as the trainer runs on the CPU (trainer.channels_last=auto)
        model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    opt = build_optimizer(cfg.optimizer, model)
    projected = [layer for _, layer in binary_layers(model)
                 if layer.weights == "binary" and layer.weight_quantizer.projects_weights]

    def step() -> None:
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            for layer in projected:
                layer.weight_quantizer.project_(layer.weight)
    return model, step


def costs(names: list[str], shared: list[str], repeats: int, num_classes: int = 10,
          threads: int = 1) -> dict[str, dict]:
    """Per arm: its step time against BNN's and its bytes saved for backward, on one batch of
    the study's size and network, every arm's step interleaved with the others'. On `threads`
    threads: one keeps the ratios steady on a machine whose cores others use too."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _costs(names, shared, repeats, num_classes)
    finally:
        torch.set_num_threads(before)


def _costs(names: list[str], shared: list[str], repeats: int, num_classes: int) -> dict[str, dict]:
    cfgs = {n: last_stage([*shared, *ARMS[n].overrides(), "trainer.device=cpu"]) for n in names}
    data = cfgs[BASELINE].data
    torch.manual_seed(0)
    x = torch.randn(data.batch_size, 3, data.image_size, data.image_size)
    y = torch.randint(num_classes, (data.batch_size,))
    steps, saved = {}, {}
    for name, cfg in cfgs.items():
        model, steps[name] = method_step(cfg, x, y, num_classes, channels_last=True)
        saved[name] = saved_bytes(model, x) / 2**20
    steps["bnn copy"] = method_step(cfgs[BASELINE], x, y, num_classes, channels_last=True)[1]
    times = interleaved(steps, repeats)
    base = times[BASELINE]
    noise = round(paired_ratio(base, times["bnn copy"]), 3)
    return {n: {"step_seconds": round(statistics.median(times[n]), 4),
                "step_ratio": round(paired_ratio(base, times[n]), 3), "step_noise_floor": noise,
                "saved_mib": round(saved[n], 2), "saved_ratio": round(saved[n] / saved[BASELINE], 3)} for n in names}


def verdict(diff: float, std: float, base_std: float, seeds: int) -> str:
    """Whether a difference from the baseline is outside the noise (NOISE_RULE)."""
    if seeds < 2:
        return "one seed: no noise estimate"
    if abs(diff) <= 2 * max(std, base_std):
        return "within the noise"
    return "above BNN" if diff > 0 else "below BNN"


def summarize(runs: dict[str, list[dict]]) -> dict[str, dict]:
    """Per arm: the runs' own numbers, their mean and std, and the difference from BNN."""
    table = {}
    for name, results in runs.items():
        finals = [r["top1"] for r in results]
        table[name] = {"top1": finals, "best_top1": [r["best_top1"] for r in results],
                       "seconds": [r["seconds"] for r in results],
                       "resumed": [r.get("resumed", False) for r in results], "mean": statistics.mean(finals),
                       "std": statistics.stdev(finals) if len(finals) > 1 else 0.0}
    base = table[BASELINE]
    for name, arm in table.items():
        arm["diff"] = arm["mean"] - base["mean"]
        seeds = len(arm["top1"])
        arm["verdict"] = "baseline" if name == BASELINE else verdict(arm["diff"], arm["std"], base["std"], seeds)
    return table


def markdown(table: dict[str, dict]) -> str:
    lines = ["| method | input + weight quantizer | final top-1 (%), mean +- std | vs BNN | best top-1 (mean) "
             "| step time vs BNN | saved for backward, MiB (vs BNN) | s per run |", "| --- " * 8 + "|"]
    for name, a in table.items():
        arm = ARMS[name]
        quantizers = f"`{arm.input_quantizer}` + `{arm.weight_quantizer}`"
        if arm.network or arm.training:
            quantizers += ", " + ", ".join(f"`{o}`" for o in (*arm.network, *arm.training[:1]))
        vs = "-" if name == BASELINE else f"{a['diff']:+.2f} ({a['verdict']})"
        whole = [t for t, resumed in zip(a["seconds"], a["resumed"]) if not resumed]
        seconds = f"{statistics.mean(whole):.0f}" if whole else "-"
        lines.append(f"| {arm.title} | {quantizers} | {a['mean']:.2f} +- {a['std']:.2f} | {vs} "
                     f"| {statistics.mean(a['best_top1']):.2f} | {a['step_ratio']:.2f} "
                     f"| {a['saved_mib']:.1f} ({a['saved_ratio']:.2f}) | {seconds} |")
    noise = table[BASELINE]["step_noise_floor"]
    lines += ["", f"A difference from BNN counts where {NOISE_RULE}; the others are within the noise. "
              f"Step time: BNN's step against a copy of itself {noise:.2f} (the timing's noise floor)."]
    return "\n".join(lines) + "\n"


def chosen(arms: str | None) -> list[str]:
    """The arms `--arms` names, the BNN baseline first whatever it says."""
    names = list(ARMS) if not arms else [a.strip() for a in arms.split(",")]
    unknown = [n for n in names if n not in ARMS]
    if unknown:
        sys.exit(f"error: --arms {','.join(unknown)}: not among {', '.join(ARMS)}")
    return [BASELINE, *(n for n in names if n != BASELINE)]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--imagenette", action="store_true", help="--data is Imagenette: train at 64 px")
    parser.add_argument("--arms", help=f"a subset of {','.join(ARMS)}")
    parser.add_argument("--repeats", type=int, default=11, help="rounds of the step-time measurement")
    parser.add_argument("--threads", type=int, default=1, help="threads of the step-time measurement")
    parser.add_argument("--extra", action="append", default=[], help="one more override for every run (repeatable)")
    args = parser.parse_args(argv)
    seeds, names = [int(s) for s in args.seeds.split(",")], chosen(args.arms)
    shared = [*preset(args.data, args.imagenette, args.extra), *one_stage(args.epochs)]
    runs = {}
    for name in names:
        runs[name] = [train([*shared, *ARMS[name].overrides()], args.out / f"{name}_seed{s}", s) for s in seeds]
        print(f"{ARMS[name].title:<25} {[r['top1'] for r in runs[name]]}", flush=True)
    table = summarize(runs)
    for name, cost in costs(names, shared, args.repeats, threads=args.threads).items():
        table[name].update(cost)
    write_text(args.out / "methods.md", markdown(table))
    print(markdown(table), end="")
    write_text(args.out / "methods.json", json.dumps(
        {"seeds": seeds, "epochs": args.epochs, "imagenette": args.imagenette, "overrides": shared,
         "baseline": BASELINE, "noise_rule": NOISE_RULE, "timing": {"repeats": args.repeats, "threads": args.threads},
         "arms": {n: {"title": ARMS[n].title, "overrides": ARMS[n].overrides(), **table[n]} for n in names}},
        indent=2) + "\n")


if __name__ == "__main__":
    main()
