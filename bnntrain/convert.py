"""Official checkpoints into bnntrain checkpoints:
`python -m bnntrain.convert src=PATH out=PATH model=NAME [step=1|2] [overrides]`.

Reads what Bi-Real Net's and ReActNet's official PyTorch code saves (liuzechun/Bi-Real-net
`pytorch_implementation/BiReal18_34`, liuzechun/ReActNet `resnet/` and `mobilenet/`, both
steps): the state dict alone or inside a dict (`state_dict`, `epoch`, `best_top1_acc`,
`optimizer`), keys with or without DataParallel's `module.` prefix, step 1's real 4-D conv
weights, step 2's 4-D `weight` or flat `(N, 1)` `weights`. Every official key is mapped to
exactly one of ours (ReActNet-A's two 1x1 convs and BNs where the channels double are joined
into our one 1x1 conv and BN, in order); a key with no rule, a key of ours left unfilled or a
shape that does not fit is an error naming it. The result loads with `init=`, and works
with `bnntrain.summary`, `bnntrain.export` and `bnntrain.evaluate`.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Callable

import torch
from omegaconf import OmegaConf
from torch import Tensor

from .config import last_stage, run_tool, split_args
from .engine import save_checkpoint
from .engine.checkpoint import load_model_weights, load_tensors
from .errors import CheckpointError, ConfigError
from .models import build_model
from .nn import set_precision

USAGE = "usage: python -m bnntrain.convert src=PATH out=PATH model=NAME [step=1|2] [group=option ...]"
Rule = tuple[str, Callable[[re.Match], str]]
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
RULES = {"resnet18": RESNET_RULES, "resnet34": RESNET_RULES, "reactnet_a": REACTNET_A_RULES}
BINARY_CONV = re.compile(r"\.(binary_conv|binary_3x3|binary_pw\w*)\.weights?$")


def official_state(blob: Any, src: Path) -> dict[str, Tensor]:
    """The state dict inside whatever the official code saved, without `module.` prefixes."""
    state = blob.get("state_dict", blob) if isinstance(blob, dict) else None
    if not isinstance(state, dict) or not state or not all(isinstance(v, Tensor) for v in state.values()):
        raise CheckpointError(f"{src} holds no state dict (expected a dict of tensors, or one under 'state_dict')")
    return {k.removeprefix("module."): v for k, v in state.items()}


def infer_step(state: dict[str, Tensor], step: str | None) -> int:
    """Step 2 stores binary convs as flat `weights`; a 4-D `weight` may be either step."""
    if step is not None:
        if step not in ("1", "2"):
            raise ConfigError(f"step must be 1 or 2; got {step}")
        return int(step)
    if any(k.endswith(".weights") for k in state if BINARY_CONV.search(k)):
        return 2
    raise ConfigError("this checkpoint stores its binary convs as 4-D weights, as step 1 (real weights) and "
                      "ReActNet's later step 2 both do: give step=1 or step=2")


def map_keys(state: dict[str, Tensor], rules: list[Rule], own: dict[str, Tensor]) -> dict[str, Tensor]:
    """Our state dict from the official one; parts mapped to one key of ours are joined in order."""
    parts: dict[str, list[Tensor]] = {}
    unmapped = []
    for key, value in state.items():
        target = next((fn(m) for pattern, fn in rules if (m := re.fullmatch(pattern, key))), None)
        if target is None:
            unmapped.append(key)
        else:
            parts.setdefault(target, []).append(value)
    if unmapped:
        raise CheckpointError(f"no rule maps {len(unmapped)} official key(s) onto this model: "
                              f"{', '.join(unmapped[:3])}{' ...' if len(unmapped) > 3 else ''}")
    missing = [k for k in own if k not in parts]
    if missing:
        raise CheckpointError(f"the official checkpoint has nothing for {len(missing)} of this model's keys: "
                              f"{', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}")
    out = {}
    for key, values in parts.items():
        if key not in own:
            raise CheckpointError(f"the official key behind {key} has no place in this model (another architecture?)")
        # num_batches_tracked is a count per BN: joined BNs trained together share it.
        joined = values[0] if values[0].dim() == 0 else torch.cat([v.flatten() for v in values])
        if joined.numel() != own[key].numel():
            raise CheckpointError(f"{key}: the official tensor has {joined.numel()} values, this model "
                                  f"{tuple(own[key].shape)} ({own[key].numel()})")
        out[key] = joined.reshape(own[key].shape).to(own[key].dtype)  # flat (N, 1) weights: row-major (O, I, k, k)
    return out


def convert(src: str | Path, out: str | Path, overrides: list[str], step: str | None = None) -> dict[str, Any]:
    src, out = Path(src).expanduser(), Path(out).expanduser()
    if not out.parent.is_dir():
        raise ConfigError(f"out={out}: the folder {out.parent} does not exist")
    blob = load_tensors(src, "official checkpoint")
    state = official_state(blob, src)
    n = infer_step(state, step)
    num_classes = state["fc.weight"].shape[0] if "fc.weight" in state else 1000
    data = [] if any(o.startswith("data=") for o in overrides) else ["data=imagenet"]
    cfg = last_stage([f"stage={n}", f"init={src}", *data, *overrides, f"data.num_classes={num_classes}"])
    if cfg.model.name not in RULES:
        raise ConfigError(f"model={cfg.model.name}: official checkpoints exist for "
                          f"birealnet18, birealnet34, reactnet18 and reactnet_a")
    in_channels = next(v for k, v in state.items() if k.endswith("conv1.weight")).shape[1]
    model = build_model(cfg.model, num_classes=num_classes, in_channels=in_channels)
    weights = map_keys(state, RULES[cfg.model.name], model.state_dict())
    load_model_weights(model, weights, src)
    set_precision(model, cfg.stage.activations, cfg.stage.weights)
    epoch = blob.get("epoch", 0) if isinstance(blob, dict) else 0
    best = blob.get("best_top1_acc") if isinstance(blob, dict) else None
    checkpoint = {"model": model.state_dict(), "num_classes": num_classes, "in_channels": in_channels,
                  "epoch": int(epoch), "stage": cfg.stage.name,
                  "precision": {"activations": cfg.stage.activations, "weights": cfg.stage.weights},
                  "metrics": {}, "best_top1": None if best is None else float(best),
                  "config": OmegaConf.to_container(cfg, resolve=True), "init_from": str(src)}
    save_checkpoint(checkpoint, out)
    return checkpoint


def run(argv: list[str]) -> None:
    own, overrides = split_args(argv, ("src", "out", "step"))
    if "src" not in own or "out" not in own or not any(o.startswith("model=") for o in overrides):
        raise ConfigError("expected src=PATH out=PATH model=NAME (birealnet18, birealnet34, reactnet18 or reactnet_a)")
    checkpoint = convert(own["src"], own["out"], overrides, own.get("step"))
    print(f"wrote {own['out']}: {checkpoint['config']['model']['name']} ({overrides[0]}), {checkpoint['stage']} "
          f"({checkpoint['precision']['activations']} activations, {checkpoint['precision']['weights']} weights), "
          f"{len(checkpoint['model'])} tensors, {checkpoint['num_classes']} classes")


def main(argv: list[str] | None = None) -> None:
    run_tool(run, argv, USAGE)


if __name__ == "__main__":
    main()
