"""Benchmarks: each figure is a ratio against a baseline measured in the same process
(medians over repeated steps after warm-up, baseline and candidate interleaved), so the
ratios hold on a noisy machine.

    python scripts/bench.py                               # every CPU benchmark
    python scripts/bench.py --only overhead,memory        # some of them
    python scripts/bench.py --imagenette DIR --cifar10 DIR  # the data and end-to-end ones
    python scripts/bench.py --gpu                         # images/s on a GPU, AMP and channels_last
    python scripts/bench.py --only methods [--methods bnn,bop]  # binarization cost of every method
Results print as a table and are written as JSON (--json).
"""
from __future__ import annotations

import argparse
import copy
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from omegaconf import DictConfig

from bnntrain.run.config import last_stage
from bnntrain.files import write_text
from bnntrain.data import build_loaders
from bnntrain.engine import StageLogger, Trainer
from bnntrain.engine.build import build_stage
from bnntrain.engine.malloc import tune_glibc_malloc
from bnntrain.infer.timing import paired_ratio
from bnntrain.losses import build_objective
from bnntrain.models import build_model
from bnntrain.nn import binary_layers, set_precision


def config(*overrides: str) -> DictConfig:
    """A fully binary stage's config (stage 2 with a placeholder init: nothing is loaded)."""
    return last_stage(["stage=2", f"init={__file__}", *overrides])


def model_for(cfg, num_classes: int = 100, device: str = "cpu") -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model(cfg.model, num_classes=num_classes, in_channels=3)
    set_precision(model, cfg.stage.activations, cfg.stage.weights)
    return model.to(device)


