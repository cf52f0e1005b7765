"""Official checkpoints into bnntrain checkpoints:
`python -m bnntrain.tools.convert src=PATH out=PATH model=NAME [step=1|2] [overrides]`.

Reads what Bi-Real Net's and ReActNet's official PyTorch code saves (liuzechun/Bi-Real-net
`pytorch_implementation/BiReal18_34`, liuzechun/ReActNet `resnet/` and `mobilenet/`, both
steps) and BNext's (hpi-xnor/BNext `src/bnext.py`, the four sizes, as its training script
saves them or as released): the state dict alone or inside a dict (`state_dict`, `epoch`,
`best_top1_acc`, `optimizer`, ...), keys with or without DataParallel's `module.` prefix, step
1's real 4-D conv weights, step 2's 4-D `weight` or flat `(N, 1)` `weights`; BNext trains in
one step, binary from the start, so its checkpoints are stage 2. Every official key is mapped
to exactly one of ours (official_keys.py; ReActNet-A's two 1x1 convs and BNs where the channels
double are joined into our one 1x1 conv and BN along the output channels, in order; BNext's
HardSign temperature, divided out of a sign, is dropped); a key with no rule, a key of
ours left unfilled, a shape other than ours (or, for step 2's binary convs, the flat `(N, 1)`),
a dimension of size 0 or a non-float tensor where ours is float is an error naming it. The
result loads with `init=`, and works with `bnntrain.tools.summary`, `bnntrain.tools.export` and
`bnntrain.tools.evaluate`. Latent binary weights of exactly 0 are counted: the official torch.sign
makes them 0, bnntrain's sign +1, so the two networks' logits differ unless there are none.

An HDF5 file (told by its first bytes) is larq-zoo's Keras weights of a QuickNet or of
Real-to-Binary Net, read with h5py (keras_weights.py): binary at the end of their training, so
stage 2; larq's sign is +1 at 0.
"""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from torch import Tensor

from ..run.config import last_stage, run_tool, split_args
from ..engine import save_checkpoint
from ..engine.checkpoint import load_model_weights, load_tensors
from ..errors import CheckpointError, ConfigError
from ..files import refuse_overwrite
from ..models import build_model
from ..nn import set_precision
from .keras_weights import KERAS_RULES, is_hdf5, keras_layers, keras_sizes, keras_state
from .official_keys import BINARY_CONV, DROPPED, KERAS_PRESETS, ONE_STEP, PRESETS, RULES, STEM, Rule

USAGE = "usage: python -m bnntrain.tools.convert src=PATH out=PATH model=NAME [step=1|2] [group=option ...]"
# Far above any real dataset (ImageNet-21k has 21,841 classes; images 1 to 4 channels), far
# below what a forged shape could make build_model allocate.
MAX_CLASSES, MAX_CHANNELS = 100_000, 1024


def check_preset(overrides: list[str]) -> str:
    """Before anything is read: another preset would fail later on its keys, not on its name."""
    presets = [o.partition("=")[2] for o in overrides if o.startswith("model=")]
    preset = presets[-1] if presets else None
    if preset not in PRESETS:
        raise ConfigError(f"model={preset}: convert takes the networks with official checkpoints: "
                          f"{', '.join(PRESETS)}")
    return preset


def check_paths(src: Path, out: Path) -> None:
    """Refused before any work: out over src would replace the official file with ours."""
    if not out.parent.is_dir():
        raise ConfigError(f"out={out}: the folder {out.parent} does not exist")
    refuse_overwrite(out, "out", {"src": src})  # resolved paths, and the same inode: links count


def official_state(blob: Any, src: Path) -> dict[str, Tensor]:
    """The state dict inside whatever the official code saved, without `module.` prefixes;
    every tensor dense and without a dimension of size 0."""
    state = blob.get("state_dict", blob) if isinstance(blob, dict) else None
    if not isinstance(state, dict) or not state or \
            not all(isinstance(k, str) and isinstance(v, Tensor) for k, v in state.items()):
        raise CheckpointError(f"{src} holds no state dict (expected a dict of tensors, or one under 'state_dict')")
    out = {}
    for key, value in state.items():
        name = key.removeprefix("module.")
        if name in out:
            raise CheckpointError(f"{src} holds {name} twice, with and without `module.`")
        if value.layout != torch.strided:
            raise CheckpointError(f"{key}: a {value.layout} tensor, where official checkpoints hold dense ones")
        if 0 in value.shape:
            raise CheckpointError(f"{key} has shape {tuple(value.shape)}: a dimension of size 0")
        out[name] = value
    return out


