"""Figures that the documentation prints (docs/*.md and the README), read from the pages
themselves and checked against what they describe, so that a page that drifts from the code
or the committed JSON (or the code from the page) fails a test. The cost and export tables
are checked in test_complexity.py and test_export.py with the helpers of docs_pages.py."""
import json
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
    # The sentences: less time than OpenVINO at batch 1, about as much at batch 16 (each form),
    # and the aim (at most 0.8x OpenVINO's time) not reached.
    def span(batch):
        ratios = [r for _, b_, b in runs if b_ == batch for r in (b["time_vs_openvino"], b["time_vs_openvino_values"])]
        return min(ratios), max(ratios)
    assert span("1")[1] < 1 and 0.85 < span("16")[0] and span("16")[1] < 1.2
    assert max(span("1")[1], span("16")[1]) > 0.8
    text = flat(name)
    assert "takes less time than OpenVINO at batch 1" in text and "about as much at batch 16" in text
    if name == "inference.md":
        assert "({:.2f}x to {:.2f}x)".format(*span("1")) in text and "({:.2f}x to {:.2f}x)".format(*span("16")) in text
        assert "the aim of at most 0.8x OpenVINO's time is not reached" in text
        bireal = runs[1][2]
        assert f"take {bireal['binary_layers_ms']['packed']:.1f} of its {bireal['end_to_end_ms']['packed']:.1f} ms" in text


def test_worker_cost_table_agrees_with_the_json():
    data = {r["benchmark"].split("JPEG, ")[1]: r["bnntrain_value"] for r in bench("bench_results_data_cpu.json")
            if r["benchmark"].startswith("worker ms")}
    rows = table_rows("data.md", "| worker work per image | plain torchvision")
    arms = [("stage 1", "batch_augment=false"), ("stage 1", "batch_augment=true"), ("stage 2", "batch_augment=false")]
    assert len(rows) == len(arms)
    for row, (stage, setting) in zip(rows, arms):
        assert agrees(row[1].removesuffix(" ms"), data[f"plain torchvision, {stage}"])
        assert agrees(row[2].removesuffix(" ms"), data[f"bnntrain, {stage}, {setting}"])
    decode = json.loads((ROOT / "scripts" / "bench_results_decode_cpu.json").read_text())["ms_per_image"]
    sentence = flat("data.md")
    assert f"torchcodec {decode['decode + crop, torchcodec, crop on the tensor (data.decoder=torchcodec)']:.2f} ms" in sentence
    assert f"Pillow {decode['decode + crop, Pillow (data.decoder=pillow)']:.2f} ms" in sentence


def test_preset_benchmark_table_agrees_with_the_json():
    rows = table_rows("benchmarks.md", "| preset benchmark | baseline | bnntrain | ratio | target |")
    presets = bench("bench_results_presets_cpu.json")
    for entry in presets:
        row = next(r for r in rows if r[0] == entry["benchmark"] and r[1].startswith(entry["baseline"]))
        assert agrees(row[3], entry["ratio"]) and row[4] == entry["target"]


def test_imagenette_study_table_is_the_studys_results():
    study = json.loads((ROOT / "scripts" / "results_stage2_study_imagenette.json").read_text())
    rows = table_rows("results.md", "| arm (Imagenette, 64 px) | final test top-1 (%), mean +- std | per seed |")
    assert study["imagenette"] and [row[0] for row in rows] == list(study["arms"])
    for row, arm in zip(rows, study["arms"].values()):
        mean, spread = row[1].split(" +- ")
        assert agrees(mean, arm["mean"]) and agrees(spread, arm["spread"])
        assert [float(x) for x in row[2].split(", ")] == pytest.approx(arm["top1"], abs=0.005)
    arms = study["arms"]
    gap = arms["one stage, fully binary"]["mean"] - arms["two-stage (stage 1 then stage 2)"]["mean"]
    assert f"ends {gap:.1f} points below the one-stage one" in flat("results.md")


