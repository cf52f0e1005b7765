"""Data-parallel training with PyTorch's own engine, started by torchrun.

torchrun sets RANK, LOCAL_RANK and WORLD_SIZE; every rank runs the whole Hydra app. The
backend is NCCL on CUDA and gloo on the CPU. Only rank 0 writes logs, checkpoints and
results; the others compute. Without torchrun everything here is a no-op.
"""
from __future__ import annotations

import os
from typing import Iterable, Iterator

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Sampler

from ..nn.layers import BinaryMixin


def launched_by_torchrun() -> bool:
    """torchrun (even with one process) or any launcher that sets WORLD_SIZE above 1."""
    return "TORCHELASTIC_RUN_ID" in os.environ or int(os.environ.get("WORLD_SIZE", "1")) > 1


def init(device_kind: str) -> None:
    """Join the process group (once per process) and pick this rank's GPU.

    Under torchrun the environment says who is who. In a job of Hydra's submitit launcher
    with several tasks (SLURM, or its local executor) submitit translates its variables first.
    """
    if dist.is_initialized():
        return
    if "SUBMITIT_EXECUTOR" in os.environ and "RANK" not in os.environ:
        from submitit import JobEnvironment
        from submitit.helpers import TorchDistributedEnvironment

        if JobEnvironment().num_tasks > 1:
            # Each task keeps every GPU visible and picks its own by LOCAL_RANK (resolve_device).
            TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
    if not launched_by_torchrun():
        return
    cuda = device_kind != "cpu" and torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if cuda else "gloo")


def shutdown(wait: bool = True) -> None:
    """Leave the process group before the process exits: a group left to the interpreter's
    exit can abort the process while its communication threads still run. `wait`: after
    the other ranks get here (not when this rank stops on an error)."""
    if dist.is_initialized():
        if wait:
            dist.barrier()
        dist.destroy_process_group()


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def backend() -> str | None:
    return dist.get_backend() if dist.is_initialized() else None


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def broadcast_text(text: str) -> str:
    """Rank 0's `text` on every rank (the run folder rank 0 made, so that all write to it)."""
    value = [text]
    if dist.is_initialized():
        dist.broadcast_object_list(value, src=0)
    return value[0]


def idle_quantizer_parameters(model: nn.Module, activations: str, weights: str) -> list[nn.Parameter]:
    """The quantizers' parameters that get no gradient at a stage's precision: a weight
    quantizer's (ReCU's alpha, XNOR-Net++'s factors) while the weights are real, an input
    quantizer's (AdaBin's alpha and beta) while the activations are."""
    idle = []
    for layer in model.modules():
        if not isinstance(layer, BinaryMixin) or not layer.binarize:
            continue
        if weights != "binary":
            idle += list(layer.weight_quantizer.parameters())
        if activations != "binary":
            idle += list(layer.input_quantizer.parameters())
    return idle


def wrap(model: nn.Module, device: torch.device, sync_bn: bool, idle_parameters: bool = False) -> nn.Module:
    """DistributedDataParallel around the model (SyncBatchNorm first, if asked). With
    `idle_parameters` (some get no gradient in this stage) DDP looks for unused parameters
    after each backward pass, which it otherwise refuses at the second step."""
    if not dist.is_initialized():
        return model
    if sync_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                               find_unused_parameters=idle_parameters)


class ShardSampler(Sampler[int]):
    """Every rank evaluates a disjoint slice of the test set, with no padding, so that
    summed counts cover each sample exactly once (DistributedSampler pads with repeats)."""

    def __init__(self, length: int) -> None:
        self.indices = list(range(rank(), length, world_size()))

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def average_gradients(params: Iterable[nn.Parameter]) -> None:
    """All-reduce the gradients of parameters that live outside the DDP-wrapped model (the
    centre-loss centres), as DDP does for the model's own."""
    if not dist.is_initialized():
        return
    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
            p.grad /= world_size()


def weights_agree(model: nn.Module) -> bool:
    """True when every rank holds the same parameters and buffers (checked by checksum): DDP's
    promise, verified once per stage because a silent divergence would waste the whole run."""
    if not dist.is_initialized():
        return True
    sums = [t.detach().double().sum() for t in model.state_dict().values() if t.is_floating_point()]
    if not sums:
        return True
    local = torch.stack(sums).cpu()
    gathered = [torch.zeros_like(local) for _ in range(world_size())]
    dist.all_gather_object(gathered, local)
    return all(torch.equal(gathered[0], g) for g in gathered[1:])
