"""Optimizers and learning-rate schedules from the `optimizer` and `schedule` config groups.

The schedules are built from `torch.optim.lr_scheduler`; each steps once per epoch, but those
of step_schedules.py after every optimizer step.
"""
from __future__ import annotations

import inspect
import math
from typing import Any, Callable, Iterable

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.optim import Optimizer, lr_scheduler

from .bop import Bop
from .case_optimizer import CaseOptimizer
from .nn import binary_layers
from .registry import Registry, choose
from .step_schedules import cosine_per_step

OPTIMIZERS: Registry[Callable[..., Optimizer]] = Registry("optimizer.name")
"""The optimizers by name (`optimizer.name`): torch's Adam, AdamW and SGD, Bop and case."""
OPTIMIZERS.register("adam")(torch.optim.Adam)      # trick 7: Adam with default betas
OPTIMIZERS.register("adamw")(torch.optim.AdamW)
OPTIMIZERS.register("sgd")(torch.optim.SGD)
OPTIMIZERS.register("bop")(Bop)                    # binary weights by Bop, the rest by Adam (bop.py)
OPTIMIZERS.register("case")(CaseOptimizer)         # binary weights by one optimizer, the rest by another


def build_optimizer(cfg: DictConfig, model: nn.Module, extra: Iterable[nn.Parameter] = ()) -> Optimizer:
    """The optimizer over `model`'s parameters (and `extra` ones, such as centre-loss centres,
    which never take weight decay). `cfg` is an `optimizer` preset (configs/optimizer/): the
    keys of its _base.yaml are ours, every other key is an argument of the optimizer.

    Args:
        cfg: the `optimizer` group of a stage config.
        model: the model whose parameters it trains.
        extra: more parameters to train, without weight decay.

    Returns:
        The optimizer, with the gradient centralization and the latent-weight clipping the
            config asks for hooked to its steps.

    Raises:
        ValueError: an unknown name (`UnknownChoice`), or an option the optimizer does not take
            or a value it refuses.
    """
    options: dict[str, Any] = OmegaConf.to_container(cfg, resolve=True)
    name = options.pop("name")
    decay_on = options.pop("weight_decay_on")
    rest = options.pop("weight_decay_rest", 0.0)  # absent from configs saved before it existed
    centralize = options.pop("gradient_centralization")
    clip = options.pop("weight_clip")
    if "betas" in options:
        options["betas"] = tuple(options["betas"])
    groups = param_groups(model, options["weight_decay"], decay_on, rest)
    extra = list(extra)
    if extra:
        groups.append({"params": extra, "weight_decay": 0.0})
    factory = OPTIMIZERS.get(name)
    if getattr(factory, "takes_model", False):  # Bop: it must know which weights are binary
        options["model"] = model
    try:
        optimizer = factory(groups, **options)
    except (TypeError, ValueError) as err:  # an option it does not take, a value it refuses
        raise ValueError(f"optimizer={name}: {err}") from None
    if centralize:
        weights = [m.weight for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
        optimizer.register_step_pre_hook(lambda opt, args, kwargs: centralize_gradients(weights))
    if clip:
        latent = [layer.weight for _, layer in binary_layers(model) if layer.binarize]
        optimizer.register_step_post_hook(lambda opt, args, kwargs: clip_weights(latent, clip))
    return optimizer


@torch.no_grad()
def clip_weights(weights: Iterable[nn.Parameter], bound: float) -> None:
    """Latent-weight clipping (BinaryConnect; larq's `weight_clip`): after each step, every
    binary layer's latent weights back into [-bound, bound].

    Args:
        weights: the latent weights.
        bound: the largest magnitude they keep.
    """
    for w in weights:
        w.clamp_(-bound, bound)


# Which parameters take weight decay (`optimizer.weight_decay_on`).
DECAYED: dict[str, Callable[[nn.Module], set[int]]] = {
    # Every parameter, as Adam(model.parameters(), weight_decay=...) does (the collection's code).
    "all": lambda model: {id(p) for p in model.parameters()},
    # Conv and linear weights; BN, PReLU, biases and learnable thresholds/shifts are exempt.
    "weights": lambda model: {id(m.weight) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))},
    # Every 4-D tensor: conv weights and the per-channel thresholds and shifts, not BN, PReLU or the
    # classifier (ReActNet's code: `p.ndimension() == 4`).
    "4d": lambda model: {id(p) for p in model.parameters() if p.dim() == 4},
    # Every conv's and linear layer's parameters, their quantizers' (ReCU's alpha) and biases
    # included, but not the shortcuts' convs, nor BN (ReCU's ImageNet code: the parameters whose
    # names hold `conv` or `fc`, which its downsample convs' do not).
    "convs_and_classifier": lambda model: {
        id(p) for name, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))
        and "shortcut" not in name.split(".") for p in m.parameters()},
}


