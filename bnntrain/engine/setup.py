"""Where and how a stage runs: device, mixed precision, memory format, DDP, compilation."""
from __future__ import annotations

import os
from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn

from ..errors import ConfigError
from . import distributed
from .malloc import tune_glibc_malloc


def resolve_device(name: str) -> torch.device:
    """`auto`: this rank's GPU when CUDA is present, else the CPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        name = f"cuda:{os.environ.get('LOCAL_RANK', 0)}"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"trainer.device={name} but no CUDA device is available")
    return torch.device(name)


def trainer_options(cfg: DictConfig, device: torch.device) -> dict[str, Any]:
    """Resolve `auto` settings: AMP (bf16) on CUDA, off on the CPU; channels_last everywhere
    (oneDNN's convolutions are faster on it on the CPU too: 0.70-0.95x the step time of these
    networks, scripts/bench.py).
    (The values themselves are checked with the rest of the config, in checks.py.)"""
    cuda = device.type == "cuda"
    amp = cfg.amp if cfg.amp != "auto" else ("bf16" if cuda else None)
    if cfg.sync_bn and not cuda:
        raise ConfigError("trainer.sync_bn=true needs CUDA: PyTorch's SyncBatchNorm does not run on the CPU")
    channels_last = cfg.channels_last if cfg.channels_last != "auto" else True
    return {"amp": amp, "channels_last": bool(channels_last), "grad_clip": cfg.grad_clip,
            "accumulate": cfg.accumulate, "log_every": cfg.log_every}


def configure_malloc(setting: str, device: torch.device) -> bool:
    """`trainer.malloc`: `keep` (`auto` on the CPU) has glibc keep freed blocks for the next
    step rather than hand them back to the OS (engine/malloc.py); `release` leaves glibc's
    default. Process-wide, so it is set once, before the first step. True where it applies."""
    keep = setting == "keep" or (setting == "auto" and device.type == "cpu")
    return keep and tune_glibc_malloc()


def prepare_model(model: nn.Module, device: torch.device, cfg: DictConfig, channels_last: bool,
                  idle_parameters: bool = False) -> nn.Module:
    """Move the model to its device and wrap it for training; the caller keeps `model`
    itself for checkpoints, so saved keys never carry a DDP or compile prefix.
    `idle_parameters`: some of its parameters get no gradient in this stage (DDP must know)."""
    model.to(device, memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    net = distributed.wrap(model, device, sync_bn=cfg.sync_bn, idle_parameters=idle_parameters)
    return torch.compile(net) if cfg.compile else net