def infer_step(state: dict[str, Tensor], step: str | None, preset: str) -> int:
    """Step 2 stores binary convs as flat `weights`; a 4-D `weight` may be either step. A
    network trained in one step (BNext) is binary from the start: stage 2."""
    if preset in ONE_STEP:
        if step not in (None, "2"):
            raise ConfigError(f"step={step}: {preset} trains in one step, binary from the start; its checkpoints "
                              f"are stage 2 (leave step out)")
        return 2
    if step is not None:
        if step not in ("1", "2"):
            raise ConfigError(f"step must be 1 or 2; got {step}")
        return int(step)
    if any(k.endswith(".weights") for k in state if BINARY_CONV.search(k)):
        return 2
    raise ConfigError("this checkpoint stores its binary convs as 4-D weights, as step 1 (real weights) and "
                      "ReActNet's later step 2 both do: give step=1 or step=2")


def size_from(state: dict[str, Tensor], key: str, dim: int, limit: int, what: str, default: int) -> int:
    """A count the model is built with (classes, input channels), read off an official tensor
    and bounded before anything of that size is allocated. Without the key or the dimension,
    `default`: the key mapping then names what is missing or misshapen."""
    value = state.get(key)
    if value is None or value.dim() <= dim:
        return default
    if value.shape[dim] > limit:
        raise CheckpointError(f"{key} has shape {tuple(value.shape)}: {value.shape[dim]} {what}, where convert "
                              f"takes at most {limit}")
    return int(value.shape[dim])


def map_keys(state: dict[str, Tensor], rules: list[Rule], own: dict[str, Tensor]) -> dict[str, Tensor]:
    """Our state dict from the official one; parts mapped to one key of ours are joined in order."""
    parts: dict[str, list[tuple[str, Tensor]]] = {}
    unmapped = []
    for key, value in state.items():
        target = next((fn(m) for pattern, fn in rules if (m := re.fullmatch(pattern, key))), None)
        if target is None:
            unmapped.append(key)
        elif target != DROPPED:
            parts.setdefault(target, []).append((key, value))
    if unmapped:
        raise CheckpointError(f"no rule maps {len(unmapped)} official key(s) onto this model: "
                              f"{', '.join(unmapped[:3])}{' ...' if len(unmapped) > 3 else ''}")
    missing = [k for k in own if k not in parts]
    if missing:
        raise CheckpointError(f"the official checkpoint has nothing for {len(missing)} of this model's keys: "
                              f"{', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}")
    out = {}
    for target, found in parts.items():
        if target not in own:
            raise CheckpointError(f"the official key behind {target} has no place in this model (another architecture?)")
        out[target] = join(target, sorted(found), own[target])  # by name: down1 before down2, bn2_1 before bn2_2
    return out


