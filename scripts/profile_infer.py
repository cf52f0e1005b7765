"""Where the time goes: bnntrain.infer's modules and OpenVINO's runtime nodes on the same
network, side by side, so that the gap between the two runtimes can be read layer by layer.

    python scripts/profile_infer.py --models birealnet18,reactnet18 --batches 1,16
    python scripts/profile_infer.py --models reactnet_a --batches 1 --json FILE

The network is built as scripts/bench_infer.py builds it (stage 2, random weights and
trained-looking BN statistics, 224 px), exported and loaded with `bnntrain.infer.load`.
bnntrain.infer: the time of each module the model runs (a fused block, a packed layer, or a
PyTorch leaf module), from forward hooks, summed by kind (hooked, the runs of blocks that
`bnntrain.infer.chain` runs in one call run block by block: the total, without hooks, is the
model's own); OpenVINO: its CPU plugin's own
per-node counters (`PERF_COUNT`), summed by node type (with the kernel that ran it). Each runtime
runs alone, `--rounds` times after a warm-up, and the per-round sums are medians: a profile
says where the time goes, scripts/bench_infer.py measures which runtime is faster.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from bench_infer import export_network  # noqa: E402

from bnntrain import infer  # noqa: E402
from bnntrain.files import write_text  # noqa: E402
from bnntrain.infer.fused import FusedBinaryBlock  # noqa: E402
from bnntrain.infer.pooling import FastMaxPool2d  # noqa: E402
from bnntrain.infer.stem import DirectConv2d, DirectConvMaxPool  # noqa: E402

# What a module of each kind does, for the table (a PyTorch leaf otherwise: its class name).
KINDS = {FusedBinaryBlock: "binary block: conv, BN, shortcut, activation, next signs",
         infer.PackedBinaryConv2d: "binary conv (packing its input)",
         FastMaxPool2d: "MaxPool2d (numba)", DirectConv2d: "Conv2d (numba)",
         DirectConvMaxPool: "Conv2d and its MaxPool2d (numba, one pass)"}
SHORTCUT = "shortcut of a fused block: pooling, 1x1 conv, BN"


def timed_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The modules the profile times: fused blocks and packed layers whole, else the leaves."""
    picked = []
    for name, module in model.named_children():
        if isinstance(module, tuple(KINDS)) or not list(module.children()):
            picked.append((name, module))
        else:
            picked += [(f"{name}.{n}", m) for n, m in timed_modules(module)]
    return picked


def profile_ours(path: Path, batch: int, rounds: int) -> dict[str, float]:
    """Milliseconds per kind of module, and `total` (the model's own time, without hooks)."""
    model = infer.load(path)
    images = torch.randn(batch, 3, 224, 224)
    per_round: dict[str, list[float]] = defaultdict(list)
    spent: dict[str, float] = defaultdict(float)
    started: dict[str, float] = {}
    hooks = []
    # A fused block computes its shortcut (pooling, 1x1 conv, BN where the shape changes) first:
    # timed on its own and taken out of the block's time, as OpenVINO's nodes count it apart.
    shortcuts = [(f"{name}.block.shortcut", m.block.shortcut) for name, m in model.named_modules()
                 if isinstance(m, FusedBinaryBlock) and not isinstance(m.block.shortcut, nn.Identity)]
    for name, module in timed_modules(model) + shortcuts:
        kind = SHORTCUT if (name, module) in shortcuts else KINDS.get(type(module), type(module).__name__)
        hooks.append(module.register_forward_pre_hook(lambda m, a, name=name: started.__setitem__(name, time.perf_counter())))
        hooks.append(module.register_forward_hook(
            lambda m, a, o, name=name, kind=kind: spent.__setitem__(kind, spent[kind] + time.perf_counter() - started[name])))
    with torch.inference_mode():
        for _ in range(3):
            model(images)
        for _ in range(rounds):
            spent.clear()
            model(images)
            if SHORTCUT in spent:
                spent[KINDS[FusedBinaryBlock]] -= spent[SHORTCUT]
            for kind, seconds in spent.items():
                per_round[kind].append(seconds)
        for hook in hooks:
            hook.remove()
        for _ in range(rounds):
            start = time.perf_counter()
            model(images)
            per_round["total"].append(time.perf_counter() - start)
    return {kind: statistics.median(v) * 1e3 for kind, v in per_round.items()}


