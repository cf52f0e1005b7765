"""The cost report of a model: `python -m bnntrain.tools.summary [overrides]` or `ckpt=PATH`.

Overrides are the trainer's (`model=resnet18 data=imagenet ...`), composed through
`bnntrain.run.config` as a run would be, without making a run folder. The report describes
one precision: a single stage (`stage=1`) its own, a pipeline (`stage=two_stage`, the
default) its last stage's, fully binary; a checkpoint the precision its stage ended with.
"""
from __future__ import annotations

from ..complexity import CostReport, count_costs, precision
from ..run.config import plan, run_tool, split_args
from ..engine import layout, load_checkpoint
from ..errors import CheckpointError, ConfigError
from ..models import build_model, model_from_checkpoint
from ..nn import binary_layers

USAGE = """usage: python -m bnntrain.tools.summary [group=option ...] [key=value ...]   the cost of a config
       python -m bnntrain.tools.summary ckpt=PATH                                the cost of a checkpoint"""


def config_report(overrides: list[str]) -> tuple[str, CostReport]:
    """A title and the report of the model a config builds, at the precision of its (last) stage.

    Args:
        overrides: config overrides, as the trainer takes them.

    Returns:
        The title line and the cost report.

    Raises:
        ConfigError: an invalid config, or data that does not state its number of classes.
    """
    stages = plan(overrides)
    cfg = stages[-1]
    if cfg.data.get("num_classes") is None:
        raise ConfigError(f"data={cfg.data.name} counts its classes from the dataset; give data.num_classes=N")
    model = build_model(cfg.model, num_classes=cfg.data.num_classes, in_channels=cfg.data.channels)
    activations, weights = cfg.stage.activations, cfg.stage.weights
    with precision(model, activations, weights):
        report = count_costs(model, (cfg.data.channels, cfg.data.image_size, cfg.data.image_size))
    which = "the last stage of the pipeline" if len(stages) > 1 else cfg.stage.name
    return (f"model {cfg.model.name}, data {cfg.data.name}; {activations} activations, {weights} weights "
            f"({which})"), report


def checkpoint_report(path: str) -> tuple[str, CostReport]:
    """A title and the report of a checkpoint's model, at the precision its stage ended with.

    Args:
        path: the checkpoint.

    Returns:
        The title line and the cost report.

    Raises:
        CheckpointError: the checkpoint is unreadable, or its model cannot be built or run.
    """
    state = load_checkpoint(path)
    try:
        model = model_from_checkpoint(state, path)
        _, layer = next(binary_layers(model), (None, None))
        size = layout.image_size(state)
        report = count_costs(model, (state["in_channels"], size, size))
        title = f"{path}: model {layout.model_config(state)['name']}, {state['stage']}"
    except (RuntimeError, ValueError, TypeError, KeyError, IndexError, AttributeError, ZeroDivisionError) as err:
        # What the file says cannot be built or run (a forged shape, a config missing a key):
        # the file is at fault, and the error names it, with torch's or Python's first line.
        lines = str(err).strip().splitlines()
        raise CheckpointError(f"{path}: its model cannot be built or counted "
                              f"({type(err).__name__}: {lines[0] if lines else ''})") from None
    mode = f"{layer.activations} activations, {layer.weights} weights" if layer else "no binary layers"
    return f"{title}; {mode}", report


def summarize(argv: list[str]) -> None:
    """The command: print the cost report of a config's model, or of a checkpoint's.

    Args:
        argv: config overrides, or `ckpt=PATH` alone.

    Raises:
        UserError: `ckpt=` with overrides, or what the reports raise.
    """
    own, overrides = split_args(argv, ("ckpt",))
    if "ckpt" in own and overrides:
        raise ConfigError(f"ckpt= reports the checkpoint as it was trained and takes no overrides; "
                          f"got {' '.join(overrides)}")
    title, report = checkpoint_report(own["ckpt"]) if "ckpt" in own else config_report(overrides)
    print(f"{title}; input {'x'.join(map(str, report.input_shape))}\n\n{report.table()}")


def main(argv: list[str] | None = None) -> None:
    """`python -m bnntrain.tools.summary ...`: `run`, with `-h` printing the usage and an error printed as one
    `error:` line with exit status 2.

    Args:
        argv: the command's arguments; None reads `sys.argv[1:]`.
    """
    run_tool(summarize, argv, USAGE)


if __name__ == "__main__":
    main()