def join(target: str, found: list[tuple[str, Tensor]], own: Tensor) -> Tensor:
    """The official tensor(s) behind one of ours, each checked against its share of our shape
    before anything is allocated from it: ReActNet-A's doubling block has two 1x1 convs and
    BNs, each half of ours along the output channels."""
    if own.dim() == 0:  # num_batches_tracked is a count per BN: joined BNs trained together share it
        return fit(*found[0], tuple(own.shape), own, target)
    if own.shape[0] % len(found):
        raise CheckpointError(f"{len(found)} official tensors map onto {target} {tuple(own.shape)}, whose "
                              f"{own.shape[0]} output channels do not split into {len(found)}")
    share = (own.shape[0] // len(found), *own.shape[1:])
    return torch.cat([fit(key, value, share, own, target) for key, value in found])


def fit(key: str, value: Tensor, shape: tuple[int, ...], own: Tensor, target: str) -> Tensor:
    """`value` as a tensor of `shape` and our dtype: its shape must be that exactly, or, for a
    step-2 binary conv's `weights`, the official flat (O*I*k*k, 1), row-major."""
    flat = (math.prod(shape), 1) if len(shape) == 4 and key.endswith(".weights") and BINARY_CONV.search(key) else None
    if tuple(value.shape) == flat:
        value = value.reshape(shape)
    elif tuple(value.shape) != shape:
        expected = f"{shape}{f' or flat {flat}' if flat else ''}"
        part = f" (one of the parts joined into {target} {tuple(own.shape)})" if shape != tuple(own.shape) else ""
        raise CheckpointError(f"{key} has shape {tuple(value.shape)}, where {target} takes {expected}{part}")
    if value.is_floating_point() != own.is_floating_point() or value.is_complex() or value.dtype == torch.bool:
        raise CheckpointError(f"{key} is {value.dtype}, where {target} is {own.dtype}")
    return value.to(own.dtype)


def zero_binary_weights(state: dict[str, Tensor]) -> int:
    """Latent binary weights of exactly 0: the official torch.sign makes them 0, ours +1."""
    return sum(int((value == 0).sum()) for key, value in state.items() if BINARY_CONV.search(key))


def recorded(blob: Any, key: str, src: Path) -> float | None:
    """A number the official script saved beside the weights (`epoch`, `best_top1_acc`), or None."""
    value = blob.get(key) if isinstance(blob, dict) else None
    if isinstance(value, Tensor) and value.numel() == 1 and not value.is_complex():
        value = value.item()
    if value is None or (isinstance(value, int) and not isinstance(value, bool)) or \
            (isinstance(value, float) and math.isfinite(value)):
        return value
    raise CheckpointError(f"{src}: {key} is a {type(value).__name__}, not a number")


def convert(src: str | Path, out: str | Path, overrides: list[str],
            step: str | None = None) -> tuple[dict[str, Any], int | None]:
    """Write `out` from the official checkpoint `src`; return what was written and how many
    latent binary weights are exactly 0 (see `zero_binary_weights`; 0 where weights are real;
    None for larq-zoo's Keras files, whose sign is +1 at 0 as ours).

    Args:
        src: the official checkpoint: a PyTorch file, or larq-zoo's Keras HDF5 weights.
        out: the bnntrain checkpoint to write; not `src`, in an existing folder.
        overrides: `model=NAME`, one of the presets with official checkpoints, and any other
            config overrides (`data=imagenet` unless a `data=` is given).
        step: `1` or `2`, the official training step; None infers it where the weights tell.

    Returns:
        The checkpoint written, and the number of latent binary weights that are exactly 0 (or None).

    Raises:
        ConfigError: another preset, a step that must be given or is not 1 or 2, `out`'s
            folder missing, or an HDF5 file without h5py installed.
        CheckpointError: `src` is unreadable, or its keys, shapes or types do not map onto the
            model.
        UserError: `out` is `src`, or cannot be written.
    """
    src, out = Path(src).expanduser(), Path(out).expanduser()
    preset = check_preset(overrides)
    check_paths(src, out)
    if is_hdf5(src) or preset in KERAS_PRESETS:
        return convert_keras(src, out, overrides, step, preset), None
    blob = load_tensors(src, "official checkpoint")
    state = official_state(blob, src)
    n = infer_step(state, step, preset)
    num_classes = size_from(state, "fc.weight", 0, MAX_CLASSES, "classes", 1000)
    epoch, best = recorded(blob, "epoch", src) or 0, recorded(blob, "best_top1_acc", src)
    if epoch < 0 or epoch != int(epoch):  # a checkpoint's epoch counts the epochs completed
        raise CheckpointError(f"{src}: epoch is {epoch}, not a count of epochs")
    if preset in ONE_STEP and "epoch" in blob:  # BNext's script saves the finished epoch's index (and resumes at +1)
        epoch += 1
    data = [] if any(o.startswith("data=") for o in overrides) else ["data=imagenet"]
    if preset in ONE_STEP and num_classes != 1000:  # BNext's code: a stride-1 stem for any other class count
        data.append("data.stem=cifar")
    cfg = last_stage([f"stage={n}", f"init={src}", *data, *overrides, f"data.num_classes={num_classes}"])
    if cfg.model.name not in RULES:
        raise ConfigError(f"model.name={cfg.model.name}: official checkpoints exist for {', '.join(PRESETS)}")
    in_channels = size_from(state, STEM[cfg.model.name], 1, MAX_CHANNELS, "input channels", 3)
    model = build_model(cfg.model, num_classes=num_classes, in_channels=in_channels)
    weights = map_keys(state, RULES[cfg.model.name], model.state_dict())
    return (written(model, weights, cfg, src, out, (num_classes, in_channels), int(epoch), best),
            zero_binary_weights(state) if cfg.stage.weights == "binary" else 0)


def convert_keras(src: Path, out: Path, overrides: list[str], step: str | None, preset: str) -> dict[str, Any]:
    """`convert` for larq-zoo's Keras HDF5 weights (keras_weights.py); they hold no epoch or accuracy."""
    if preset not in KERAS_PRESETS:
        raise ConfigError(f"{src} is HDF5 (Keras): convert reads it for {', '.join(KERAS_PRESETS)}, not model={preset}")
    if step not in (None, "2"):  # larq-zoo trains them in one run, binary from the start
        raise ConfigError(f"step={step}: larq-zoo's weights are binary from the start, stage 2 (leave step out)")
    data = [] if any(o.startswith("data=") for o in overrides) else ["data=imagenet"]
    with keras_layers(src) as layers:
        num_classes, in_channels = keras_sizes(layers, MAX_CLASSES, MAX_CHANNELS)
        cfg = last_stage(["stage=2", f"init={src}", *data, *overrides, f"data.num_classes={num_classes}"])
        if cfg.model.name not in KERAS_RULES:
            raise ConfigError(f"model.name={cfg.model.name}: larq-zoo's Keras weights are {', '.join(KERAS_RULES)}'s")
        model = build_model(cfg.model, num_classes=num_classes, in_channels=in_channels)
        weights = keras_state(layers, model, KERAS_RULES[cfg.model.name])
    return written(model, weights, cfg, src, out, (num_classes, in_channels), 0, None)


def written(model: torch.nn.Module, weights: dict[str, Tensor], cfg: Any, src: Path, out: Path,
            sizes: tuple[int, int], epoch: int, best: float | None) -> dict[str, Any]:
    """`weights` in `model` at the stage's precision, saved to `out`; `sizes`: (classes, in channels)."""
    load_model_weights(model, weights, src)
    set_precision(model, cfg.stage.activations, cfg.stage.weights)
    checkpoint = {"model": model.state_dict(), "num_classes": sizes[0], "in_channels": sizes[1],
                  "epoch": epoch, "stage": cfg.stage.name,
                  "precision": {"activations": cfg.stage.activations, "weights": cfg.stage.weights},
                  "metrics": {}, "best_top1": None if best is None else float(best),
                  "config": OmegaConf.to_container(cfg, resolve=True), "init_from": str(src)}
    save_checkpoint(checkpoint, out)
    return checkpoint


def run(argv: list[str]) -> None:
    """The command: convert, then print what was written and whether any latent binary weight
    is exactly 0.

    Args:
        argv: `src=PATH out=PATH model=NAME [step=1|2] [overrides]`.

    Raises:
        UserError: a missing argument, or what `convert` raises.
    """
    own, overrides = split_args(argv, ("src", "out", "step"))
    if "src" not in own or "out" not in own or not any(o.startswith("model=") for o in overrides):
        raise ConfigError(f"expected src=PATH out=PATH model=NAME ({', '.join(PRESETS)})")
    checkpoint, zeros = convert(own["src"], own["out"], overrides, own.get("step"))
    print(f"wrote {own['out']}: {checkpoint['config']['model']['name']} ({overrides[0]}), {checkpoint['stage']} "
          f"({checkpoint['precision']['activations']} activations, {checkpoint['precision']['weights']} weights), "
          f"{len(checkpoint['model'])} tensors, {checkpoint['num_classes']} classes")
    if checkpoint["precision"]["weights"] != "binary":
        return  # step 1's real weights: a weight of 0 is 0 in both networks
    if zeros is None:
        print("larq's sign is +1 at 0, as bnntrain's: every binary weight has the sign larq gives it")
    elif zeros:
        print(f"{zeros} latent binary weight(s) are exactly 0: the official torch.sign makes them 0, bnntrain's "
              f"sign +1 (times the channel's scale), so this network's logits differ from the official one's")
    else:
        print("no latent binary weight is exactly 0: every binary weight has the sign the official code gives it")


def main(argv: list[str] | None = None) -> None:
    """`python -m bnntrain.tools.convert ...`: `run`, with `-h` printing the usage and an error printed as one
    `error:` line with exit status 2.

    Args:
        argv: the command's arguments; None reads `sys.argv[1:]`.
    """
    run_tool(run, argv, USAGE)


if __name__ == "__main__":
    main()
