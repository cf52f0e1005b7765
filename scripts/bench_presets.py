"""The paper presets' CPU training step and activation memory, against real-valued baselines
run in the same process (interleaved rounds, medians of paired ratios; see bench.py).

    python scripts/bench_presets.py [--repeats 7] [--batch 16] [--json FILE]

Speed, 224 px, fully binary (stage 2), Adam, as `python -m bnntrain` trains on the CPU
(trainer.channels_last=auto: channels_last; trainer.malloc=auto: freed memory kept for reuse,
`--malloc release` for glibc's default):
- `birealnet18` against torchvision's real `resnet18` as a user runs it (NCHW) and on
  channels_last;
- `reactnet18` and `reactnet_a` against their real-valued twins (`model.binarize=false`,
  the same layout), and each twin against an identical copy of itself: the noise floor.
Memory: bytes saved for the backward pass (batch 8), against torchvision's ResNet-18/34 and
the twins.

    python scripts/bench_presets.py --records [--json FILE]

The record networks instead (`bnext_tiny`, `quicknet_small`, `quicknet`, `quicknet_large`,
`real_to_binary`), each against its real-valued twin, speed and memory alike.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision

sys.path.insert(0, str(Path(__file__).parent))
from bench import interleaved, paired_ratio, saved_bytes  # noqa: E402

from bnntrain.run.config import last_stage  # noqa: E402
from bnntrain.files import write_text  # noqa: E402
from bnntrain.engine.malloc import tune_glibc_malloc  # noqa: E402
from bnntrain.models import build_model  # noqa: E402
from bnntrain.nn import set_precision  # noqa: E402


def preset(name: str, binarize: bool = True) -> torch.nn.Module:
    cfg = last_stage(["stage=2", f"init={__file__}", f"model={name}", "data=imagenet", f"model.binarize={binarize}"])
    torch.manual_seed(0)
    model = build_model(cfg.model, num_classes=1000, in_channels=3)
    set_precision(model, "binary", "binary")
    return model


def stepper(model: torch.nn.Module, batch: int, channels_last: bool):
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    x = torch.randn(batch, 3, 224, 224).contiguous(memory_format=fmt)
    y = torch.randint(1000, (batch,))

    def step() -> None:
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


RECORDS = ("bnext_tiny", "quicknet_small", "quicknet", "quicknet_large", "real_to_binary")


def bench_speed(repeats: int, batch: int) -> list[dict]:
    arms = {"torchvision resnet18 (NCHW)": stepper(torchvision.models.resnet18(), batch, False),
            "torchvision resnet18 (channels_last)": stepper(torchvision.models.resnet18(), batch, True),
            "birealnet18": stepper(preset("birealnet18"), batch, True)}
    return bench_against_twins(arms, ("birealnet18", "torchvision resnet18 (NCHW)"),
                               ("birealnet18", "torchvision resnet18 (channels_last)"),
                               names=("reactnet18", "reactnet_a"), repeats=repeats, batch=batch)


def bench_against_twins(arms: dict, *pairs: tuple[str, str], names: tuple[str, ...], repeats: int,
                        batch: int) -> list[dict]:
    """Each of `names` against its real-valued twin (and the twin against a copy: the noise
    floor), interleaved with `arms`; one row per pair of `pairs` and per name."""
    for name in names:
        arms[name] = stepper(preset(name), batch, True)
        arms[f"{name} twin"] = stepper(preset(name, binarize=False), batch, True)
        # A second, identical twin: the ratio of the two is what this machine's noise alone gives.
        arms[f"{name} twin copy"] = stepper(preset(name, binarize=False), batch, True)
    times = interleaved(arms, repeats, warmup=1)
    rows = []
    for arm, base in (*pairs, *((name, f"{name} twin") for name in names)):
        row = {"benchmark": f"CPU training step, {arm}, 224 px, batch {batch}", "baseline": base,
               "baseline_value": statistics.median(times[base]), "bnntrain_value": statistics.median(times[arm]),
               "unit": "s/step", "ratio": round(paired_ratio(times[base], times[arm]), 3),
               "target": "<= 1.00" if arm == "birealnet18" else "<= 1.05"}
        if f"{base} copy" in times:
            row["noise_floor_ratio"] = round(paired_ratio(times[base], times[f"{base} copy"]), 3)
        rows.append(row)
    return rows


def bench_record_memory(batch: int = 8) -> list[dict]:
    """The record networks' bytes saved for backward against their real-valued twins'."""
    x = torch.randn(batch, 3, 224, 224)
    rows = []
    for name in RECORDS:
        ours, twin = saved_bytes(preset(name), x), saved_bytes(preset(name, binarize=False), x)
        rows.append({"benchmark": f"memory saved for backward, {name}, 224 px, batch {batch}",
                     "baseline": "its real-valued twin", "baseline_value": twin / 2**20, "bnntrain_value": ours / 2**20,
                     "unit": "MiB", "ratio": round(ours / twin, 3), "target": "<= 1.35"})
    return rows


def bench_memory(batch: int = 8) -> list[dict]:
    x = torch.randn(batch, 3, 224, 224)
    baselines = {"resnet18": saved_bytes(torchvision.models.resnet18(), x),
                 "resnet34": saved_bytes(torchvision.models.resnet34(), x)}
    rows = []
    for name, base in (("tricks_resnet18", "resnet18"), ("birealnet18", "resnet18"), ("reactnet18", "resnet18"),
                       ("birealnet34", "resnet34"), ("reactnet_a", None)):
        ours = saved_bytes(preset(name), x)
        twin = saved_bytes(preset(name, binarize=False), x)
        reference = baselines[base] if base else twin
        rows.append({"benchmark": f"memory saved for backward, {name}, 224 px, batch {batch}",
                     "baseline": f"torchvision {base}" if base else "its real-valued twin",
                     "baseline_value": reference / 2**20, "bnntrain_value": ours / 2**20, "unit": "MiB",
                     "ratio": round(ours / reference, 3), "twin_ratio": round(ours / twin, 3), "target": "<= 1.35"})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--malloc", choices=("keep", "release"), default="keep", help="as trainer.malloc")
    parser.add_argument("--records", action="store_true", help="the record networks against their twins")
    args = parser.parse_args()
    if args.malloc == "keep" and not tune_glibc_malloc():
        print("glibc's malloc could not be tuned here: measuring with the system's", file=sys.stderr)
    if args.records:  # measured, with no target: what binarizing each costs as its authors built it
        rows = bench_record_memory() + bench_against_twins({}, names=RECORDS, repeats=args.repeats, batch=args.batch)
        for row in rows:
            del row["target"]
    else:
        rows = bench_memory() + bench_speed(args.repeats, args.batch)
    for r in rows:
        noise = f"; twin against its copy {r['noise_floor_ratio']:.3f}" if "noise_floor_ratio" in r else ""
        target = f" (target {r['target']})" if "target" in r else ""
        print(f"{r['benchmark']:<62} {r['bnntrain_value']:>9.4g} {r['unit']}  vs {r['baseline']} "
              f"{r['baseline_value']:.4g}: ratio {r['ratio']:.3f}{target}{noise}")
    if args.json:
        write_text(args.json, json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
