"""The cost report of a model: `python -m bnntrain.summary [overrides]` or `ckpt=PATH`.

Overrides are the trainer's (`model=resnet18 data=imagenet ...`), composed with Hydra's
compose API so that a report creates no run folder. The report describes one
precision: a single-stage config (`stage=1`) its own `stage.activations` and
`stage.weights`, a pipeline (`stage=two_stage`, the default) its last stage, fully
binary; a checkpoint the precision its stage ended with.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Mapping

from omegaconf import DictConfig
from torch import nn

from .cli import compose_checked, quote_stage_choices
from .complexity import CostReport, count_costs, format_totals, precision
from .engine import load_checkpoint
from .errors import ConfigError
from .models import build_model, model_from_checkpoint
from .nn import binary_layers
from .tools import run_tool, split_args

log = logging.getLogger("bnntrain")
USAGE = """usage: python -m bnntrain.summary [group=option ...] [key=value ...]   the cost of a config
       python -m bnntrain.summary ckpt=PATH                                the cost of a checkpoint"""


def stage_precision(stage: Mapping[str, Any]) -> tuple[str, str]:
    """(activations, weights) a config describes: a single stage's own, a pipeline's last (binary)."""
    if "run" in stage:
        return "binary", "binary"
    return stage["activations"], stage["weights"]


def input_shape(data: Mapping[str, Any]) -> tuple[int, int, int]:
    return data["channels"], data["image_size"], data["image_size"]


def write_report(model: nn.Module, cfg: DictConfig, folder: Path, writer: Any | None) -> CostReport:
    """The stage's cost report into `folder` (cost.txt, cost.json) and TensorBoard (text `cost`)."""
    with precision(model, *stage_precision(cfg.stage)):
        report = count_costs(model, input_shape(cfg.data))
    table = report.table()
    (folder / "cost.txt").write_text(table + "\n")
    (folder / "cost.json").write_text(json.dumps(report.to_dict(), indent=1) + "\n")
    if writer is not None:
        # Indented four spaces, TensorBoard's markdown shows the table as it is printed.
        writer.add_text("cost", "\n".join("    " + line for line in table.splitlines()))
    log.info(f"{cfg.stage.name}: " + format_totals(report)[-1])
    return report


def compose_config(overrides: list[str]) -> DictConfig:
    """The trainer's config with these overrides; a bad one is a ConfigError of one line."""
    cfg = compose_checked(quote_stage_choices(overrides))
    if cfg is None:
        raise ConfigError("the summary describes one config: give single values, not a sweep")
    return cfg


def config_report(cfg: DictConfig) -> tuple[str, CostReport]:
    """A title and the report of the model a config builds, at the precision it describes."""
    if cfg.data.get("num_classes") is None:
        raise ConfigError(f"data={cfg.data.name} counts its classes from the dataset; give data.num_classes=N")
    model = build_model(cfg.model, num_classes=cfg.data.num_classes, in_channels=cfg.data.channels)
    activations, weights = stage_precision(cfg.stage)
    with precision(model, activations, weights):
        report = count_costs(model, input_shape(cfg.data))
    which = "the last stage of the pipeline" if "run" in cfg.stage else cfg.stage.name
    return (f"model {cfg.model.name}, data {cfg.data.name}; {activations} activations, {weights} weights "
            f"({which})"), report


def checkpoint_report(path: str) -> tuple[str, CostReport]:
    """A title and the report of a checkpoint's model, at the precision its stage ended with."""
    state = load_checkpoint(path)
    model = model_from_checkpoint(state, path)
    stage = state["config"].get("stage", {})
    _, layer = next(binary_layers(model), (None, None))
    mode = f"{layer.activations} activations, {layer.weights} weights" if layer else "no binary layers"
    report = count_costs(model, input_shape(state["config"]["data"]))
    return f"{path}: model {state['config']['model']['name']}, {stage.get('name', state['stage'])}; {mode}", report


def summarize(argv: list[str]) -> None:
    own, overrides = split_args(argv, ("ckpt",))
    if "ckpt" in own and overrides:
        raise ConfigError(f"ckpt= reports the checkpoint as it was trained and takes no overrides; "
                          f"got {' '.join(overrides)}")
    title, report = checkpoint_report(own["ckpt"]) if "ckpt" in own else config_report(compose_config(overrides))
    print(f"{title}; input {'x'.join(map(str, report.input_shape))}\n\n{report.table()}")


def main(argv: list[str] | None = None) -> None:
    run_tool(summarize, argv, USAGE)


if __name__ == "__main__":
    main()
