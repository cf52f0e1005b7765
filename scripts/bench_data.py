"""The input pipeline on real full-size ImageNet JPEGs (../shared/data/imagenet-sample-400):
what a loader worker spends per image, ours against plain torchvision, and what the batch
work on the training device costs against a training step.

    python scripts/bench_data.py --images DIR/imagenet-sample-400 [--rounds 5] [--json FILE]

Worker cost: one process, one thread, every image of the sample loaded and transformed as a
worker does it (decode, crop, flip, colour jitter where the preset has it in the worker,
conversion), in milliseconds per image, median over rounds; the arms run in a random order
each round. Ours with `data.batch_augment=true` (the GPU configuration: colour jitter and
lighting on batches) and `false`, for the stage-1 (colour jitter) and stage-2 presets;
plain torchvision: ImageFolder + RandomResizedCrop, flip, ColorJitter (stage 1), ToTensor,
Normalize.
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

import torch

from bnntrain.run.config import last_stage
from bnntrain.files import write_text
from bnntrain.data import build_loaders


def ours(root: Path, stage: int, on_batches: bool):
    cfg = last_stage([f"stage={stage}", f"init={__file__}", "data=imagenet", f"data.root={root}", "data.num_workers=0",
                      f"data.batch_augment={str(on_batches).lower()}"])
    loaders = build_loaders(cfg.data, cfg.augment)
    return loaders.train.loader.dataset, loaders.train.augment, cfg


def plain(root: Path, stage: int):
    from torchvision import datasets, transforms

    steps = [transforms.RandomResizedCrop(224), transforms.RandomHorizontalFlip()]
    if stage == 1:
        steps.append(transforms.ColorJitter(0.4, 0.4, 0.4, 0.1))
    steps += [transforms.ToTensor(), transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])]
    return datasets.ImageFolder(str(root / "train"), transforms.Compose(steps))


def per_image_ms(dataset) -> float:
    start = time.perf_counter()
    for i in range(len(dataset)):
        dataset[i]
    return 1000 * (time.perf_counter() - start) / len(dataset)


def bench_workers(root: Path, rounds: int) -> list[dict]:
    arms = {}
    for stage in (1, 2):
        arms[f"plain torchvision, stage {stage}"] = plain(root, stage)
        for on_batches in (False, True):
            arms[f"bnntrain, stage {stage}, batch_augment={str(on_batches).lower()}"] = ours(root, stage, on_batches)[0]
    times: dict[str, list[float]] = {name: [] for name in arms}
    order = random.Random(0)
    for _ in range(rounds):
        for name in order.sample(list(arms), len(arms)):
            times[name].append(per_image_ms(arms[name]))
    return [{"benchmark": f"worker ms per full-size JPEG, {name}", "bnntrain_value": round(statistics.median(t), 3),
             "unit": "ms/image", "rounds": [round(x, 3) for x in t]} for name, t in times.items()]


def bench_batch_work(root: Path, batch: int, repeats: int) -> list[dict]:
    """The device's share: colour jitter, lighting and normalisation of a batch of 224 px images,
    against a training step of the binary ResNet-18 at that batch, on this device."""
    from bnntrain.models import build_model

    _, augment, cfg = ours(root, 1, True)
    images = torch.randint(0, 256, (batch, 3, 224, 224), dtype=torch.uint8)
    mean = torch.tensor(cfg.data.mean).view(1, 3, 1, 1)
    std = torch.tensor(cfg.data.std).view(1, 3, 1, 1)
    model = build_model(cfg.model, num_classes=1000, in_channels=3).to(memory_format=torch.channels_last)
    opt = torch.optim.Adam(model.parameters())
    y = torch.randint(1000, (batch,))

    def work() -> torch.Tensor:
        return (augment(images.float().div_(255)) - mean) / std

    def step() -> None:
        loss = torch.nn.functional.cross_entropy(model(work().contiguous(memory_format=torch.channels_last)), y)
        opt.zero_grad()
        loss.backward()
        opt.step()

    results = {}
    for name, fn in (("batch work", work), ("training step", step)):
        fn()
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        results[name] = (time.perf_counter() - start) / repeats
    return [{"benchmark": f"batch colour work per batch of {batch} (CPU), share of a binary ResNet-18 step",
             "bnntrain_value": round(results["batch work"] * 1000, 1), "unit": "ms",
             "step_ms": round(results["training step"] * 1000, 1),
             "ratio": round(results["batch work"] / results["training step"], 3)}]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=Path, required=True, help="imagenet-sample-400 (its val/ is read as both splits)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(1)
    root = args.images
    if not (root / "train").exists():  # the sample has val/ only: the loaders need train/ too
        sys.exit(f"error: {root} needs train/ and val/ (link val/ as train/: ln -s val {root}/train)")
    rows = bench_workers(root, args.rounds)
    torch.set_num_threads(2)
    rows += bench_batch_work(root, batch=32, repeats=3)
    for r in rows:
        extra = f"  ({r['ratio']:.3f} of a {r['step_ms']} ms step)" if "ratio" in r else ""
        print(f"{r['benchmark']:<70} {r['bnntrain_value']:>8} {r['unit']}{extra}")
    if args.json:
        write_text(args.json, json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
