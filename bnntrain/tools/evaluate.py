"""Evaluate a checkpoint on a dataset's test split:
`python -m bnntrain.tools.evaluate ckpt=PATH [out=FILE] [data=NAME] [data.root=PATH ...]`.

The model is the checkpoint's, at the precision its stage ended with. The data is the
checkpoint's own data config (image size, normalisation, test transforms) with any
`data.*` / `trainer.*` overrides, or another data preset where `data=NAME` is given. Prints
top-1, top-5 and the mean loss, and writes them as JSON (`out=`, by default
`<checkpoint>.eval.json`). `trainer.bn_recalibrate=N` first re-estimates the BN statistics
from N training batches (and reports top-1 before it too). Under torchrun the test set is
split across ranks.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from tqdm import tqdm

from ..run.config import group_base, last_stage, one_line, run_tool, split_args
from ..engine import distributed, layout, load_checkpoint
from ..engine.recalibrate import recalibrate_batchnorm
from ..engine.setup import resolve_device
from ..errors import ConfigError
from ..files import refuse_overwrite, write_text
from ..registry import UnknownChoice
from ..run.untrusted import inert

USAGE = "usage: python -m bnntrain.tools.evaluate ckpt=PATH [out=FILE] [data=NAME] [data.root=PATH] [key=value ...]"


def eval_config(state: dict[str, Any], overrides: list[str]) -> DictConfig:
    """`data`, `augment` and `trainer` to evaluate with: the checkpoint's, or a preset's.

    Args:
        state: the checkpoint, as `load_checkpoint` read it.
        overrides: `data=NAME` (another preset) and `data.*`, `augment.*`, `trainer.*` keys.

    Returns:
        The config, with those groups.

    Raises:
        ConfigError: a key the checkpoint's groups do not have, or an invalid override.
    """
    if any(o.startswith("data=") for o in overrides):
        return last_stage(["stage=1", *overrides])
    # The checkpoint's config is data: read literally (no resolver runs), and it downloads
    # nothing (only data.download=true on the command line does).
    saved = OmegaConf.create(inert(layout.config_groups(state, ("data", "augment", "trainer"))))
    for group in ("data", "augment"):  # a key added since the checkpoint was saved: its preset value
        saved[group] = OmegaConf.merge(group_base(group), saved[group])
    if "download" in saved.data:
        saved.data.download = False
    OmegaConf.set_struct(saved, True)
    try:
        return OmegaConf.merge(saved, OmegaConf.from_dotlist(overrides))
    except OmegaConfBaseException as err:
        raise ConfigError(f"{one_line(str(err))} (evaluate takes data.*, augment.* and trainer.* keys)") from None


def evaluate(ckpt: str | Path, overrides: list[str]) -> dict[str, Any]:
    """Evaluate a checkpoint's model, at the precision its stage ended with, on a test set.

    Args:
        ckpt: the checkpoint.
        overrides: as `eval_config` takes them.

    Returns:
        What the command writes as JSON: `checkpoint`, `stage`, `data`, `root`, `images`,
            `top1`, `top5`, `loss` and `seconds`; with `trainer.bn_recalibrate`, also
            `before_recalibration` (the metrics before) and `recalibration_seconds`.

    Raises:
        CheckpointError: the checkpoint is missing, unreadable or does not build.
        ConfigError: an invalid override, or data whose channels or classes are not the model's.
    """
    from ..engine.build import build_evaluation

    state = load_checkpoint(ckpt)
    cfg = eval_config(state, overrides)
    distributed.init(str(resolve_device(cfg.trainer.device)))
    try:  # the saved config is not checked as a planned stage is (checks.check_builds)
        parts = build_evaluation(cfg, state, str(ckpt))
    except UnknownChoice as err:
        raise ConfigError(str(err)) from None
    loaders, trainer = parts.loaders, parts.trainer
    if cfg.data.channels != state["in_channels"]:
        raise ConfigError(f"{ckpt} takes {state['in_channels']}-channel images; data={cfg.data.name} has "
                          f"{cfg.data.channels}")
    if loaders.num_classes != state["num_classes"]:
        raise ConfigError(f"{ckpt} predicts {state['num_classes']} classes; data={cfg.data.name} has "
                          f"{loaders.num_classes}")
    show = distributed.is_main() and (cfg.trainer.progress == "bar" or
                                      (cfg.trainer.progress == "auto" and sys.stderr.isatty()))
    batches = tqdm(loaders.test, desc="evaluating", leave=False, dynamic_ncols=True) if show else loaders.test
    start = time.time()
    recalibrated = {}
    if cfg.trainer.get("bn_recalibrate"):  # checkpoints from before the key have none
        recalibrated["before_recalibration"] = trainer.evaluate(loaders.test)
        recalibrated["recalibration_seconds"] = recalibrate_batchnorm(
            parts.model, loaders.train.unmixed(), cfg.trainer.bn_recalibrate, trainer.forward)
    metrics = trainer.evaluate(batches)
    return {**recalibrated, "checkpoint": str(ckpt), "stage": state["stage"], "data": cfg.data.name,
            "root": cfg.data.get("root"), "images": len(loaders.test.dataset), **metrics,
            "seconds": round(time.time() - start, 1)}


def run(argv: list[str]) -> None:
    """The command: evaluate `ckpt=`, print the metrics, write them to `out=` (by default
    `<checkpoint>.eval.json`).

    Args:
        argv: `ckpt=PATH [out=FILE] [data=NAME] [key=value ...]`.

    Raises:
        UserError: no `ckpt=`, an `out=` whose folder is missing or that is the checkpoint, or
            what `evaluate` raises.
    """
    own, overrides = split_args(argv, ("ckpt", "out"))
    if "ckpt" not in own:
        raise ConfigError("expected ckpt=PATH [out=FILE] [data=NAME] [data.root=PATH]")
    out = Path(own.get("out") or own["ckpt"] + ".eval.json").expanduser()
    if not out.parent.is_dir():
        raise ConfigError(f"out={out}: the folder {out.parent} does not exist")
    refuse_overwrite(out, "out", {"ckpt": own["ckpt"]})
    result = evaluate(own["ckpt"], overrides)
    if distributed.is_main():
        write_text(out, json.dumps(result, indent=2) + "\n")
        print(f"{result['checkpoint']} on {result['data']} ({result['images']} test images): top1 {result['top1']:.2f}  "
              f"top5 {result['top5']:.2f}  loss {result['loss']:.4f}  ->  {out}")
    distributed.shutdown()


def main(argv: list[str] | None = None) -> None:
    """`python -m bnntrain.tools.evaluate ...`: `run`, with `-h` printing the usage and an error printed as one
    `error:` line with exit status 2.

    Args:
        argv: the command's arguments; None reads `sys.argv[1:]`.
    """
    run_tool(run, argv, USAGE)


if __name__ == "__main__":
    main()
