"""How the official PyTorch checkpoints' keys become ours: one list of rules per network, each a
pattern over the official key (without DataParallel's `module.`) and the key of ours it fills
(larq-zoo's Keras files are paired by layer order or layer name instead: keras_rules.py).
A rule whose target is `DROPPED` accounts for an official tensor that has no effect on the
network and no twin in ours (BNext's `HardSign` temperature); any other key must be filled.
"""
from __future__ import annotations

import re
from typing import Callable

Rule = tuple[str, Callable[[re.Match], str]]
DROPPED = ""  # a rule's target for an official tensor with no effect and no twin of ours
BN = r"(weight|bias|running_mean|running_var|num_batches_tracked)"

# Bi-Real Net 18/34 and ReActNet's ResNet-18: layer{L}.{B} is our stages.{L-1}.{B}.
RESNET_RULES: list[Rule] = [
    (r"conv1\.weight", lambda m: "stem.0.weight"),
    (rf"bn1\.{BN}", lambda m: f"stem.1.{m[1]}"),
    (r"layer(\d)\.(\d+)\.binary_conv\.weights?", lambda m: f"stages.{int(m[1]) - 1}.{m[2]}.convs.0.weight"),
    (rf"layer(\d)\.(\d+)\.bn1\.{BN}", lambda m: f"stages.{int(m[1]) - 1}.{m[2]}.norms.0.{m[3]}"),
    (r"layer(\d)\.(\d+)\.move0\.bias", lambda m: f"stages.{int(m[1]) - 1}.{m[2]}.convs.0.threshold"),
    (r"layer(\d)\.(\d+)\.move1\.bias", lambda m: f"stages.{int(m[1]) - 1}.{m[2]}.act.shift_in"),
    (r"layer(\d)\.(\d+)\.prelu\.weight", lambda m: f"stages.{int(m[1]) - 1}.{m[2]}.act.prelu.weight"),
    (r"layer(\d)\.(\d+)\.move2\.bias", lambda m: f"stages.{int(m[1]) - 1}.{m[2]}.act.shift_out"),
    (r"layer(\d)\.(\d+)\.downsample\.1\.weight", lambda m: f"stages.{int(m[1]) - 1}.{m[2]}.shortcut.1.weight"),
    (rf"layer(\d)\.(\d+)\.downsample\.2\.{BN}", lambda m: f"stages.{int(m[1]) - 1}.{m[2]}.shortcut.2.{m[3]}"),
    (r"fc\.(weight|bias)", lambda m: f"classifier.{m[1]}"),
]
# ReActNet-A: feature.0 is the stem, feature.{i} our stages.{i-1}: its 3x3 half `.0`, its 1x1 half `.1`.
HALF = {"move11": "0.convs.0.threshold", "move12": "0.act.shift_in", "prelu1": "0.act.prelu", "move13": "0.act.shift_out",
        "move21": "1.convs.0.threshold", "move22": "1.act.shift_in", "prelu2": "1.act.prelu", "move23": "1.act.shift_out"}
REACTNET_A_RULES: list[Rule] = [
    (r"feature\.0\.conv1\.weight", lambda m: "stem.0.weight"),
    (rf"feature\.0\.bn1\.{BN}", lambda m: f"stem.1.{m[1]}"),
    (r"feature\.(\d+)\.binary_3x3\.weights?", lambda m: f"stages.{int(m[1]) - 1}.0.convs.0.weight"),
    (rf"feature\.(\d+)\.bn1\.{BN}", lambda m: f"stages.{int(m[1]) - 1}.0.norms.0.{m[2]}"),
    (r"feature\.(\d+)\.binary_pw(?:_down[12])?\.weights?", lambda m: f"stages.{int(m[1]) - 1}.1.convs.0.weight"),
    (rf"feature\.(\d+)\.bn2(?:_[12])?\.{BN}", lambda m: f"stages.{int(m[1]) - 1}.1.norms.0.{m[2]}"),
    (r"feature\.(\d+)\.(move\d\d)\.bias", lambda m: f"stages.{int(m[1]) - 1}.{HALF[m[2]]}"),
    (r"feature\.(\d+)\.(prelu[12])\.weight", lambda m: f"stages.{int(m[1]) - 1}.{HALF[m[2]]}.weight"),
    (r"fc\.(weight|bias)", lambda m: f"classifier.{m[1]}"),
]

