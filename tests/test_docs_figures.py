"""Figures that the documentation prints (docs/*.md and the README), read from the pages
themselves and checked against what they describe, so that a page that drifts from the code
or the committed JSON (or the code from the page) fails a test. The cost and export tables
are checked in test_complexity.py and test_export.py with the helpers of docs_pages.py."""
import json
import math
import re
from pathlib import Path

import pytest

from docs_pages import ROOT, agrees, flat, page, table_rows


def test_agrees_rounds_at_the_printed_precision():
    assert agrees("4.28", 4.2753) and agrees("22.7", 22.696) and agrees("11.0", 10.959)
    assert not agrees("4.33", 4.3387) and not agrees("140.4", 140.458)


def bench(name: str) -> list[dict]:
    return json.loads((ROOT / "scripts" / name).read_text())


def test_data_pipeline_speed_sentence_agrees_with_the_benchmarks():
    """The Data section's speed-up is the data-pipeline rows of the benchmark JSON files
    (1.046 on the 2-core CPU, 1.221 with 8 workers feeding the GPU)."""
    cpu = next(r for r in bench("bench_results_cpu.json") if r["benchmark"].startswith("data pipeline"))
    gpu = next(r for r in bench("bench_results_gpu.json") if r["benchmark"].startswith("data pipeline"))
    sentence = re.search(r"the workers do less per image \(([^)]*)\)", flat("data.md"))
    assert sentence, "the Data section no longer states the speed-up"
    figures = [float(x) for x in re.findall(r"(\d+\.\d+)x", sentence.group(1))]
    assert figures == [pytest.approx(cpu["ratio"], abs=0.005), pytest.approx(gpu["ratio"], abs=0.005)], sentence.group(1)
    assert "see [Benchmarks](benchmarks.md" in sentence.group(1)  # the pattern stops at the link's ")"


def test_benchmark_table_agrees_with_the_json():
    """Each ratio row of the Benchmarks table is the one in the JSON the benchmark wrote."""
    rows = {row[0]: row for row in table_rows("benchmarks.md", "| benchmark | baseline | bnntrain | ratio | target |")}
    cpu = {r["benchmark"]: r for r in bench("bench_results_cpu.json")}
    gpu = {r["benchmark"]: r for r in bench("bench_results_gpu.json")}
    pairs = {  # the table's row -> JSON entry
        "framework overhead": cpu["framework overhead (train step)"],
        "binarization cost, ResNet-18, CIFAR stem": cpu["binarization cost, cifar100 stem 32px"],
        "binarization cost, ResNet-18, ImageNet stem": cpu["binarization cost, imagenet stem 224px"],
        "memory saved for backward": cpu["memory saved for backward, resnet18 batch 32"],
        "data pipeline, Imagenette, ImageNet preset, 2 workers, CPU":
            cpu["data pipeline, Imagenette, 2 workers, batches on cpu"],
        "data pipeline, same, 8 workers": gpu["data pipeline, Imagenette, 8 workers, batches on cuda"],
    }
    for start, entry in pairs.items():
        row = next(row for name, row in rows.items() if name.startswith(start))
        assert agrees(row[3], entry["ratio"]), (row, entry["ratio"])


def test_what_stays_fp32_in_the_export():
    """'the stem, the 1x1 shortcuts and the classifier (0.7 M parameters in resnet18 with 1000
    classes)' and 'resnet50's real-valued 1x1 branch convs (2.8 M parameters)'."""
    import torch
    from torch import nn

    from bnntrain.models import build_model
    from bnntrain.nn import BinaryConv2d
    from test_config import make

    text = flat("export.md")
    assert "the classifier (0.7 M parameters in `resnet18` with 1000 classes)" in text
    assert "`resnet50`'s real-valued 1x1 branch convs (2.8 M parameters)" in text
    with torch.device("meta"):
        resnet18 = build_model(make("model=resnet18", "data=imagenet").model, num_classes=1000, in_channels=3)
        resnet50 = build_model(make("model=resnet50", "data=imagenet").model, num_classes=1000, in_channels=3)
    binary = {id(m.weight) for m in resnet18.modules() if isinstance(m, BinaryConv2d)}
    real = sum(p.numel() for p in resnet18.parameters() if id(p) not in binary)
    assert real == 706_984 and f"{real / 1e6:.1f}" == "0.7"  # everything but the 16 binary convs' weights
    branches = sum(m.weight.numel() for name, m in resnet50.named_modules()
                   if type(m) is nn.Conv2d and ".branch." in f".{name}")
    assert branches == 64 * 256 + 256 * 512 + 512 * 1024 + 1024 * 2048 and f"{branches / 1e6:.1f}" == "2.8"


