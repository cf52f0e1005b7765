"""Models registered by name; `build_model` turns the `model` config group into a module."""
from __future__ import annotations

from typing import Any, Callable

from omegaconf import DictConfig, OmegaConf
from torch import nn

from ..errors import ConfigError
from ..registry import Registry

MODELS: Registry[Callable[..., nn.Module]] = Registry("model.name")


def build_model(cfg: DictConfig | dict, **data_options: Any) -> nn.Module:
    """`cfg.name` picks the architecture; every other key, and what the data decides
    (`num_classes`, `in_channels`), is passed to its builder."""
    options: dict[str, Any] = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
    options.update(data_options)
    name = options.pop("name")
    try:
        return MODELS.get(name)(**options)
    except TypeError as err:  # an option the architecture does not take
        raise ConfigError(f"model '{name}' does not accept these options: {err}") from None


def model_from_checkpoint(state: dict[str, Any], source: str = "checkpoint") -> nn.Module:
    """Rebuild the model a bnntrain checkpoint was trained as: architecture from its saved
    config, class and input-channel counts as recorded, precision from its stage."""
    from ..engine.checkpoint import load_model_weights
    from ..nn import set_precision

    config = state["config"]
    model = build_model(config["model"], num_classes=state["num_classes"], in_channels=state["in_channels"])
    load_model_weights(model, state["model"], source)
    stage = config.get("stage", {})
    # The precision the checkpoint was saved at (stage 0 switches from leaky-clip to clamp).
    precision = state.get("precision") or {"activations": stage.get("activations", "binary"),
                                           "weights": stage.get("weights", "binary")}
    set_precision(model, precision["activations"], precision["weights"])
    return model
