"""Do the record networks learn? A few epochs of each (BNext-T, QuickNet-Small, Real-to-Binary
Net, at narrow widths) on Imagenette at 64 px, with the methods study's budget: the
`cifar10_folder_quick` preset's 5,000 training images and Imagenette's 3,925 test images, one
fully binary stage from random weights, Adam at lr 1e-3 (scripts/methods_study.py; the
networks' own paper recipes are hundreds of epochs of ImageNet). Chance is 10%.

    python scripts/records_imagenette.py --data DIR/imagenette2-224 --out records/ [--epochs 6] [--seed 0]
        [--json scripts/results_records_imagenette.json]

Each run is `python -m bnntrain ...` in `--out/<network>`; a finished run is read, not run
again. Written per network: the overrides, the test top-1 per epoch (the stage's TensorBoard
events), the final and best top-1 and the stage's seconds.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # its neighbours
from methods_study import one_stage, preset  # noqa: E402
from record_default_run import stage_curves  # noqa: E402

from bnntrain.files import write_text  # noqa: E402

# network -> its overrides: each preset's own quantizers and blocks, narrowed to train in minutes.
NETWORKS = {
    "bnext_tiny": ["model=bnext_tiny", "model.width=0.25"],
    "quicknet_small": ["model=quicknet_small", "model.width=0.5"],
    "real_to_binary": ["model=real_to_binary", "model.width=0.5"],
}


def train(overrides: list[str], folder: Path) -> dict:
    """The run's stage results and curve: read where it finished, trained otherwise."""
    if not (folder / "results.json").exists():
        done = subprocess.run([sys.executable, "-m", "bnntrain", *overrides, f"hydra.run.dir={folder}",
                               "trainer.progress=plain"], capture_output=True, text=True)
        if done.returncode != 0:
            sys.exit(f"error: the run in {folder} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    (stage, result), = json.loads((folder / "results.json").read_text()).items()
    curve = stage_curves(folder / stage)
    return {"top1": result["top1"], "best_top1": result["best_top1"], "seconds": result["seconds"],
            "curve": curve["top1"], "flip_ratio": curve.get("flip_ratio", [])}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    shared = [*preset(args.data, True, []), *one_stage(args.epochs), f"seed={args.seed}"]
    table = {}
    for name, overrides in NETWORKS.items():
        table[name] = {"overrides": overrides, **train([*shared, *overrides], args.out / name)}
        print(f"{name:<16} top-1 per epoch {table[name]['curve']}  ({table[name]['seconds']:.0f} s)", flush=True)
    if args.json:
        write_text(args.json, json.dumps({"data": "Imagenette, 64 px", "epochs": args.epochs, "seed": args.seed,
                                          "shared": shared, "networks": table}, indent=2) + "\n")


if __name__ == "__main__":
    main()