def test_stage2_study_table_is_the_studys_results():
    """The 'what stage 2 buys' table is scripts/stage2_study.py's JSON, arm for arm, and the
    sentence that stage 2 does not pay holds for those numbers."""
    study = json.loads((ROOT / "scripts" / "results_stage2_study_cifar10.json").read_text())
    rows = table_rows("results.md", "| arm | final test top-1 (%), mean +- std | per seed |")
    assert [row[0] for row in rows] == list(study["arms"])
    for row, arm in zip(rows, study["arms"].values()):
        mean, spread = row[1].split(" +- ")
        assert agrees(mean, arm["mean"]) and agrees(spread, arm["spread"])
        assert [float(x) for x in row[2].split(", ")] == pytest.approx(arm["top1"], abs=0.005)
    arms = study["arms"]
    assert study["seeds"] == [0, 1, 2] and study["epochs"] == 4
    assert "**stage 2 does not pay**" in page("results.md")
    assert arms["one stage, fully binary"]["mean"] > arms["two-stage (stage 1 then stage 2)"]["mean"]


def test_binary_inference_table_agrees_with_the_json():
    """The XNOR-popcount table is scripts/bench_infer.py's JSON, and its sentence's claims
    (every layer 5-12x, batch-1 end to end about 4x) hold for it."""
    results = json.loads((ROOT / "scripts" / "bench_results_infer_cpu.json").read_text())
    rows = table_rows("inference.md", "| ResNet-18, batch | binary layers, float -> packed (sum) |")
    runs = [(net["image_size"], int(batch), b) for net in results["networks"] for batch, b in net["batches"].items()]
    assert [row[0] for row in rows] == [f"{size} px, {batch}" for size, batch, _ in runs]
    for row, (_, _, b) in zip(rows, runs):
        speedups = [x["speedup"] for x in b["layers"]]
        low, high = re.fullmatch(r"([\d.]+)x to ([\d.]+)x", row[2]).groups()
        assert agrees(low, min(speedups)) and agrees(high, max(speedups))
        assert min(speedups) >= 4  # the target: binary layers at least 4x faster
        vs_nchw, vs_cl = re.fullmatch(r"([\d.]+)x, ([\d.]+)x", row[5]).groups()
        assert agrees(vs_nchw, b["speedup_vs_float"]) and agrees(vs_cl, b["speedup_vs_float_channels_last"])
        assert agrees(row[4].split(" -> ")[1].removesuffix(" ms"), b["end_to_end_ms"]["packed"])
    batch_one = [b for _, batch, b in runs if batch == 1]
    assert all(b["speedup_vs_float_channels_last"] >= 2 for b in batch_one)  # the end-to-end target
    assert all(b["same_prediction"] == batch for _, batch, b in runs)


@pytest.mark.parametrize("name", ["inference.md", "index.md"])  # index.md: the README's text
def test_openvino_table_agrees_with_the_json(name):
    """The table against OpenVINO is scripts/bench_infer.py's JSON: each network and batch, both
    OpenVINO forms, every binary conv a BinaryConvolution and every prediction equal."""
    results = json.loads((ROOT / "scripts" / "bench_results_infer_openvino_cpu.json").read_text())
    rows = table_rows(name, "| network (224 px), batch | bnntrain.infer | OpenVINO, as exported |")
    names = {"birealnet18": "Bi-Real-18", "reactnet18": "ReActNet-18", "reactnet_a": "ReActNet-A"}
    runs = [(names[Path(net["file"]).stem.removesuffix("_imagenet")], batch, b)
            for net in results["networks"] for batch, b in net["batches"].items()]
    assert [row[0] for row in rows] == [f"{name}, {batch}" for name, batch, _ in runs]
    assert {net for net, _, _ in runs} == set(names.values())
    for row, (net, batch, b) in zip(rows, runs):
        for cell, arm in zip(row[1:4], ("packed", "openvino", "openvino_values")):
            assert agrees(cell.removesuffix(" ms"), b["end_to_end_ms"][arm])
        exported, values = re.fullmatch(r"([\d.]+)x, ([\d.]+)x", row[4]).groups()
        assert agrees(exported, b["time_vs_openvino"]) and agrees(values, b["time_vs_openvino_values"])
        assert b["openvino"]["binary_convolutions"] == (26 if net == "ReActNet-A" else 16)
        assert b["same_prediction"] == b["openvino"]["same_prediction_as_export_load"] == int(batch)
    # The sentences: the spans of both forms' ratios, and which rows miss the aim (at most 0.8x
    # the exported model's time).
    exported_ratios = [b["time_vs_openvino"] for _, _, b in runs]
    values_ratios = [b["time_vs_openvino_values"] for _, _, b in runs]
    text = flat(name)
    assert f"takes {min(exported_ratios):.2f}x to {max(exported_ratios):.2f}x OpenVINO's time" in text
    missed = [(net, batch) for net, batch, b in runs if b["time_vs_openvino"] > 0.8]
    claim = "in every row" + (f" but {missed_rows(missed)}" if missed else "")
    if name == "inference.md":
        assert f"and {min(values_ratios):.2f}x to {max(values_ratios):.2f}x its time" in text
        assert f"popcount peak {results['peak']['binary_macs_per_s'] / 1e9:.0f} G binary MACs per second" in text
        assert f"at most 0.8x of the exported model's time {claim}" in text
    else:
        assert f"at most 0.8x {claim}" in text