def profile_openvino(path: Path, batch: int, rounds: int, threads: int) -> dict[str, float]:
    """Milliseconds per node type (kernel), and `total`, from the CPU plugin's counters."""
    import openvino
    from bnntrain.tools.export.openvino import export_openvino

    folder = path.with_suffix(".openvino")  # beside the packed file, in main's temporary folder
    if not (folder / "model.xml").exists():  # exported once, for every batch size
        export_openvino(path, folder)
    core = openvino.Core()
    model = core.read_model(str(folder / "model.xml"))
    model.reshape([batch, 3, 224, 224])
    compiled = core.compile_model(model, "CPU", {"INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": "f32",
                                                 "PERFORMANCE_HINT": "LATENCY", "PERF_COUNT": "YES"})
    request = compiled.create_infer_request()
    images = torch.randn(batch, 3, 224, 224).numpy()
    per_round: dict[str, list[float]] = defaultdict(list)
    for _ in range(3):
        request.infer({0: images})
    for _ in range(rounds):
        start = time.perf_counter()
        request.infer({0: images})
        per_round["total"].append(time.perf_counter() - start)
        spent: dict[str, float] = defaultdict(float)
        for node in request.profiling_info:
            spent[f"{node.node_type} ({node.exec_type})"] += node.real_time.total_seconds()
        for kind, seconds in spent.items():
            per_round[kind].append(seconds)
    return {kind: statistics.median(v) * 1e3 for kind, v in per_round.items() if statistics.median(v) > 0}


# The parts the docs compare, by what they do: OpenVINO's binarization and layout nodes around
# its BinaryConvolution (FakeQuantize, reference Reorders, the Subgraph of BN and additions, and
# ReActNet-A's Concat) against what bnntrain.infer's fused blocks do in one pass.
GROUPS = {"bnntrain_infer": {"binary": ("binary",), "real_convs": ("Conv2d",), "shortcuts": ("shortcut",)},
          "openvino": {"binary": ("BinaryConvolution",), "around_binary": ("FakeQuantize", "Reorder", "Subgraph", "Concat"),
                       "real_convs": ("Convolution",), "shortcuts": ()}}


def grouped(profile: dict[str, float], runtime: str) -> dict[str, float]:
    """Milliseconds per group of parts (`GROUPS`, by a part's first word), `rest` for the others
    and `sum` for all."""
    parts = {kind: ms for kind, ms in profile.items() if kind != "total"}
    first = {kind: kind.split(" ")[0] for kind in parts}
    groups = {group: sum(ms for kind, ms in parts.items() if first[kind] in words)
              for group, words in GROUPS[runtime].items()}
    groups["rest"] = sum(parts.values()) - sum(groups.values())
    groups["sum"] = sum(parts.values())
    return groups


def table(profile: dict[str, float]) -> list[str]:
    rows = sorted(((k, v) for k, v in profile.items() if k != "total"), key=lambda kv: -kv[1])
    return [f"  {kind:62s} {ms:8.2f} ms" for kind, ms in rows] + [f"  {'total (run without hooks)':62s} {profile['total']:8.2f} ms"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="birealnet18", help="model presets, comma-separated")
    parser.add_argument("--batches", default="1,16")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--json", type=Path, help="write the profiles here as well")
    args = parser.parse_args()
    infer.set_threads(args.threads)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            path = export_network("imagenet", Path(tmp), name)
            for batch in map(int, args.batches.split(",")):
                rounds = max(3, args.rounds // batch)
                entry = {"model": name, "batch": batch, "threads": args.threads,
                         "bnntrain_infer": profile_ours(path, batch, rounds)}
                if importlib.util.find_spec("openvino") is not None:
                    entry["openvino"] = profile_openvino(path, batch, rounds, args.threads)
                entry["groups"] = {runtime: grouped(entry[runtime], runtime) for runtime in GROUPS if runtime in entry}
                results.append(entry)
                print(f"{name}, 224 px, batch {batch}, {args.threads} threads\nbnntrain.infer:")
                print("\n".join(table(entry["bnntrain_infer"])))
                if "openvino" in entry:
                    print("OpenVINO:\n" + "\n".join(table(entry["openvino"])))
                print(flush=True)
    if args.json:
        write_text(args.json, json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
