"""What a stage checkpoint (`last.pt`, `best.pt`) holds: written by `stage_state`, read by
the stage (to resume), evaluate, export, summary and `model_from_checkpoint` through the
accessors below, so that its layout is defined here and nowhere else.

Every checkpoint holds `model` (the state dict: names -> tensors), `num_classes` and
`in_channels` (what the model was built for), `epoch` (epochs completed), `stage` and
`config` (the resolved stage config as plain containers). A stage's own also holds what
resuming needs (`RESUME_KEYS`): `optimizer`, `scheduler`, `objective`, `trainer` (the
loop's step and gradient scaler), `metrics` (of the last evaluation), `best_top1` and
`init_from` (the checkpoint the stage started from, or None); and `precision` (the mode
its layers were in), `position` (how far into the next epoch: batches trained and their
loss sum) and `hooks` (each stage hook's own state, under its name). Files written before
`position`, `precision` or `hooks` existed read as their defaults here.
"""
from __future__ import annotations

from typing import Any

REQUIRED_KEYS = ("model", "num_classes", "in_channels", "epoch", "stage", "config")
"""The entries every checkpoint holds."""
RESUME_KEYS = ("optimizer", "scheduler", "objective", "trainer", "metrics", "best_top1", "init_from")
"""The entries a stage's own checkpoint holds besides, which resuming it needs."""
START = {"batches": 0, "loss_sum": 0.0}  # the position of an epoch not yet begun


def stage_state(parts: Any, cfg: dict[str, Any], init_from: str | None, epoch: int, position: dict[str, Any],
                precision: dict[str, str], metrics: dict[str, float], best_top1: float,
                hooks: dict[str, dict]) -> dict[str, Any]:
    """The checkpoint of a stage built as `parts` (engine/build.py) after `epoch` whole epochs
    and `position` of the next; `cfg`: the resolved stage config as plain containers.

    Args:
        parts: the stage's objects (`StageParts`).
        cfg: the resolved stage config as plain containers.
        init_from: the checkpoint the stage started from, or None.
        epoch: the epochs completed.
        position: how far into the next: `{batches, loss_sum}`.
        precision: the layers' mode: `{activations, weights}`.
        metrics: the last evaluation's metrics.
        best_top1: the best test top-1 so far.
        hooks: each hook's state, under its name.

    Returns:
        The checkpoint dict, which `save_checkpoint` writes.
    """
    return {"model": parts.model.state_dict(), "optimizer": parts.optimizer.state_dict(),
            "scheduler": parts.scheduler.state_dict(), "objective": parts.objective.state_dict(),
            "trainer": parts.trainer.state_dict(), "precision": precision, "epoch": epoch,
            "position": {"batches": position["batches"], "loss_sum": float(position["loss_sum"])},
            "metrics": metrics, "best_top1": best_top1, "num_classes": parts.loaders.num_classes,
            "in_channels": parts.loaders.channels, "stage": cfg["stage"]["name"], "config": cfg,
            "init_from": init_from, "hooks": hooks}


def position(state: dict[str, Any]) -> dict[str, Any]:
    """How far into the epoch after `epoch` the checkpoint was written (the start where it
    was written between epochs, or by a release that saved only there).

    Args:
        state: a checkpoint.

    Returns:
        `{batches, loss_sum}`: the batches of that epoch trained and the sum of their losses.
    """
    return state.get("position") or dict(START)


def hook_state(state: dict[str, Any], name: str) -> dict[str, Any]:
    """The state hook `name` saved; {} where it saved none (or the file predates hooks).

    Args:
        state: a checkpoint.
        name: the hook's `name`.

    Returns:
        What the hook's `state_dict` returned when the checkpoint was written.
    """
    return (state.get("hooks") or {}).get(name, {})


def precision(state: dict[str, Any]) -> dict[str, str]:
    """The precision the checkpoint's layers were saved at (stage 0 switches from leaky-clip
    to clamp part-way); for files without it, its stage's configured precision.

    Args:
        state: a checkpoint.

    Returns:
        `{activations, weights}`, the modes of `set_precision`.
    """
    stage = state["config"].get("stage", {})
    return state.get("precision") or {"activations": stage.get("activations", "binary"),
                                      "weights": stage.get("weights", "binary")}


def model_config(state: dict[str, Any]) -> dict[str, Any]:
    """The `model` config group the checkpoint's model was built from.

    Args:
        state: a checkpoint.

    Returns:
        The group as plain containers, which `build_model` takes.
    """
    return state["config"]["model"]


def config_groups(state: dict[str, Any], names: tuple[str, ...]) -> dict[str, Any]:
    """The saved config's groups `names` (e.g. data, augment, trainer).

    Args:
        state: a checkpoint.
        names: the groups.

    Returns:
        {group: its config as plain containers}.
    """
    return {name: state["config"][name] for name in names}


def image_size(state: dict[str, Any]) -> int:
    """The side of the square images the model was trained on.

    Args:
        state: a checkpoint.

    Returns:
        `data.image_size` of its config.
    """
    return state["config"]["data"]["image_size"]
