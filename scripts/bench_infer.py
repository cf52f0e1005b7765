"""bnntrain.infer's XNOR-popcount runtime against the same exported network run as float
convolutions in PyTorch (oneDNN), with the same threads, in the same process: ratios the
median over rounds of the paired ratio, so that they hold on a noisy machine. Layers are
interleaved call by call (bench.py's interleaved); whole networks run in alternating blocks
of back-to-back calls, each after an idle pause (bnntrain.infer.timing), because
OpenVINO's threads and PyTorch's (which numba's kernels share) keep spinning after a call,
and called one after another each runtime would take cores from the next.

    python scripts/bench_infer.py                                  # resnet18 at 224 px and 32 px, batch 1 and 16
    python scripts/bench_infer.py --data imagenet --batches 1 --seconds 2 --json FILE

The network: full-width `model=resnet18`, stage 2 (fully binary), random weights and
randomized BN statistics, exported with `bnntrain.tools.export`: `data=imagenet` (224 px, 1000
classes) and `data=cifar100` (32 px, 100 classes). Reported:

- peak: the machine's popcount throughput, from a microbenchmark of the word kernel's inner
  loop (xor, popcount, add into an accumulator, every operand in L1) on all threads, in binary
  MACs per second (64 per 64-bit word), and where it runs (x86 with AVX2) of the nibble
  kernel's (table look-ups and byte adds, `bnntrain.infer.nibbles`);
- per binary layer: the packed layer (packing its input's signs, the XNOR-popcount conv,
  the output tensor) against its float conv (the sign and `F.conv2d` with the weights
  pre-scaled), each on the input it gets in its own network; the binary MACs per second and
  their fraction of the peak of the layer's kernel (`popcount`: nibble or word);
- end to end: the packed model (`bnntrain.infer.load`) against the float model (weights
  pre-scaled, NCHW as `bnntrain.tools.export.load` runs it; channels_last shown beside it),
  against `bnntrain.tools.export.load` itself and, where `openvino` is installed, against
  OpenVINO running the same file's IR (`python -m bnntrain.tools.export ... openvino=DIR`,
  every binary conv a BinaryConvolution) on the same threads, float32, latency mode; each
  a median of block medians (`rounds`: the blocks per runtime).

    python scripts/bench_infer.py --models birealnet18,reactnet18,reactnet_a --data imagenet --seconds 20 --json FILE
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from omegaconf import OmegaConf
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from bench import interleaved, paired_ratio  # noqa: E402

from bnntrain import infer  # noqa: E402
from bnntrain.infer.timing import alternating_blocks  # noqa: E402
from bnntrain.tools import export  # noqa: E402
from bnntrain.run.config import last_stage  # noqa: E402
from bnntrain.files import write_text  # noqa: E402
from bnntrain.engine import save_checkpoint  # noqa: E402
from bnntrain.models import build_model  # noqa: E402


def randomize(model: nn.Module, seed: int = 1) -> None:
    """Trained-looking BN statistics (and thresholds where a model has them)."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            for t in (m.weight.data, m.bias.data, m.running_mean):
                t.copy_(torch.randn(t.shape, generator=g) * 0.5)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)


def export_network(data: str, folder: Path, model_name: str = "resnet18") -> Path:
    cfg = last_stage([f"model={model_name}", f"data={data}"])
    torch.manual_seed(0)
    model = build_model(cfg.model, num_classes=cfg.data.num_classes, in_channels=cfg.data.channels)
    randomize(model)
    ckpt, out = folder / f"{model_name}_{data}.pt", folder / f"{model_name}_{data}.bnn"
    save_checkpoint({"model": model.state_dict(), "num_classes": cfg.data.num_classes, "in_channels": cfg.data.channels,
                     "epoch": 1, "stage": cfg.stage.name, "config": OmegaConf.to_container(cfg, resolve=True)}, ckpt)
    export.export_checkpoint(ckpt, out)
    ckpt.unlink()
    return out


def speedup(times: dict[str, list[float]], base: str) -> float:
    """Median over rounds of base / packed: each round's two timings share the machine's state."""
    return paired_ratio(times["packed"], times[base])


PEAKS = {"word": "binary_macs_per_s", "nibble": "nibble_binary_macs_per_s"}  # a layer's kernel: its peak


