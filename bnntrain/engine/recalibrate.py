"""Re-estimating BatchNorm's running statistics for the weights as they are now.

In a network with binary weights, an epoch can end just after many signs flipped: the
running statistics, averaged over the epoch with momentum, describe activations that no
longer exist, and evaluation with them can fall far below what the weights can do.
Forward passes over a few training batches in training mode (no gradients, a cumulative
average: momentum None) give each BN the statistics of the current weights.

The batches are the stage's training batches, with its per-image transforms and without
batch mixing. The training RNG stream is left as it was (the loader draws its workers'
seeds from it), so that a run with recalibration resumes exactly; under torchrun each rank
averages over its own share and the ranks then average their statistics.
"""
from __future__ import annotations

import contextlib
import random
import time
from typing import Any, Callable, Iterable

import numpy as np
import torch
from torch import nn

from . import distributed

BATCHNORMS = nn.modules.batchnorm._BatchNorm


@contextlib.contextmanager
def rng_untouched():
    """Whatever runs inside leaves Python's, NumPy's and torch's generators as it found them."""
    state = random.getstate(), np.random.get_state(), torch.get_rng_state()
    try:
        yield
    finally:
        random.setstate(state[0])
        np.random.set_state(state[1])
        torch.set_rng_state(state[2])


def _plain(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    return model(images)


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, batches: Iterable, count: int,
                          forward: Callable[[nn.Module, torch.Tensor], Any] = _plain) -> float:
    """Re-estimate every BN's running mean and variance from `count` batches; return the seconds
    it took. `model` is the module itself, not a DDP wrapper (which would broadcast rank 0's
    statistics at every forward pass); `forward(model, images)` runs it as the loop does
    (`Trainer.forward`: the device, memory format and autocast of the run).

    Args:
        model: the module itself, not a DDP wrapper.
        batches: (images, targets) training batches, without batch mixing.
        count: how many of them to use.
        forward: runs the model on a batch of images.

    Returns:
        The seconds it took; 0 where the model has no BN that tracks statistics or `count` is 0.
    """
    norms = [m for m in model.modules() if isinstance(m, BATCHNORMS) and m.track_running_stats]
    if not norms or count <= 0:
        return 0.0
    start = time.time()
    saved = [(bn.momentum, bn.num_batches_tracked.clone()) for bn in norms]
    for bn in norms:
        bn.reset_running_stats()
        bn.momentum = None  # a cumulative average over the batches below
    was_training = model.training
    model.train()
    with rng_untouched():
        for i, (images, _) in enumerate(batches):
            if i == count:
                break
            forward(model, images)
    model.train(was_training)
    for bn, (momentum, tracked) in zip(norms, saved):
        bn.momentum = momentum
        bn.num_batches_tracked.copy_(tracked)  # the count training goes on from
    _average_over_ranks(norms)
    return time.time() - start


def _average_over_ranks(norms: list[nn.Module]) -> None:
    """Each rank averaged the batch statistics of its own batches; the ranks' averages are
    averaged, which is what one process averaging all of them gets (BN's running variance
    with momentum None is the mean of the batches' variances)."""
    world = distributed.world_size()
    if world == 1:
        return
    for bn in norms:
        stats = distributed.all_reduce_sum(torch.stack([bn.running_mean, bn.running_var])) / world
        bn.running_mean.copy_(stats[0])
        bn.running_var.copy_(stats[1])