# BNext (hpi-xnor/BNext src/bnext.py): feature.0 is the stem, feature.{i} our blocks.{i-1},
# whose units `Attention`, then `FFN` (or `FFN_1` and `FFN_2` where the channels double) are
# our `attention` and `ffn.0` (`ffn.1`); nn/bnext_blocks.py names the leaves as the code does
# but for the learnable shift (our binary conv's threshold) and the weight temperature (its
# quantizer's). The code's HardSign temperature is divided out of a sign: no effect.
BNEXT_UNIT = {"Attention": "attention", "FFN": "ffn.0", "FFN_1": "ffn.0", "FFN_2": "ffn.1"}
UNIT = r"feature\.(\d+)\.(Attention|FFN|FFN_[12])\."


def _unit(m: re.Match, leaf: str) -> str:
    return f"blocks.{int(m[1]) - 1}.{BNEXT_UNIT[m[2]]}.{leaf}"


BNEXT_RULES: list[Rule] = [
    (r"feature\.0\.conv1\.weight", lambda m: "stem.0.weight"),
    (rf"feature\.0\.bn1\.{BN}", lambda m: f"stem.1.{m[1]}"),
    (r"feature\.0\.prelu\.weight", lambda m: "stem_prelu.weight"),
    (UNIT + r"binary_activation\.temperature", lambda m: DROPPED),
    (UNIT + r"move\.bias", lambda m: _unit(m, "binary_conv.threshold")),
    (UNIT + r"binary_conv\.weight", lambda m: _unit(m, "binary_conv.weight")),
    (UNIT + r"binary_conv\.temperature", lambda m: _unit(m, "binary_conv.weight_quantizer.temperature")),
    (UNIT + rf"(norm[12])\.{BN}", lambda m: _unit(m, f"{m[3]}.{m[4]}")),
    (UNIT + r"(activation[12])\.weight", lambda m: _unit(m, f"{m[3]}.weight")),
    (UNIT + r"se\.se\.([13])\.(weight|bias)", lambda m: _unit(m, f"se.{m[3]}.{m[4]}")),
    (UNIT + r"scale", lambda m: _unit(m, "scale")),
    (r"prelu\.weight", lambda m: "head_prelu.weight"),
    (r"fc\.(weight|bias)", lambda m: f"classifier.{m[1]}"),
]

# model.name: its rules, and the official key of its stem conv (the input channels are read off it).
RULES = {"resnet18": RESNET_RULES, "resnet34": RESNET_RULES, "reactnet_a": REACTNET_A_RULES, "bnext": BNEXT_RULES}
STEM = {"resnet18": "conv1.weight", "resnet34": "conv1.weight", "reactnet_a": "feature.0.conv1.weight",
        "bnext": "feature.0.conv1.weight"}
# The presets whose official weights are larq-zoo's Keras HDF5 files (keras_rules.py maps them).
KERAS_PRESETS = ("quicknet_small", "quicknet", "quicknet_large", "real_to_binary")
# The presets with official checkpoints.
PRESETS = ("birealnet18", "birealnet34", "reactnet18", "reactnet_a", "bnext_tiny", "bnext_small", "bnext_middle",
           "bnext_large", *KERAS_PRESETS)
# Networks trained in one step, binary from the start (BNext): their checkpoints are stage 2.
ONE_STEP = ("bnext_tiny", "bnext_small", "bnext_middle", "bnext_large")
# The official binary convs' latent weights: Bi-Real/ReActNet's and BNext's.
BINARY_CONV = re.compile(r"\.(binary_conv|binary_3x3|binary_pw\w*)\.weights?$")
