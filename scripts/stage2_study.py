"""What does stage 2 buy? The two-stage recipe against a one-stage fully binary run and a
stage-1-only run of the same total epochs, each over a few seeds, with and without BN
recalibration, on the CIFAR-10 JPEGs (the `cifar10_folder_quick` preset: a 5,000-image
subset, quarter-width `tricks_resnet18`).

    python scripts/stage2_study.py --data DIR/cifar10-jpg --out study/ [--seeds 0,1,2] [--epochs 4]
    python scripts/stage2_study.py --data DIR/imagenette2-224 --out study-imagenette/ --imagenette \
        --arms two-stage,one-stage,stage-1    # Imagenette at 64 px, without the recalibrated arms

Each run is `python -m bnntrain experiment=cifar10_folder_quick ...` in its own folder under
`--out`; the table (mean and spread of the final test top-1 of the fully binary network, or of
stage 1 where that is the arm) is printed and written to `--out/study.md` and `study.json`.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

from bnntrain.files import write_text


def arms(epochs: int) -> dict[str, list[str]]:
    """name -> overrides; every arm trains 2 x `epochs` epochs in all."""
    one_stage = ["stage=2", "stage.needs_init=false", f"schedule.epochs={2 * epochs}",
                 "stage.recipe.adam.lr=1e-3"]  # binary from scratch at stage 1's lr
    return {
        "two-stage (stage 1 then stage 2)": [f"schedule.epochs={epochs}"],
        "two-stage, BN recalibrated": [f"schedule.epochs={epochs}", "trainer.bn_recalibrate=20"],
        "one stage, fully binary": one_stage,
        "one stage, fully binary, BN recalibrated": [*one_stage, "trainer.bn_recalibrate=20"],
        "stage 1 only (real weights)": ["stage=1", f"schedule.epochs={2 * epochs}"],
    }


# Imagenette's 224 px photos at 64 px: the ImageNet stem and augmentation at that size
# (random-resized crop, flip, colour jitter in stage 1), 5,000 training and all 3,925
# validation images.
IMAGENETTE = ["data.image_size=64", "data.stem=imagenet", "augment=imagenet", "augment.train.random_resized_crop.size=64",
              "augment.test.resize=73", "augment.test.center_crop=64", "data.test_limit=null",
              "data.mean=[0.485,0.456,0.406]", "data.std=[0.229,0.224,0.225]"]


def run(overrides: list[str], data: Path, folder: Path, seed: int) -> dict:
    if not (folder / "results.json").exists():
        subprocess.run([sys.executable, "-m", "bnntrain", "experiment=cifar10_folder_quick", f"data.root={data}",
                        f"seed={seed}", "trainer.progress=plain", *overrides, f"hydra.run.dir={folder}"],
                       check=True, capture_output=True)
    results = json.loads((folder / "results.json").read_text())
    return results[list(results)[-1]]  # the last stage's: the network the run ends with


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--epochs", type=int, default=4, help="epochs per stage of the two-stage arm")
    parser.add_argument("--imagenette", action="store_true", help="--data is Imagenette: train at 64 px")
    parser.add_argument("--arms", help="a subset, by the start of their names with - for spaces (e.g. two-stage,one-stage)")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    chosen = arms(args.epochs)
    if args.arms:
        starts = [a.replace("-", " ") for a in args.arms.split(",")]
        chosen = {name: o for name, o in chosen.items() if any(name.replace("-", " ").startswith(x) for x in starts)
                  and "recalibrated" not in name}
    table = {}
    for name, overrides in chosen.items():
        tag = name.split(" (")[0].replace(", ", "_").replace(" ", "_")
        overrides = [*overrides, *(IMAGENETTE if args.imagenette else [])]
        finals = [run(overrides, args.data, args.out / f"{tag}_seed{s}", s)["top1"] for s in seeds]
        table[name] = {"top1": finals, "mean": statistics.mean(finals),
                       "spread": statistics.stdev(finals) if len(finals) > 1 else 0.0}
        print(f"{name:<45} {table[name]['mean']:6.2f} +- {table[name]['spread']:.2f}  {finals}", flush=True)
    lines = ["| arm | final top-1, mean +- std | per seed |", "| --- | --- | --- |"]
    lines += [f"| {k} | {v['mean']:.2f} +- {v['spread']:.2f} | {', '.join(f'{t:.2f}' for t in v['top1'])} |"
              for k, v in table.items()]
    write_text(args.out / "study.md", "\n".join(lines) + "\n")
    write_text(args.out / "study.json", json.dumps({"seeds": seeds, "epochs": args.epochs, "arms": table,
                                                    "imagenette": args.imagenette}, indent=2))


if __name__ == "__main__":
    main()