@pytest.mark.parametrize("name", ["README.md", "getting-started.md"])
def test_quick_start_figures_are_the_default_runs(name):
    """'about 52 seconds and stage 2 ends at 98.61% top-1 with the default seed (98.89% at its
    best epoch)' is scripts/results_default_run_cpu.json, the `python -m bnntrain` it names."""
    run = json.loads((ROOT / "scripts" / "results_default_run_cpu.json").read_text())
    text = flat(name)
    found = re.search(r"On a 2-core CPU it takes about (\d+) seconds and stage 2 ends at ([\d.]+)% top-1 with the "
                      r"default seed \(([\d.]+)% at its best epoch; `scripts/results_default_run_cpu.json`\)", text)
    assert found, "the Quick start no longer states the default run's time and accuracy"
    seconds, top1, best = found.groups()
    assert run["command"] == "python -m bnntrain" and run["seed"] == 0
    assert "pip install -e \".[dev]\" && python -m bnntrain " in page(name)
    assert agrees(top1, run["stages"]["stage2"]["top1"]) and agrees(best, run["stages"]["stage2"]["best_top1"])
    total = sum(stage["seconds"] for stage in run["stages"].values())
    assert total <= run["log_seconds"] and abs(run["log_seconds"] / int(seconds) - 1) <= 0.1  # "about"
    assert "H200 GPU, 27 seconds" not in text  # measured nowhere


def test_bn_recalibration_sentence_is_the_studys_runs():
    """'-0.90 to +0.40 points (mean -0.13 over the six runs ...)': each recalibrated arm of the
    CIFAR-10 study against the same arm without, seed by seed."""
    arms = json.loads((ROOT / "scripts" / "results_stage2_study_cifar10.json").read_text())["arms"]
    changes = [after - before
               for plain in ("two-stage (stage 1 then stage 2)", "one stage, fully binary")
               for before, after in zip(arms[plain]["top1"], arms[f"{plain.split(' (')[0]}, BN recalibrated"]["top1"])]
    assert len(changes) == 6
    sentence = (f"changed the final network's top-1 by {min(changes):+.2f} to {max(changes):+.2f} points "
                f"(mean {sum(changes) / 6:+.2f} over the six runs of the study's table)")
    assert sentence in flat("results.md"), sentence


def test_benchmark_values_and_noise_floors_agree_with_the_json():
    """The Benchmarks table's baseline and bnntrain values (its ratios are checked above), the
    end-to-end epoch, the GPU throughput table, the seven rounds, and the noise floors quoted."""
    cpu = {r["benchmark"]: r for r in bench("bench_results_cpu.json")}
    gpu = {r["benchmark"]: r for r in bench("bench_results_gpu.json")}
    rows = {row[0]: row for row in table_rows("benchmarks.md", "| benchmark | baseline | bnntrain | ratio | target |")}
    for start, entry in (("framework overhead", cpu["framework overhead (train step)"]),
                         ("binarization cost, ResNet-18, CIFAR stem", cpu["binarization cost, cifar100 stem 32px"]),
                         ("binarization cost, ResNet-18, ImageNet stem", cpu["binarization cost, imagenet stem 224px"]),
                         ("memory saved for backward", cpu["memory saved for backward, resnet18 batch 32"]),
                         ("data pipeline, Imagenette", cpu["data pipeline, Imagenette, 2 workers, batches on cpu"]),
                         ("data pipeline, same", gpu["data pipeline, Imagenette, 8 workers, batches on cuda"])):
        row = next(row for name, row in rows.items() if name.startswith(start))
        baseline = re.fullmatch(r".*, ([\d.]+) [\w/]+", row[1]).group(1)
        assert agrees(baseline, entry["baseline_value"]), (row, entry)
        assert agrees(row[2].split()[0], entry["bnntrain_value"]), (row, entry)
        if "rounds" in entry:  # the data pipeline: "the median of seven interleaved rounds' ratios"
            assert [len(entry["rounds"][arm]) for arm in ("plain", "ours")] == [7, 7]
    epoch = next(row for name, row in rows.items() if name.startswith("end to end"))
    end_to_end = cpu["end to end: cifar10_folder_quick, one stage-1 epoch"]
    assert agrees(epoch[2].removesuffix(" s"), end_to_end["bnntrain_value"])
    throughput = table_rows("benchmarks.md", "| GPU throughput, binary ResNet-18, 224 px, batch 128, H200 | images/s |")
    settings = [("off", False), ("off", True), ("bf16", False), ("bf16", True)]
    assert len(throughput) == len(settings)
    for row, (amp, channels_last) in zip(throughput, settings):
        entry = gpu[f"GPU resnet18 224px batch 128, amp={amp}, channels_last={channels_last}"]
        assert entry["device"] == "NVIDIA H200" and row[1] == f"{entry['bnntrain_value']:,.0f}", (row, entry)
    text = flat("benchmarks.md")
    overhead = cpu["framework overhead (train step)"]
    assert f"(`noise_floor_ratio`, {overhead['noise_floor_ratio']:.3f} in this run)" in text
    floors = {r["noise_floor_ratio"] for r in bench("bench_results_presets_cpu.json") if "noise_floor_ratio" in r}
    assert len(floors) == 1 and f"(`noise_floor_ratio` in the JSON: {floors.pop():.3f} for both)" in text


