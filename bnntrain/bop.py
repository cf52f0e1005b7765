"""Bop, the latent-free optimizer for binary weights (Helwegen et al., "Latent Weights Do Not
Exist: Rethinking Binarized Neural Network Optimization", NeurIPS 2019), with Adam for every
other parameter, as larq's `CaseOptimizer(Bop, Adam)` trains a network.

The rule follows larq's `Bop._resource_apply_dense` (larq/larq `larq/optimizers.py`; the
authors' first version, plumerai/rethinking-bnn-optimization `bnn_optimization/optimizers.py`,
is the same): for each binary weight w (held at +-1) and its gradient g,

    m <- (1 - gamma) m + gamma g
    w <- sign(-sign(w m - threshold) w)        (sign(0) = +1, as larq.math.sign)

so w flips where w m > threshold: the moving average agrees in sign with w and is larger
than the threshold. A latent weight that is not +-1 yet (stage 1's real weights handed to a
fully binary stage) becomes its sign at the first step.
"""
from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from .nn import binary_layers
from .registry import choose

GAMMA_SCHEDULES = ("constant", "step", "linear")


def plus_one_sign(x: Tensor) -> Tensor:
    """+1 where x >= 0 (0 and -0 included), else -1: larq.math.sign.

    Args:
        x: any tensor.

    Returns:
        A tensor of x's shape and dtype holding +-1.
    """
    return torch.where(x >= 0, 1.0, -1.0).to(x.dtype)


class Bop(Optimizer):
    """Bop for the binary layers' weights; Adam for every other parameter.

    The binary weights form one group whose `lr` entry is gamma, Bop's adaptivity rate (so a
    learning-rate schedule would scale it too); its schedule over the stage is Bop's own
    (`set_progress`), as the papers' recipes set gamma and Adam's lr apart. The other
    groups are Adam's, with `lr` its learning rate, and the stage's lr schedule scales them.

    Args:
        params: the parameter groups of every trainable parameter (`optim.param_groups`).
        model: the model, whose binary layers' weights Bop trains.
        lr: Adam's learning rate for the other parameters.
        weight_decay: Adam's weight decay (the binary weights take none).
        betas: Adam's betas.
        threshold: Bop's threshold tau (larq's default 1e-8; the paper's CIFAR-10 runs 1e-8
            and 1e-6).
        gamma: Bop's adaptivity rate at the stage's start (larq's default 1e-4).
        gamma_schedule: `constant`; `step` (gamma x `gamma_decay` every `gamma_every`
            epochs, the paper's CIFAR-10 run: 0.1 every 100); `linear` (to `gamma_end` at the
            stage's end, the paper's ImageNet runs: 1e-4 to 1e-6, per step there, per epoch here).
        gamma_decay: the factor of the `step` schedule.
        gamma_every: the epochs between its steps.
        gamma_end: the `linear` schedule's last gamma.
        epochs: the stage's epochs (for `step`; `set_progress` gives a fraction).

    Raises:
        ValueError: no binary layer in the model, or an unknown gamma schedule.
    """

    takes_model = True  # build_optimizer passes the model: Bop must know the binary weights

    def __init__(self, params: Iterable[dict], model: nn.Module, lr: float = 1e-3, weight_decay: float = 0.0,
                 betas: tuple[float, float] = (0.9, 0.999), threshold: float = 1e-8, gamma: float = 1e-4,
                 gamma_schedule: str = "constant", gamma_decay: float = 0.1, gamma_every: int = 100,
                 gamma_end: float = 1e-6, epochs: int = 1) -> None:
        binary = [layer.weight for _, layer in binary_layers(model) if layer.binarize]
        if not binary:
            raise ValueError("optimizer=bop trains binary weights, and this model has no binary layer")
        binary_ids = {id(p) for p in binary}
        real = [dict(group, params=[p for p in group["params"] if id(p) not in binary_ids]) for group in params]
        self.adam = torch.optim.Adam([g for g in real if g["params"]], lr=lr, betas=betas, weight_decay=weight_decay)
        super().__init__([{"params": binary, "bop": True}], {"lr": gamma, "threshold": threshold})
        for group in self.adam.param_groups:  # one list: schedulers and zero_grad see every group
            self.param_groups.append(group)
        self.gamma_schedule = choose("optimizer.gamma_schedule", gamma_schedule, GAMMA_SCHEDULES)
        self.gamma0, self.gamma_decay, self.gamma_every = gamma, gamma_decay, gamma_every
        self.gamma_end, self.epochs = gamma_end, epochs

    def gamma_at(self, progress: float) -> float:
        """Gamma at `progress` (epoch / epochs) into the stage.

        Args:
            progress: the fraction of the stage's epochs done: 0 at its start.

        Returns:
            Bop's adaptivity rate for the epoch.
        """
        if self.gamma_schedule == "step":
            return self.gamma0 * self.gamma_decay ** int(round(progress * self.epochs) // self.gamma_every)
        if self.gamma_schedule == "linear":
            return self.gamma0 + (self.gamma_end - self.gamma0) * progress
        return self.gamma0

    def set_progress(self, progress: float) -> None:
        """Set gamma for the epoch that starts (the stage loop calls this at each epoch's start).

        Args:
            progress: epoch / epochs.
        """
        for group in self.param_groups:
            if group.get("bop"):
                group["lr"] = self.gamma_at(progress)

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        """One step: Adam on the real parameters, then Bop's flips on the binary weights.

        Args:
            closure: re-evaluates the model and returns the loss (optional).

        Returns:
            The closure's loss, or None.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.adam.step()
        for group in self.param_groups:
            if not group.get("bop"):
                continue
            gamma, threshold = group["lr"], group["threshold"]
            for w in group["params"]:
                if w.grad is None:
                    continue
                state = self.state[w]
                if "m" not in state:
                    state["m"] = torch.zeros_like(w)
                m = state["m"].mul_(1 - gamma).add_(w.grad, alpha=gamma)
                w.copy_(plus_one_sign(-torch.sign(w * m - threshold) * w))
        return loss

    def state_dict(self) -> dict[str, Any]:
        """Bop's moving averages and gamma, and Adam's state.

        Returns:
            {"bop": ..., "adam": ...}.
        """
        bop_groups = [g for g in self.param_groups if g.get("bop")]
        adam_groups = self.param_groups
        self.param_groups = bop_groups  # Optimizer.state_dict numbers the groups it sees
        try:
            own = super().state_dict()
        finally:
            self.param_groups = adam_groups
        return {"bop": own, "adam": self.adam.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Take back what `state_dict` returned.

        Args:
            state_dict: {"bop": ..., "adam": ...}.
        """
        everything = self.param_groups
        self.param_groups = [g for g in everything if g.get("bop")]
        try:
            super().load_state_dict(state_dict["bop"])
            bop_groups = self.param_groups
        finally:
            self.param_groups = everything
        self.adam.load_state_dict(state_dict["adam"])
        self.param_groups = bop_groups + self.adam.param_groups