def param_groups(model: nn.Module, weight_decay: float, decay_on: str, rest: float = 0.0) -> list[dict]:
    """One group where every parameter takes weight decay, else the group `decay_on` picks and
    the rest.

    Args:
        model: the model whose trainable parameters are grouped.
        weight_decay: the picked group's weight decay.
        decay_on: `optimizer.weight_decay_on`: `all`, `weights` (conv and linear weights), `4d`
            (every 4-D tensor) or `convs_and_classifier` (ReCU's rule, above).
        rest: the other group's weight decay (`optimizer.weight_decay_rest`): 0 exempts it;
            BNext's code gives its 4-D tensors 1e-8 and the rest 1e-3.

    Returns:
        The optimizer's parameter groups.

    Raises:
        ValueError: an unknown `decay_on` (`UnknownChoice`).
    """
    params = [p for p in model.parameters() if p.requires_grad]
    choose("optimizer.weight_decay_on", decay_on, DECAYED)
    if decay_on == "all":
        return [{"params": params}]
    decayed = DECAYED[decay_on](model)
    return [{"params": [p for p in params if id(p) in decayed], "weight_decay": weight_decay},
            {"params": [p for p in params if id(p) not in decayed], "weight_decay": rest}]


def centralize_gradients(weights: Iterable[nn.Parameter]) -> None:
    """Gradient centralization (trick 17, Yong et al. 2020): before each step, subtract
    from every conv and linear weight's gradient its mean over all dimensions but the first.

    Args:
        weights: the conv and linear weights; those without a gradient are skipped.
    """
    for w in weights:
        if w.grad is not None and w.grad.dim() > 1:
            w.grad.sub_(w.grad.mean(dim=tuple(range(1, w.grad.dim())), keepdim=True))


SCHEDULES: Registry[Callable[..., lr_scheduler.LRScheduler]] = Registry("schedule.name")
"""The learning-rate schedules by name (`schedule.name`), each built from the optimizer and the
`schedule` config's other keys."""
SCHEDULES.register("cosine_per_step")(cosine_per_step)  # larq-zoo's, per optimizer step (step_schedules.py)


@SCHEDULES.register("multistep")
def multistep(optimizer: Optimizer, epochs: int, milestones: list[int], gamma: float,
              warmup_epochs: int = 0, warmup_lr: float | None = None) -> lr_scheduler.LRScheduler:
    """Step decay (trick 8), optionally after a constant warm-up at `warmup_lr`.

    The warm-up is ConstantLR chained with the step decay: for the first `warmup_epochs`
    epochs the lr is warmup_lr, then optimizer.lr, then decayed by gamma at each milestone.

    Args:
        optimizer: the optimizer whose lr it sets.
        epochs: the stage's epochs (not read: the milestones say when).
        milestones: the epochs at which the lr is multiplied by `gamma`.
        gamma: the factor.
        warmup_epochs: epochs of warm-up; 0 for none.
        warmup_lr: the lr during the warm-up (needed with `warmup_epochs`).

    Returns:
        The scheduler.
    """
    decay = lr_scheduler.MultiStepLR(optimizer, milestones=list(milestones), gamma=gamma)
    if not warmup_epochs:
        return decay
    base_lr = optimizer.param_groups[0]["lr"]
    warmup = lr_scheduler.ConstantLR(optimizer, factor=warmup_lr / base_lr, total_iters=warmup_epochs)
    return lr_scheduler.ChainedScheduler([warmup, decay], optimizer=optimizer)


@SCHEDULES.register("linear")
def linear(optimizer: Optimizer, epochs: int) -> lr_scheduler.LRScheduler:
    """Linear decay to zero as Bi-Real Net's and ReActNet's code does it: their LambdaLR
    steps before each epoch, so epoch e (from 0) trains at lr x (1 - (e + 1) / epochs).

    Args:
        optimizer: the optimizer whose lr it sets.
        epochs: the stage's epochs.

    Returns:
        The scheduler.
    """
    return lr_scheduler.LambdaLR(optimizer, lambda epoch: 1 - (epoch + 1) / epochs)


