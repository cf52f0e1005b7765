"""The documentation as a whole: the README is the landing page and the site's home page is
the same text, every page is in the site's navigation and every link from the README finds
its page, the figures of the README's feature table are those the benchmarks committed, and
the examples the pages give run as written."""
import json
import re
import shlex
import subprocess
import sys
import textwrap

import pytest
import yaml

from docs_pages import DOCS, ROOT, agrees, flat, page, table_rows


def nav_pages(entries) -> list[str]:
    out = []
    for entry in entries:
        value = next(iter(entry.values())) if isinstance(entry, dict) else entry
        out += nav_pages(value) if isinstance(value, list) else [value]
    return out


def mkdocs_config() -> dict:
    # Only safe_load: the file holds no Python tags.
    return yaml.safe_load((ROOT / "mkdocs.yml").read_text())


def test_every_page_is_in_the_navigation_and_every_nav_entry_is_a_page():
    listed = nav_pages(mkdocs_config()["nav"])
    files = sorted(str(p.relative_to(DOCS)) for p in DOCS.rglob("*.md"))
    assert sorted(listed) == files
    assert len(set(listed)) == len(listed)


def test_the_readmes_links_find_their_pages():
    links = re.findall(r"\]\((docs/[^)#]+)(?:#[^)]*)?\)", page("README.md"))
    assert len(links) >= 14
    missing = [link for link in links if not (ROOT / link).is_file()]
    assert not missing
    linked = {link.removeprefix("docs/") for link in links}
    assert set(nav_pages(mkdocs_config()["nav"])) - {"api/nn.md", "api/models.md", "api/data.md", "api/engine.md",
                                                     "api/tools.md", "api/infer.md", "api/registry.md"} <= linked


def test_the_sites_home_is_the_readme():
    """docs/index.md is the README's text up to its list of pages, links made site-relative."""
    readme = page("README.md").split("## Documentation")[0].replace("](docs/", "](")
    home = page("index.md").split("## Where to go next")[0]
    assert home.strip() == readme.strip()


def test_the_feature_tables_figures_are_the_benchmarks():
    rows = {row[0]: row[1] for row in table_rows("README.md", "| | bnntrain | larq |")}
    cpu = {r["benchmark"]: r for r in json.loads((ROOT / "scripts" / "bench_results_cpu.json").read_text())}
    small, large = re.fullmatch(r"([\d.]+)x the real-valued twin's \(ResNet-18, 32 px\), ([\d.]+)x \(224 px\)",
                                rows["cost of binarization, training step on the CPU"]).groups()
    assert agrees(small, cpu["binarization cost, cifar100 stem 32px"]["ratio"])
    assert agrees(large, cpu["binarization cost, imagenet stem 224px"]["ratio"])
    (memory,) = re.fullmatch(r"([\d.]+)x the straight-through sign's", rows["memory saved for backward"]).groups()
    assert agrees(memory, cpu["memory saved for backward, resnet18 batch 32"]["ratio"])
    smaller, faster = re.fullmatch(r"packed export ([\d.]+)x smaller than fp32 \(ResNet-18, 1000 classes\); "
                                   r"XNOR-popcount CPU runtime ([\d.]+)x faster than float PyTorch \(224 px, batch 1\); "
                                       r"OpenVINO export, binary convs as its BinaryConvolution",
                                   rows["1-bit deployment"]).groups()
    # the export table's row, itself checked against a real export in test_export.py
    export = next(r for r in table_rows("export.md", "| model | export | fp32 weights |")
                  if r[0] == "`resnet18 data=imagenet` (1000 classes)")
    assert export[2].endswith(f"({smaller}x)")
    infer = json.loads((ROOT / "scripts" / "bench_results_infer_cpu.json").read_text())
    batch_one = next(n for n in infer["networks"] if n["image_size"] == 224)["batches"]["1"]
    assert agrees(faster, batch_one["speedup_vs_float"])
    assert "logits equal to the official code's to 1e-10 in float64" in rows["published networks"]


