"""Models registered by name; `build_model` turns the `model` config group into a module."""
from __future__ import annotations

from typing import Any, Callable

from omegaconf import DictConfig, OmegaConf
from torch import nn

from .. import notes
from ..errors import CheckpointError
from ..nn.init import init_weights
from ..registry import Registry

MODELS: Registry[Callable[..., nn.Module]] = Registry("model.name", package="bnntrain.models")
"""The networks by name (`model.name`), each a builder that takes the `model` config's other keys.
Every module of `bnntrain.models` is imported before the first lookup, so a new network is one
module that registers its builder."""

# The quantizer keys before `input_quantizer` and `weight_quantizer`, still read from the
# command line, experiment files and the configs that checkpoints saved (null: not set).
OLD_QUANTIZER_KEYS = ("quantizer", "quantizer_args", "weight_scale", "weight_gradient")


def quantizer_options(options: dict[str, Any]) -> dict[str, Any]:
    """`options` with the old quantizer keys turned into `input_quantizer` / `weight_quantizer`
    (the one place they are read): `quantizer: X` with `quantizer_args` is `input_quantizer:
    {name: X, <args>}`; `weight_scale: false` is `weight_quantizer: {name: sign}`, true is
    `{name: scaled_sign, gradient: <weight_gradient>}`."""
    old = {key: options.pop(key, None) for key in OLD_QUANTIZER_KEYS}
    used = [f"model.{key}" for key, value in old.items() if value not in (None, {})]
    if not used:
        return options
    notes.add(f"note: {', '.join(used)} are now read as model.input_quantizer and model.weight_quantizer "
              "({name: ..., <arguments>}); the old keys still work")
    input_quantizer = dict(options.get("input_quantizer") or {})
    if old["quantizer"] is not None:
        input_quantizer = {"name": old["quantizer"]}
    options["input_quantizer"] = {**input_quantizer, **(old["quantizer_args"] or {})}
    weight_quantizer = dict(options.get("weight_quantizer") or {"name": "scaled_sign"})
    scaled = old["weight_scale"] if old["weight_scale"] is not None else weight_quantizer["name"] == "scaled_sign"
    gradient = old["weight_gradient"] or weight_quantizer.get("gradient", "scaled")
    options["weight_quantizer"] = {"name": "scaled_sign", "gradient": gradient} if scaled else {"name": "sign"}
    return options


def build_model(cfg: DictConfig | dict, **data_options: Any) -> nn.Module:
    """Build the network a `model` config group describes.

    `cfg.name` picks the architecture in `MODELS`; every other key, and what the data decides
    (`num_classes`, `in_channels`), is passed to its builder; `weight_init` (a mapping of
    `init_weights` arguments, or null) re-initialises the built network. The quantizer keys of earlier
    releases (`quantizer`, `quantizer_args`, `weight_scale`, `weight_gradient`) are read as
    `input_quantizer` and `weight_quantizer`, with a note.

    Args:
        cfg: the `model` group of a composed config, or a dict of the same keys.
        **data_options: `num_classes` and `in_channels`, which the data decides.

    Returns:
        The network, an `nn.Module` in training mode, its binary layers fully binary.

    Raises:
        ValueError: an unknown name or value (`UnknownChoice`), or an option the architecture
            does not take.
    """
    options: dict[str, Any] = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
    options = quantizer_options(options)
    options.update(data_options)
    name = options.pop("name")
    weight_init = options.pop("weight_init", None)
    try:
        model = MODELS.get(name)(**options)
        if weight_init:  # after building, as the papers' code does: it covers every layer
            init_weights(model, **weight_init)
    except TypeError as err:  # an option the architecture (or the init) does not take
        raise ValueError(f"model '{name}' does not accept these options: {err}") from None
    return model


def model_from_checkpoint(state: dict[str, Any], source: str = "checkpoint") -> nn.Module:
    """Rebuild the model a bnntrain checkpoint was trained as: architecture from its saved
    config, class and input-channel counts as recorded, precision from its stage.

    Args:
        state: the checkpoint, as `load_checkpoint` reads it.
        source: where it was read from, for the errors.

    Returns:
        The network with the checkpoint's weights, its binary layers at the precision they
            were saved at, in training mode (call `.eval()` to evaluate it).

    Raises:
        CheckpointError: its saved config does not build, or its weights do not fit the model.
    """
    from ..engine import layout
    from ..engine.checkpoint import load_model_weights
    from ..nn import set_precision

    try:
        model = build_model(layout.model_config(state), num_classes=state["num_classes"],
                            in_channels=state["in_channels"])
    except ValueError as err:  # a saved config this version cannot build
        raise CheckpointError(f"{source}: its model config does not build: {err}") from None
    load_model_weights(model, state["model"], source)
    precision = layout.precision(state)
    set_precision(model, precision["activations"], precision["weights"])
    return model
