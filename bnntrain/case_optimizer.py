"""Two optimizers in one: one for the binary layers' latent weights, another for every other
parameter, as larq's `CaseOptimizer((Bop.is_binary_variable, binary_opt),
default_optimizer=rest_opt)` trains a network (larq/larq `larq/optimizers.py`); larq-zoo's
QuickNet recipe runs Adam on the binary kernels and SGD on the rest this way.

`optimizer=case` picks it (configs/optimizer/case.yaml). `optimizer.binary` and
`optimizer.rest` each name torch's Adam, AdamW or SGD (`name`) and hold its other arguments.
The rest's lr and weight decay are `optimizer.lr` and `optimizer.weight_decay` (larq's default
optimizer; `optimizer.weight_decay_on` splits its groups as for any optimizer); the binary
weights' are `optimizer.binary.lr` and `optimizer.binary.weight_decay`.

Every group of the two is in this optimizer's `param_groups` (the rest's first), so the
stage's lr schedule scales each group from its own lr: larq-zoo gives each optimizer a
schedule of the same shape to its own peak. A latent weight is the binary optimizer's
whatever the stage's precision, as larq's predicate reads the kernel quantizer, not the stage.
"""
from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import nn
from torch.optim import Optimizer

from .nn import binary_layers
from .registry import choose

PARTS = ("adam", "adamw", "sgd")
"""The optimizers `optimizer.binary.name` and `optimizer.rest.name` may name."""


def build_part(role: str, options: dict[str, Any], groups: list[dict], **given: Any) -> Optimizer:
    """One of the two optimizers.

    Args:
        role: `binary` or `rest`, as the config spells it.
        options: its config: `name` and the optimizer's arguments.
        groups: the parameter groups it trains.
        **given: arguments set elsewhere (the rest's lr and weight decay): the config must not
            state them again.

    Returns:
        The optimizer.

    Raises:
        ValueError: an unknown name (`UnknownChoice`), an argument the optimizer does not take,
            a value it refuses, or one stated twice.
    """
    from .optim import OPTIMIZERS  # optim registers this class: imported here, not at the top

    options = dict(options)
    name = choose(f"optimizer.{role}.name", options.pop("name", None), PARTS)
    if "betas" in options:
        options["betas"] = tuple(options["betas"])
    try:
        return OPTIMIZERS.get(name)(groups, **given, **options)
    except (TypeError, ValueError) as err:  # e.g. momentum for Adam, lr both here and in optimizer.lr
        raise ValueError(f"optimizer.{role} ({name}): {err}") from None


class CaseOptimizer(Optimizer):
    """The binary layers' latent weights trained by one optimizer, every other parameter by
    another; stepped, zeroed, scheduled and saved as one.

    Args:
        params: the parameter groups of every trainable parameter (`optim.param_groups`).
        model: the model, whose binary layers' weights the `binary` optimizer trains.
        lr: the rest's learning rate (`optimizer.lr`).
        weight_decay: the rest's weight decay, where a group states none.
        binary: the binary weights' optimizer: `name` and its arguments (`lr` among them).
        rest: the other parameters' optimizer: `name` and its arguments but lr and weight decay.

    Raises:
        ValueError: no binary layer in the model, or a part's config that its optimizer refuses.
    """

    takes_model = True  # build_optimizer passes the model: the binary weights are picked from it

    def __init__(self, params: Iterable[dict], model: nn.Module, lr: float = 0.1, weight_decay: float = 0.0,
                 binary: dict[str, Any] | None = None, rest: dict[str, Any] | None = None) -> None:
        weights = [layer.weight for _, layer in binary_layers(model) if layer.binarize and layer.weight.requires_grad]
        if not weights:
            raise ValueError("optimizer=case trains the binary weights apart, and this model has no binary layer")
        ids = {id(w) for w in weights}
        others = [dict(group, params=[p for p in group["params"] if id(p) not in ids]) for group in params]
        self.rest = build_part("rest", rest or {"name": "sgd"}, [g for g in others if g["params"]],
                               lr=lr, weight_decay=weight_decay)
        self.binary = build_part("binary", binary or {"name": "adam"}, [{"params": weights}])
        # One list of the parts' own group dicts: a schedule's lr reaches the part that steps.
        super().__init__(self.rest.param_groups + self.binary.param_groups, {})

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        """One step of each part.

        Args:
            closure: re-evaluates the model and returns the loss (optional).

        Returns:
            The closure's loss, or None.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.rest.step()
        self.binary.step()
        return loss

    def state_dict(self) -> dict[str, Any]:
        """Each part's state (moments, momentum buffers, step counts) and groups.

        Returns:
            {"binary": ..., "rest": ...}.
        """
        return {"binary": self.binary.state_dict(), "rest": self.rest.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Take back what `state_dict` returned.

        Args:
            state_dict: {"binary": ..., "rest": ...}.
        """
        self.binary.load_state_dict(state_dict["binary"])
        self.rest.load_state_dict(state_dict["rest"])
        # Loading gives each part new group dicts: the shared list must hold those.
        self.param_groups = self.rest.param_groups + self.binary.param_groups