def test_the_channels_last_sentence_is_the_preset_benchmarks():
    presets = json.loads((ROOT / "scripts" / "bench_results_presets_cpu.json").read_text())
    base = {e["baseline"]: e["baseline_value"] for e in presets if e["benchmark"].startswith("CPU training step")}
    cl, nchw = base["torchvision resnet18 (channels_last)"], base["torchvision resnet18 (NCHW)"]
    assert cl < nchw
    assert f"1.063 s a training step against 1.169 s in NCHW" in flat("scale.md")
    assert agrees("1.063", cl) and agrees("1.169", nchw)


def example_commands(name: str) -> list[list[str]]:
    """The `python -m bnntrain ...` lines of the page's bash blocks, as argument lists."""
    blocks = re.findall(r"```bash\n(.*?)```", page(name), re.S)
    lines = [shlex.split(line, comments=True) for block in blocks for line in block.splitlines()]
    return [line[3:] for line in lines if line[:3] == ["python", "-m", "bnntrain"]]


@pytest.mark.parametrize("name", ["README.md", "getting-started.md", "configuration.md"])
def test_the_training_examples_compose(name, tmp_path):
    """Each training command a page shows composes into every stage's config and passes the
    checks a run makes before it starts (a sweep: its first job)."""
    from bnntrain.run.config import plan

    commands = example_commands(name)
    assert commands
    for args in commands:
        args = [a for a in args if a != "-m"]
        args = [re.sub(r"=([^=,]+),.*", r"=\1", a) for a in args]  # a sweep's first value
        args = [a.replace("/data/imagenet", str(tmp_path)).replace("/data/cifar", str(tmp_path)) for a in args]
        if any(a.startswith(("resume=", "distill.teacher.checkpoint=", "--cfg")) for a in args):
            continue  # needs a run folder or a teacher checkpoint
        init = [] if any(a.startswith("init=") for a in args) else [f"init={__file__}"]
        args = [f"init={__file__}" if a.startswith("init=") else a for a in args]
        assert plan(args + init, check_init=False), args


def test_the_contributing_pages_quantizer_works():
    """The page's example quantizer, written as the file it describes, registers by name and
    passes its gradient where |x| < clip."""
    code = re.search(r"```python\n(import torch.*?)```", page("contributing.md"), re.S).group(1)
    code = code.replace("from .base", "from bnntrain.nn.quantizers.base")
    code = code.replace("from .estimators", "from bnntrain.nn.quantizers.estimators")
    check = textwrap.dedent("""
        from bnntrain.nn import BinaryConv2d
        conv = BinaryConv2d(2, 2, 1, input_quantizer={"name": "wide_ste_sign", "clip": 1.5})
        x = torch.tensor([-2.0, -1.4, 0.0, 1.6]).reshape(1, 2, 2, 1).requires_grad_()
        conv(x).sum().backward()
        passed = (x.grad != 0).flatten().tolist()
        assert passed == [False, True, True, False], passed
        assert conv.input_quantizer.config() == {"name": "wide_ste_sign", "clip": 1.5}
        print("ok")
    """)
    done = subprocess.run([sys.executable, "-c", code + check], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


def test_the_methods_tables_are_the_registries():
    """Every registered quantizer has a row on the methods page, and every row is registered."""
    from bnntrain.nn.quantizers import INPUT_QUANTIZERS, WEIGHT_QUANTIZERS

    for title, registry in (("## Input quantizers", INPUT_QUANTIZERS), ("## Weight quantizers", WEIGHT_QUANTIZERS)):
        section = page("methods.md").split(title)[1].split("\n## ")[0]
        rows = [line for line in section.splitlines() if line.startswith("| `")]
        names = {re.match(r"\| `(\w+)`", row).group(1) for row in rows}
        assert names == set(registry.names()), title