def popcount_peak(seconds: float = 1.0) -> dict:
    """Binary MACs per second of the word kernel's inner loop with everything in L1, all threads
    (one thread too), and of the nibble kernel's where it runs (x86 with AVX2)."""
    kernels = infer.require_numba()
    import numba

    threads = numba.get_num_threads()
    rng = np.random.default_rng(0)
    words = rng.integers(0, 2**63, (threads, 32)).astype(np.uint64)  # four per weight row
    weights = rng.integers(0, 2**63, (8, 256)).astype(np.uint64)  # 16 KB: the L1 holds it and the accumulators
    out = np.zeros((threads, 4, 256), np.uint64)
    kernels.popcount_peak(words, weights, 10, out)
    reps, best = 2000, 0.0
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        t = time.perf_counter()
        kernels.popcount_peak(words, weights, reps, out)
        elapsed = time.perf_counter() - t
        best = max(best, threads * reps * 4 * weights.size * 64 / elapsed)
    # One core alone, for reference.
    single, one = np.zeros((1, 4, 256), np.uint64), 0.0
    for _ in range(20):
        t = time.perf_counter()
        kernels.popcount_peak(words[:1], weights, reps, single)
        one = max(one, reps * 4 * weights.size * 64 / (time.perf_counter() - t))
    peak = {"threads": threads, "binary_macs_per_s": best, "binary_macs_per_s_one_thread": one}
    from bnntrain.infer import nibbles
    if nibbles.available():  # the nibble kernel's inner loop, which runs the dense layers here
        act = (rng.integers(0, 16, 6 * 48) * 16).astype(np.uint8)
        table_weights = rng.integers(0, 16, 4 * 48 * 64).astype(np.uint8)
        sums = np.zeros((threads, 6, 64), np.uint16)
        nibbles.nibble_peak(act, table_weights, nibbles.POPCOUNTS, 10, sums)
        fastest = 0.0
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline:
            t = time.perf_counter()
            nibbles.nibble_peak(act, table_weights, nibbles.POPCOUNTS, reps, sums)
            fastest = max(fastest, threads * reps * 4 * 6 * 64 * 192 / (time.perf_counter() - t))
        peak["nibble_binary_macs_per_s"] = fastest
    return peak


def layer_inputs(model: nn.Module, kind: type, images: torch.Tensor) -> dict[str, torch.Tensor]:
    """The input each layer of type `kind` gets in one forward pass."""
    seen: dict[str, torch.Tensor] = {}
    hooks = [m.register_forward_pre_hook(lambda m, args, name=name: seen.setdefault(name, args[0].clone(
        memory_format=torch.preserve_format)))
        for name, m in model.named_modules() if isinstance(m, kind)]
    with torch.inference_mode():
        model(images)
    for h in hooks:
        h.remove()
    return seen


def fakequantize_on_values(model) -> None:
    """Rewire, in place, an exported OpenVINO model to the usual binarization: each binary
    conv's FakeQuantize on the sign's input values (bounds -1e-6, +1e-6) rather than on the
    signs. Not the sign of training near zero (bnntrain/tools/export/openvino.py says why the
    export does not do it), but OpenVINO runs it faster at larger batches: the benchmark times
    both, so that bnntrain.infer is measured against OpenVINO's faster form."""
    import openvino.opset13 as ops
    from bnntrain.tools.export.openvino import _sign_input, _through_converts

    for node in [op for op in model.get_ops() if op.get_type_name() == "FakeQuantize"]:
        values = _sign_input(_through_converts(node.input_value(0)))
        if values is None:  # a sign padded with +-1: left as exported
            continue
        direct = ops.fake_quantize(values, np.float32(-1e-6), np.float32(1e-6), np.float32(-1), np.float32(1), 2)
        for target in node.output(0).get_target_inputs():
            target.replace_source_output(direct.output(0))


def openvino_arms(path: Path, batch: int, threads: int) -> dict[str, tuple[Callable[[torch.Tensor], object], dict]]:
    """OpenVINO on the file's IR at this batch size, as exported and with the FakeQuantize on
    the values: {arm: (run images, facts)}, empty without openvino."""
    if importlib.util.find_spec("openvino") is None:
        return {}
    import openvino
    from bnntrain.tools.export.openvino import compile_openvino, export_openvino, runtime_layer_types

    folder = path.with_suffix(".openvino")
    layers = export_openvino(path, folder) if not (folder / "model.xml").exists() else None
    arms = {}
    for arm in ("openvino", "openvino_values"):
        model = openvino.Core().read_model(str(folder / "model.xml"))
        if arm == "openvino_values":
            fakequantize_on_values(model)
        compiled = compile_openvino(model, batch, threads)
        request = compiled.create_infer_request()
        kinds = runtime_layer_types(compiled)
        facts = {"binary_convolutions": kinds.count("BinaryConvolution"), "float_convolutions": kinds.count("Convolution")}
        if layers is not None and arm == "openvino":
            facts["export"] = layers
        arms[arm] = (lambda images, request=request: request.infer({0: images.numpy()}), facts)
    return arms