def missed_rows(missed: list[tuple[str, str]]) -> str:
    """'A and B at batch 1, C at batch 16': the rows above the aim, by batch."""
    batches = dict.fromkeys(batch for _, batch in missed)
    return ", ".join(" and ".join(net for net, b in missed if b == batch) + f" at batch {batch}" for batch in batches)


def test_profile_table_agrees_with_the_json():
    """Where the time goes (inference.md) is scripts/profile_infer.py's JSON: each runtime's
    parts in milliseconds and as shares of its own sum, and the sentence's claims hold."""
    results = json.loads((ROOT / "scripts" / "profile_results_infer_openvino_cpu.json").read_text())
    rows = table_rows("inference.md", "| network (224 px), batch | bnntrain.infer: binary blocks |")
    names = {"birealnet18": "Bi-Real-18", "reactnet18": "ReActNet-18", "reactnet_a": "ReActNet-A"}
    assert [row[0] for row in rows] == [f"{names[e['model']]}, {e['batch']}" for e in results]
    columns = [("bnntrain_infer", g) for g in ("binary", "shortcuts", "real_convs", "rest")] + \
              [("openvino", g) for g in ("binary", "around_binary", "real_convs", "rest")]
    for row, entry in zip(rows, results):
        for cell, (runtime, group) in zip(row[1:], columns):
            groups = entry["groups"][runtime]
            ms, share = re.fullmatch(r"([\d.]+) ms \((\d+)%\)", cell).groups()
            assert agrees(ms, groups[group]) and agrees(share, 100 * groups[group] / groups["sum"]), (cell, group)
        parts = {k: v for k, v in entry["openvino"].items() if k != "total"}
        assert entry["groups"]["openvino"]["sum"] == pytest.approx(sum(parts.values()))
    # The batch-1 sentence on the real-valued layers (ReActNet-18), part by part.
    entry = next(e for e in results if e["model"] == "reactnet18" and e["batch"] == 1)
    ours, theirs = entry["bnntrain_infer"], entry["openvino"]
    pairs = re.search(r"our stem conv with its max-pool \(in numba, one pass\) takes ([\d.]+) ms against OpenVINO's "
                      r"([\d.]+) ms \(its Convolution and MaxPool nodes\), our three shortcuts \(average pool and 1x1 "
                      r"conv, in numba\) ([\d.]+) ms against ([\d.]+) ms \(its AvgPool and 1x1 Convolution nodes\), "
                      r"the classifier and its pooling ([\d.]+) ms against ([\d.]+) ms",
                      re.sub(r"\s+", " ", flat("inference.md"))).groups()
    want = (ours["Conv2d and its MaxPool2d (numba, one pass)"], theirs["Convolution (brgconv_avx2_f32)"] + theirs["MaxPool (jit_avx2_f32)"],
            ours["shortcut of a fused block: pooling, 1x1 conv, BN"],
            theirs["AvgPool (jit_avx2_f32)"] + theirs["Convolution (brgconv_avx2_1x1_f32)"],
            ours["Linear"] + ours["AdaptiveAvgPool2d"], theirs["FullyConnected (gemm_mlas_f32)"] + theirs["ReduceMean (jit_avx2_f32)"])
    assert all(agrees(cell, value) for cell, value in zip(pairs, want))
    around = [e["groups"]["openvino"]["around_binary"] / e["groups"]["openvino"]["sum"] for e in results]
    low, high = re.search(r"OpenVINO spends (\d+)-(\d+)% of its time", flat("inference.md")).groups()
    assert (int(low), int(high)) == (math.floor(100 * min(around)), math.ceil(100 * max(around)))