def interleaved(fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 2, seconds: float | None = None,
                max_rounds: int = 400) -> dict[str, list[float]]:
    """Seconds of each function per round. All run once per round, in an order drawn anew
    each round, so that drift hits all alike and none always inherits another's caches.
    `repeats` rounds; with `seconds`, at least `repeats` and then on until `seconds` have
    passed (at most `max_rounds`)."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    order = random.Random(0)
    begin = time.perf_counter()
    for rounds in range(1, max(max_rounds, repeats) + 1):
        for name in order.sample(list(fns), len(fns)):
            start = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - start)
        if rounds >= repeats and (seconds is None or time.perf_counter() - begin > seconds):
            break
    return times


def row(name: str, baseline: str, base: float, ours: float, unit: str, target: str, ratio: float | None = None) -> dict:
    return {"benchmark": name, "baseline": baseline, "baseline_value": base, "bnntrain_value": ours, "unit": unit,
            "ratio": round(ours / base if ratio is None else ratio, 3), "target": target}


def bench_overhead(steps: int, repeats: int) -> list[dict]:
    """A full bnntrain step (objective, optimizer, scheduler, logging), built as a stage builds
    it, against a minimal loop. (Contiguous tensors and glibc's default malloc for both.)"""
    cfg = config("data=synthetic", "data.num_classes=100", "model.width=0.5", "trainer.log_every=10",
                 "trainer.device=cpu", "trainer.channels_last=false", "trainer.malloc=release")
    parts = build_stage(cfg)  # no init: random weights
    set_precision(parts.model, cfg.stage.activations, cfg.stage.weights)
    images, targets = torch.randn(64, 3, 32, 32), torch.randint(100, (64,))
    batches = [(images, targets)] * steps
    plain_model = copy.deepcopy(parts.model)

    def hand_written(model: torch.nn.Module) -> Callable[[], None]:
        opt = torch.optim.Adam(model.parameters(), 2e-4)

        def loop() -> None:
            for x, y in batches:
                loss = F.cross_entropy(model(x), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        return loop

    plain, plain_twin = hand_written(plain_model), hand_written(copy.deepcopy(plain_model))

    trainer, scheduler = parts.trainer, parts.scheduler
    with tempfile.TemporaryDirectory() as tmp:
        logger = StageLogger(Path(tmp), "stage2", 1, progress="plain")

        def ours() -> None:
            trainer.train_epoch(logger.batches(batches, 0), on_log=logger.train_loss)
            scheduler.step()

        times = interleaved({"plain": plain, "twin": plain_twin, "ours": ours}, repeats)
        logger.writer.close()
    # Two copies of the hand-written loop, on two copies of the model: their mean per round is
    # the baseline, and how far apart they land is the noise floor of this machine.
    baseline = [(a + b) / 2 for a, b in zip(times["plain"], times["twin"])]
    base, mine = statistics.median(baseline), statistics.median(times["ours"])
    result = row("framework overhead (train step)", "hand-written loop", base / steps, mine / steps, "s/step",
                 "<= 1.03", ratio=paired_ratio(baseline, times["ours"]))
    return [{**result, "noise_floor_ratio": round(paired_ratio(times["plain"], times["twin"]), 3)}]


# The binarization-cost settings: the data preset (its stem), image size and batch.
BINARIZATION_SETTINGS = (("cifar100", 32, 32), ("imagenet", 224, 8))


def bench_binarization(repeats: int) -> list[dict]:
    """The binary ResNet-18 step against its real-valued twin (model.binarize=false)."""
    out = []
    for data, size, batch in BINARIZATION_SETTINGS:
        steppers = []
        for binarize in ("true", "false"):
            cfg = config(f"data={data}", f"model.binarize={binarize}")
            model = model_for(cfg, 1000 if data == "imagenet" else 100)
            opt = torch.optim.Adam(model.parameters(), 2e-4)
            x, y = torch.randn(batch, 3, size, size), torch.randint(10, (batch,))

            def step(model=model, opt=opt, x=x, y=y) -> None:
                loss = F.cross_entropy(model(x), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            steppers.append(step)
        times = interleaved({"binary": steppers[0], "real": steppers[1]}, repeats)
        out.append(row(f"binarization cost, {data} stem {size}px", "real-valued twin",
                       statistics.median(times["real"]), statistics.median(times["binary"]), "s/step", "<= 1.15 (CPU)",
                       ratio=paired_ratio(times["real"], times["binary"])))
    return out


def bench_methods(repeats: int, names: list[str] | None = None) -> list[dict]:
    """Each binarization method's step (scripts/methods_study.py's arms: the input and weight
    quantizers as their papers pair them, Bop's optimizer) against its real-valued twin: the
    same network with model.binarize=false (AdaBin's keeps its Maxout) trained by Adam. One
    method and its twin at a time, interleaved, so that only two networks are held at once."""
    from methods_study import ARMS, method_step  # imported here: that script imports this one

    unknown = sorted(set(names or ()) - set(ARMS))
    if unknown:
        sys.exit(f"error: --methods {','.join(unknown)}: not among {', '.join(ARMS)}")
    out = []
    for data, size, batch in BINARIZATION_SETTINGS:
        classes = 1000 if data == "imagenet" else 100
        x, y = torch.randn(batch, 3, size, size), torch.randint(classes, (batch,))
        for name, arm in ARMS.items():
            if names and name not in names:
                continue
            _, binary = method_step(config(f"data={data}", *arm.overrides()), x, y, classes)
            _, real = method_step(config(f"data={data}", *arm.twin()), x, y, classes)
            times = interleaved({"binary": binary, "real": real}, repeats)
            out.append(row(f"binarization cost, {arm.title}, {data} stem {size}px", "real-valued twin",
                           statistics.median(times["real"]), statistics.median(times["binary"]), "s/step",
                           "reported", ratio=paired_ratio(times["real"], times["binary"])))
    return out


class CollectionSign(torch.autograd.Function):
    """The collection's BinActive: saves its float input for the backward pass."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        return torch.where(x >= 0, 1.0, -1.0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        return grad * (x.abs() < 1)


def saved_bytes(model: torch.nn.Module, x: torch.Tensor) -> int:
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x).sum()
    return total


def bench_memory() -> list[dict]:
    """Bytes saved for backward in one training step: ours against the collection's sign."""
    cfg = config("data=cifar100")
    ours = model_for(cfg)
    theirs = model_for(cfg)
    for _, layer in binary_layers(theirs):
        layer.input_quantizer.forward, layer.fused_sign = CollectionSign.apply, False
    set_precision(theirs, "binary", "binary")
    x = torch.randn(32, 3, 32, 32)
    base, mine = saved_bytes(theirs, x), saved_bytes(ours, x)
    return [row("memory saved for backward, resnet18 batch 32", "the collection's sign", base / 2**20, mine / 2**20, "MiB",
                "<= 0.75")]


def bench_data(root: Path, images: int, workers: int, device: str = "cpu", rounds: int = 7) -> list[dict]:
    """Training images per second: the ImageNet preset's pipeline against plain torchvision.

    Both decode with Pillow and run the same PIL transforms in the workers, and both end with
    the batch on `device`. Ours hands uint8 images over and normalises each batch there (in
    the main process on the CPU, which counts here); the plain pipeline normalises float
    images per image in the workers. torchvision.io.decode_image is a little faster to
    decode, but colour jitter on tensors costs twice what it costs on PIL images, so it
    does not pay."""
    from torchvision import datasets, transforms

    cfg = config("data=imagenet", f"data.root={root}", f"data.num_workers={workers}", "data.batch_size=64",
                 "stage='1'")
    ours = build_loaders(cfg.data, cfg.augment, device=device).train
    plain_tf = transforms.Compose([transforms.RandomResizedCrop(224), transforms.RandomHorizontalFlip(),
                                   transforms.ColorJitter(0.4, 0.4, 0.4, 0.1), transforms.ToTensor(),
                                   transforms.Normalize(list(cfg.data.mean), list(cfg.data.std))])
    plain = torch.utils.data.DataLoader(datasets.ImageFolder(str(root / "train"), plain_tf), batch_size=64,
                                        shuffle=True, num_workers=workers, drop_last=True,
                                        pin_memory=device == "cuda")

    def rate(loader) -> float:
        """Steady-state images/s: the clock starts once the workers have filled the pipeline."""
        seen, start = 0, None
        for i, (x, _) in enumerate(loader):
            x = x.to(device, non_blocking=True)
            if i == 2 * workers:
                start = time.perf_counter()
            elif start is not None:
                seen += len(x)
                if seen >= images:
                    break
        if device == "cuda":
            torch.cuda.synchronize()
        return seen / (time.perf_counter() - start)

    rates: dict[str, list[float]] = {"plain": [], "ours": []}
    for _ in range(rounds):  # interleaved, so that the page cache and CPU clock favour neither
        rates["plain"].append(rate(plain))
        rates["ours"].append(rate(ours))
    base, mine = statistics.median(rates["plain"]), statistics.median(rates["ours"])
    result = row(f"data pipeline, Imagenette, {workers} workers, batches on {device}", "ImageFolder + PIL transforms",
                 base, mine, "img/s", ">= 1.0", ratio=paired_ratio(rates["plain"], rates["ours"]))
    return [{**result, "rounds": {k: [round(r, 1) for r in v] for k, v in rates.items()}}]


def bench_epoch(root: Path) -> list[dict]:
    """Seconds of one stage-1 epoch of the cifar10_folder_quick preset, as a figure to watch."""
    from bnntrain.engine.stage import train_stage

    cfg = last_stage(["experiment=cifar10_folder_quick", f"data.root={root}", "stage=1", "schedule.epochs=1",
                      "trainer.progress=plain"])
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        result = train_stage(cfg, Path(tmp) / "stage1")
        seconds = time.perf_counter() - start
    return [{"benchmark": "end to end: cifar10_folder_quick, one stage-1 epoch", "bnntrain_value": round(seconds, 1),
             "unit": "s", "top1": round(result["top1"], 2)}]


def bench_gpu(steps: int, batch: int) -> list[dict]:
    """Absolute training images/s of the binary ResNet-18 at 224 px, with and without AMP and channels_last."""
    out = []
    cfg = config("data=imagenet")
    x, y = torch.randn(batch, 3, 224, 224, device="cuda"), torch.randint(1000, (batch,), device="cuda")
    for amp in (None, "bf16"):
        for channels_last in (False, True):
            model = model_for(cfg, 1000, "cuda")
            memory_format = torch.channels_last if channels_last else torch.contiguous_format
            model.to(memory_format=memory_format)
            objective = build_objective(cfg, model, 1000, None)
            trainer = Trainer(model, objective, torch.optim.Adam(model.parameters(), 2e-4), torch.device("cuda"),
                              amp=amp, channels_last=channels_last)
            xs = x.to(memory_format=memory_format)
            for _ in range(5):
                trainer.train_step(xs, y)
            torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(steps):
                trainer.train_step(xs, y)
            torch.cuda.synchronize()
            rate = steps * batch / (time.perf_counter() - start)
            out.append({"benchmark": f"GPU resnet18 224px batch {batch}, amp={amp or 'off'}, "
                                     f"channels_last={channels_last}", "bnntrain_value": round(rate, 1), "unit": "img/s",
                        "device": torch.cuda.get_device_name()})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default="overhead,binarize,memory,data,epoch")
    parser.add_argument("--imagenette", type=Path, help="Imagenette folder (train/, val/) for the data benchmark")
    parser.add_argument("--cifar10", type=Path, help="CIFAR-10 JPEG folder (train/, test/) for the epoch benchmark")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=11)
    parser.add_argument("--gpu", action="store_true", help="only the GPU throughput benchmark")
    parser.add_argument("--methods", help="with --only methods: these methods_study.py arms (e.g. bnn,bop); "
                                          "default every one")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    args = parser.parse_args()

    rows: list[dict] = []
    if args.gpu:
        if not torch.cuda.is_available():
            sys.exit("error: --gpu needs a CUDA device")
        rows += bench_gpu(steps=20, batch=128)
        if args.imagenette:
            rows += bench_data(args.imagenette, images=1920, workers=args.workers, device="cuda")
    else:
        tune_glibc_malloc()  # as the trainer does on the CPU (trainer.malloc=auto), for every arm alike
        only = set(args.only.split(","))
        if "overhead" in only:
            rows += bench_overhead(steps=5, repeats=args.repeats)
        if "binarize" in only:
            rows += bench_binarization(args.repeats)
        if "memory" in only:
            rows += bench_memory()
        if "methods" in only:  # not in the default list: every method, two settings, takes minutes
            rows += bench_methods(args.repeats, args.methods.split(",") if args.methods else None)
        if "data" in only and args.imagenette:
            rows += bench_data(args.imagenette, images=1024, workers=args.workers)
        if "epoch" in only and args.cifar10:
            rows += bench_epoch(args.cifar10)
    for r in rows:
        ratio = f"  ratio {r['ratio']:.3f} (target {r['target']})" if "ratio" in r else ""
        if "noise_floor_ratio" in r:
            ratio += f", identical loops {r['noise_floor_ratio']:.3f}"
        print(f"{r['benchmark']:<55} {r['bnntrain_value']:>10.4g} {r['unit']}{ratio}")
    if args.json:
        write_text(args.json, json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