def bench_network(path: Path, batches: list[int], seconds: float, peak: dict, threads: int) -> dict:
    packed = infer.load(path)
    config = packed.export_config
    baseline = infer.float_model(path)
    exported = export.load(path)
    channels_last = infer.float_model(path).to(memory_format=torch.channels_last)
    shape = (config["in_channels"], config["image_size"], config["image_size"])
    result = {"file": str(path), "image_size": config["image_size"], "batches": {}}
    for batch in batches:
        images = torch.randn(batch, *shape, generator=torch.Generator().manual_seed(batch))
        images_cl = images.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            logits, float_logits = packed(images), baseline(images)
        # A pre-sign value within float rounding of zero (random inputs make some) can take the
        # other sign where the real-valued layers sum in another order: that image's logits differ.
        worst = (logits - float_logits).abs().max().item()
        same = int((logits.argmax(1) == float_logits.argmax(1)).sum())
        close = int(((logits - float_logits).abs().amax(1) <= 1e-5).sum())
        # Per layer.
        ins_packed = layer_inputs(packed, infer.PackedBinaryConv2d, images)
        ins_float = layer_inputs(baseline, infer.FloatBinaryConv2d, images)
        layers = []
        with torch.inference_mode():
            for fused_name, x in ins_packed.items():
                # A fused block (bnntrain.infer.fused) holds the block it runs as `block`; the
                # layer alone is timed here, packing its input and writing its output.
                name = fused_name.replace(".block.", ".")
                ours, theirs = packed.get_submodule(fused_name), baseline.get_submodule(name)
                xf = ins_float[name]
                times = interleaved({"packed": lambda: ours(x), "float": lambda: theirs(xf)}, 7, seconds=seconds / 8)
                out = theirs(xf)
                macs = out.numel() * ours.in_per_group * ours.kh * ours.kw  # binary MACs (valid taps and padding alike)
                kernel = "nibble" if getattr(ours, "nibbles", None) is not None else "word"
                t_ours, t_float = statistics.median(times["packed"]), statistics.median(times["float"])
                layers.append({"layer": name, "in": list(x.shape[1:]), "out": list(out.shape[1:]),
                               "kernel": f"{ours.kh}x{ours.kw}/{ours.stride[0]}", "macs": macs,
                               "packed_ms": t_ours * 1e3, "float_ms": t_float * 1e3,
                               "packed_ms_min": min(times["packed"]) * 1e3, "float_ms_min": min(times["float"]) * 1e3,
                               "speedup": speedup(times, "float"),
                               "binary_macs_per_s": macs / t_ours, "popcount": kernel,
                               "fraction_of_peak": macs / t_ours / peak[PEAKS[kernel]]})
        # End to end.
        arms = {"packed": lambda: packed(images), "float": lambda: baseline(images),
                "float_channels_last": lambda: channels_last(images_cl), "export_load": lambda: exported(images)}
        openvino = openvino_arms(path, batch, threads)
        for arm, (run_openvino, facts) in openvino.items():
            with torch.inference_mode():
                reference = exported(images)
            openvino_logits = torch.from_numpy(run_openvino(images)[0].copy())
            facts["max_abs_logit_difference_vs_export_load"] = (openvino_logits - reference).abs().max().item()
            facts["same_prediction_as_export_load"] = int((openvino_logits.argmax(1) == reference.argmax(1)).sum())
            arms[arm] = lambda run_openvino=run_openvino: run_openvino(images)
        with torch.inference_mode():
            times = alternating_blocks(arms, seconds)
        total_macs = sum(layer["macs"] for layer in layers)
        t_packed = statistics.median(times["packed"])
        result["batches"][batch] = {
            "max_abs_logit_difference": worst, "same_prediction": same, "logits_within_1e-5": close,
            "layers": layers,
            "end_to_end_ms": {k: statistics.median(v) * 1e3 for k, v in times.items()},
            "end_to_end_ms_min": {k: min(v) * 1e3 for k, v in times.items()},
            "rounds": len(times["packed"]),
            "speedup_vs_float": speedup(times, "float"),
            "speedup_vs_float_channels_last": speedup(times, "float_channels_last"),
            "speedup_vs_export_load": speedup(times, "export_load"),
            "binary_layers_ms": {"packed": sum(x["packed_ms"] for x in layers), "float": sum(x["float_ms"] for x in layers)},
            "binary_macs_per_s_in_network": total_macs / t_packed,
        }
        for arm, (_, facts) in openvino.items():
            # Below 1: bnntrain.infer takes less time than OpenVINO.
            result["batches"][batch][f"time_vs_{arm}"] = paired_ratio(times[arm], times["packed"])
            result["batches"][batch][arm] = facts
    return result