def test_preset_table_values_agree_with_the_json():
    rows = table_rows("benchmarks.md", "| preset benchmark | baseline | bnntrain | ratio | target |")
    for entry in bench("bench_results_presets_cpu.json"):
        row = next(r for r in rows if r[0] == entry["benchmark"] and r[1].startswith(entry["baseline"]))
        assert agrees(re.fullmatch(r".*, ([\d.]+) [\w/]+", row[1]).group(1), entry["baseline_value"]), row
        assert agrees(row[2].split()[0], entry["bnntrain_value"]), row


def test_ranges_nothing_measured_are_gone():
    """Figures of runs no JSON holds were taken out of the pages: they must not come back unbacked."""
    pages = ["README.md", *sorted(p.name for p in (ROOT / "docs").glob("*.md"))]
    text = " ".join(flat(name) for name in pages)
    for unbacked in ("99.17%", "-1.1 to +0.45", "+4.95 points", "0.969-1.082x", "1.002-1.088x", "14,000-25,000",
                     "0.96-1.04", "1.002x and 1.006x", "about 4 s once", "42.03%", "42.00%", "0.70-0.95x",
                     "0.7 ms per image", "minutes a run"):
        assert unbacked not in text, unbacked


def test_decode_and_colour_work_sentences_agree_with_the_json():
    """'Decode alone: Pillow 1.49 ms, torchcodec 1.39 ms, simplejpeg 1.25 ms', the draft
    fraction, and the colour work on the batch (bench_data's batch row, per image) against in a
    worker (stage 1's worker cost with colour work less without)."""
    decode = json.loads((ROOT / "scripts" / "bench_results_decode_cpu.json").read_text())
    ms = decode["ms_per_image"]
    text = flat("data.md")
    assert (f"Decode alone: Pillow {ms['decode, Pillow (data.decoder=pillow)']:.2f} ms, torchcodec "
            f"{ms['decode, torchcodec (data.decoder=torchcodec)']:.2f} ms, simplejpeg {ms['decode, simplejpeg']:.2f} ms"
            ) in text
    assert f"would apply to {decode['draft_fraction']:.0%} of the crops" in text
    data = {r["benchmark"]: r for r in bench("bench_results_data_cpu.json")}
    batch = data["batch colour work per batch of 32 (CPU), share of a binary ResNet-18 step"]["bnntrain_value"] / 32
    worker = (data["worker ms per full-size JPEG, bnntrain, stage 1, batch_augment=false"]["bnntrain_value"]
              - data["worker ms per full-size JPEG, bnntrain, stage 1, batch_augment=true"]["bnntrain_value"])
    assert f"costs {batch:.1f} ms an image in the training process against {worker:.1f} ms in a worker" in text


def test_binary_inference_sentences_agree_with_the_json():
    """The popcount peak, what is left of the batch-1 latency, and the logits against the float
    baseline (4e-7, but for one image of 16 whose logits are 0.04 apart)."""
    results = json.loads((ROOT / "scripts" / "bench_results_infer_cpu.json").read_text())
    text = flat("inference.md")
    peak = results["peak"]
    assert (f"{peak['binary_macs_per_s'] / 1e9:,.0f} G binary multiply-accumulates per second (64 per 64-bit word, "
            f"{peak['binary_macs_per_s_one_thread'] / 1e9:,.0f} G on one thread)") in text
    one = next(net for net in results["networks"] if net["image_size"] == 224)["batches"]["1"]
    rest, total = one["end_to_end_ms"]["packed"] - one["binary_layers_ms"]["packed"], one["end_to_end_ms"]["packed"]
    assert f"What is left ({rest:.1f} of the {total:.1f} ms at 224 px, batch 1)" in text
    runs = [(net["image_size"], b) for net in results["networks"] for b in net["batches"].values()]
    clean = max(b["max_abs_logit_difference"] for _, b in runs if b["logits_within_1e-5"] == b["same_prediction"])
    off = [(size, b) for size, b in runs if b["logits_within_1e-5"] != b["same_prediction"]]
    assert f"the logits agree to {clean:.0e}".replace("e-0", "e-") in text
    assert len(off) == 1 and off[0][0] == 224 and off[0][1]["same_prediction"] - off[0][1]["logits_within_1e-5"] == 1
    apart = off[0][1]["max_abs_logit_difference"]
    assert f"(1 of the 16 images at 224 px: same prediction, logits {apart:.2f} apart)" in text