@SCHEDULES.register("cosine")
def cosine(optimizer: Optimizer, epochs: int, min_lr: float = 0.0,
           warmup_epochs: int = 0) -> lr_scheduler.LRScheduler:
    """Cosine annealing from optimizer.lr down to `min_lr` over the stage, optionally after a
    linear warm-up.

    The warm-up is ReCU's code's (z-hXu/ReCU, `main.py`): epoch e < W trains at lr (e + 1) / W,
    and its cosine, whose first step comes after epoch W - 1, runs over the epochs - (W - 1)
    epochs from there: epoch e >= W trains at the cosine's step e - (W - 1).

    Args:
        optimizer: the optimizer whose lr it sets.
        epochs: the stage's epochs.
        min_lr: the cosine's lower end (ReCU's: 0).
        warmup_epochs: W, the epochs of linear warm-up; 0 for none.

    Returns:
        The scheduler.
    """
    if not warmup_epochs:
        return lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs, eta_min=min_lr)
    period = epochs - (warmup_epochs - 1)
    bottom = min_lr / optimizer.param_groups[0]["lr"]

    def factor(epoch: int) -> float:
        if epoch < warmup_epochs:
            return (epoch + 1) / warmup_epochs
        return bottom + (1 - bottom) * (1 + math.cos(math.pi * (epoch - warmup_epochs + 1) / period)) / 2
    return lr_scheduler.LambdaLR(optimizer, factor)


class TimmCosine(lr_scheduler.LRScheduler):
    """timm's `CosineLRScheduler` stepped per epoch with `warmup_prefix=True` (one cycle, no
    noise, k-decay 1), which BNext's code uses: epoch e < W trains at
    warmup_lr + e (lr - warmup_lr) / W, epoch e >= W at
    min_lr + (lr - min_lr) (1 + cos(pi (e - W) / period)) / 2, and past one period at min_lr.

    Args:
        optimizer: the optimizer whose lr it sets.
        period: timm's `t_initial`, the cosine's length in epochs (BNext's: all the epochs, so
            the warm-up pushes its end past the stage and the lr never reaches min_lr).
        min_lr: timm's `lr_min`.
        warmup_epochs: timm's `warmup_t`, W.
        warmup_lr: timm's `warmup_lr_init`.
    """

    def __init__(self, optimizer: Optimizer, period: int, min_lr: float, warmup_epochs: int,
                 warmup_lr: float) -> None:
        self.period, self.min_lr, self.warmup_epochs, self.warmup_lr = period, min_lr, warmup_epochs, warmup_lr
        super().__init__(optimizer)

    def lr_at(self, base: float, epoch: int) -> float:
        """The lr of `epoch` for base lr `base`, in timm's arithmetic.

        Args:
            base: the optimizer's lr.
            epoch: the epoch, counted from 0.

        Returns:
            The lr that epoch trains at.
        """
        if epoch < self.warmup_epochs:
            return self.warmup_lr + epoch * ((base - self.warmup_lr) / self.warmup_epochs)
        t = epoch - self.warmup_epochs
        if t >= self.period:  # timm's cycle_limit of 1
            return self.min_lr
        return self.min_lr + 0.5 * (base - self.min_lr) * (1 + math.cos(math.pi * t / self.period))

    def get_lr(self) -> list[float]:
        return [self.lr_at(base, self.last_epoch) for base in self.base_lrs]


@SCHEDULES.register("timm_cosine")
def timm_cosine(optimizer: Optimizer, epochs: int, min_lr: float = 0.0, warmup_epochs: int = 0,
                warmup_lr: float | None = None, period: int | None = None) -> lr_scheduler.LRScheduler:
    """timm's cosine with a warm-up before it (`TimmCosine`).

    Args:
        optimizer: the optimizer whose lr it sets.
        epochs: the stage's epochs.
        min_lr: the cosine's lower end.
        warmup_epochs: epochs of linear warm-up from `warmup_lr`; 0 for none.
        warmup_lr: where the warm-up starts (needed with `warmup_epochs`).
        period: the cosine's length in epochs; None: `epochs`, as BNext's code sets it.

    Returns:
        The scheduler.
    """
    return TimmCosine(optimizer, period or epochs, min_lr, warmup_epochs, warmup_lr or 0.0)


def build_scheduler(cfg: DictConfig, optimizer: Optimizer, steps_per_epoch: int = 1) -> lr_scheduler.LRScheduler:
    """The learning-rate schedule a `schedule` config describes.

    Args:
        cfg: the `schedule` group: `name` picks the schedule in `SCHEDULES`, the other keys
            are its arguments.
        optimizer: the optimizer whose lr it sets.
        steps_per_epoch: the optimizer steps of an epoch, for a schedule by steps.

    Returns:
        The scheduler, stepped once per epoch, or after each optimizer step if `per_step`.

    Raises:
        ValueError: an unknown name (`UnknownChoice`).
    """
    options: dict[str, Any] = OmegaConf.to_container(cfg, resolve=True)
    factory = SCHEDULES.get(options.pop("name"))
    if "steps_per_epoch" in inspect.signature(factory).parameters:
        options["steps_per_epoch"] = steps_per_epoch
    return factory(optimizer, **options)