def report(results: dict) -> str:
    peak = results["peak"]
    lines = [f"CPU: {results['cpu']} ({', '.join(results.get('cpu_flags', []))}); {results['threads']} threads "
             f"(PyTorch and numba); torch {torch.__version__}",
             f"popcount peak (inner loop, L1): {peak['binary_macs_per_s'] / 1e9:.0f} G binary MAC/s on "
             f"{peak['threads']} threads ({peak['binary_macs_per_s_one_thread'] / 1e9:.0f} G on one)"
             + (f"; the nibble kernel's: {peak['nibble_binary_macs_per_s'] / 1e9:.0f} G" if "nibble_binary_macs_per_s" in peak
                else ""), ""]
    for net in results["networks"]:
        for batch, r in net["batches"].items():
            lines.append(f"## {Path(net['file']).stem}, {net['image_size']} px, batch {batch} "
                         f"(max |logit difference| {r['max_abs_logit_difference']:.1e})")
            lines.append("| layer | in -> out | k/s | float ms | packed ms | speed-up | G binary MAC/s | of peak |")
            lines.append("| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |")
            for x in r["layers"]:
                lines.append(f"| {x['layer']} | {'x'.join(map(str, x['in']))} -> {'x'.join(map(str, x['out']))} | "
                             f"{x['kernel']} | {x['float_ms']:.3f} | {x['packed_ms']:.3f} | {x['speedup']:.1f}x | "
                             f"{x['binary_macs_per_s'] / 1e9:.0f} | {100 * x['fraction_of_peak']:.0f}% |")
            speed = [x["speedup"] for x in r["layers"]]
            e2e = r["end_to_end_ms"]
            lines.append(f"binary layers: {r['binary_layers_ms']['float']:.2f} ms float, "
                         f"{r['binary_layers_ms']['packed']:.2f} ms packed (sum of medians); per-layer speed-up "
                         f"{min(speed):.1f}x to {max(speed):.1f}x")
            lines.append(f"end to end: packed {e2e['packed']:.2f} ms, float {e2e['float']:.2f} ms "
                         f"({r['speedup_vs_float']:.2f}x), float channels_last {e2e['float_channels_last']:.2f} ms "
                         f"({r['speedup_vs_float_channels_last']:.2f}x), export.load {e2e['export_load']:.2f} ms "
                         f"({r['speedup_vs_export_load']:.2f}x); medians of {r['rounds']} blocks; binary MACs in the "
                         f"network {r['binary_macs_per_s_in_network'] / 1e9:.0f} G/s")
            for arm, form in (("openvino", "as exported"), ("openvino_values", "FakeQuantize on the values")):
                if arm in r:
                    o = r[arm]
                    lines.append(f"OpenVINO ({form}): {e2e[arm]:.2f} ms ({o['binary_convolutions']} BinaryConvolution, "
                                 f"{o['float_convolutions']} float Convolution); bnntrain.infer takes "
                                 f"{r[f'time_vs_{arm}']:.2f}x its time; max |logit difference| from export.load "
                                 f"{o['max_abs_logit_difference_vs_export_load']:.1e}")
            lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="imagenet,cifar100", help="data presets, comma-separated")
    parser.add_argument("--models", default="resnet18", help="model presets, comma-separated")
    parser.add_argument("--batches", default="1,16")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--seconds", type=float, default=8.0, help="end-to-end timing per network and batch")
    parser.add_argument("--json", type=Path, help="write the results here as well")
    args = parser.parse_args()
    infer.set_threads(args.threads)
    peak = popcount_peak()
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    flags: set[str] = set()
    try:
        flags = set(next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split(":", 1)[1].split())
    except (OSError, StopIteration):
        pass
    # The popcount kernels' speed depends on these: AVX-512 VPOPCNTQ, else AVX2's shuffles or POPCNT.
    isa = sorted(flags & {"popcnt", "avx2", "avx512f", "avx512_vpopcntdq", "avx512bw"})
    results = {"cpu": cpu, "cpu_flags": isa, "threads": args.threads, "peak": peak, "networks": []}
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models.split(","):
            for data in args.data.split(","):
                path = export_network(data, Path(tmp), model)
                results["networks"].append(bench_network(path, [int(b) for b in args.batches.split(",")],
                                                         args.seconds, peak, args.threads))
                print(report({**results, "networks": results["networks"][-1:]}), flush=True)
    if args.json:
        write_text(args.json, json.dumps(results, indent=1))


if __name__ == "__main__":
    sys.exit(main())