def test_the_cifar_study_gap_sentence():
    arms = json.loads((ROOT / "scripts" / "results_stage2_study_cifar10.json").read_text())["arms"]
    gap = arms["one stage, fully binary"]["mean"] - arms["two-stage (stage 1 then stage 2)"]["mean"]
    assert f"the two-stage network ends {gap:.0f} points below a fully binary network" in flat("results.md")


def test_record_network_benchmark_table_is_the_json():
    rows = table_rows("benchmarks.md", "| record network benchmark | baseline | bnntrain | ratio | twin against its copy |")
    records = bench("bench_results_records_cpu.json")
    assert len(rows) == len(records)
    for row, entry in zip(rows, records):
        assert row[0] == entry["benchmark"] and row[1].startswith(entry["baseline"])
        assert agrees(row[3], entry["ratio"])
        assert agrees(row[4], entry["noise_floor_ratio"]) if "noise_floor_ratio" in entry else row[4] == "-"


def test_record_networks_imagenette_table_is_the_runs():
    runs = json.loads((ROOT / "scripts" / "results_records_imagenette.json").read_text())
    rows = table_rows("networks.md", "| network (Imagenette, 64 px) | overrides | test top-1 per epoch (%) | final | best | s |")
    assert [row[0] for row in rows] == [f"`{name}`" for name in runs["networks"]]
    for row, net in zip(rows, runs["networks"].values()):
        assert row[1] == " ".join(f"`{o}`" for o in net["overrides"])
        assert row[2] == ", ".join(f"{t:.1f}" for t in net["curve"])
        assert agrees(row[3], net["top1"]) and agrees(row[4], net["best_top1"]) and agrees(row[5], net["seconds"])


def test_method_cost_table_is_the_json():
    """The Benchmarks page's per-method binarization cost is bench.py --only methods' JSON,
    every method of scripts/methods_study.py in both settings."""
    import sys
    sys.path.insert(0, str(ROOT / "scripts"))
    import methods_study as study
    by = {r["benchmark"]: r for r in bench("bench_results_methods_cpu.json")}
    rows = table_rows("benchmarks.md", "| method | CIFAR stem, 32 px, batch 32 | ImageNet stem, 224 px, batch 8 |")
    assert [row[0] for row in rows] == [arm.title for arm in study.ARMS.values()]
    for row, arm in zip(rows, study.ARMS.values()):
        assert agrees(row[1], by[f"binarization cost, {arm.title}, cifar100 stem 32px"]["ratio"])
        assert agrees(row[2], by[f"binarization cost, {arm.title}, imagenet stem 224px"]["ratio"])
    assert len(by) == 2 * len(study.ARMS)
    # "adding them made the default no slower": BNN's rows against the training table's.
    cpu = {r["benchmark"]: r.get("ratio") for r in bench("bench_results_cpu.json")}
    for setting in ("cifar100 stem 32px", "imagenet stem 224px"):
        assert by[f"binarization cost, BNN, {setting}"]["ratio"] <= cpu[f"binarization cost, {setting}"] + 0.01
    ratios = {arm.title: [by[f"binarization cost, {arm.title}, {s}"]["ratio"] for s in ("cifar100 stem 32px",
                                                                                        "imagenet stem 224px")]
              for arm in study.ARMS.values()}
    costliest = sorted(ratios, key=lambda t: -sum(ratios[t]))[:3]
    cheapest = sorted(ratios, key=lambda t: sum(ratios[t]))[:3]
    assert set(costliest) == {"FDA", "ReCU", "BNN+"}
    assert set(cheapest) == {"larq SteHeaviside (0/1)", "Bi-Real Net", "DoReFa-Net"}
