"""Checkpoints: plain dicts of tensors and containers, written atomically, read with weights_only.

A checkpoint holds `model`, `num_classes` and `in_channels` (what the model was built
for), `optimizer`, `scheduler`, `objective`, `trainer` (the loop's step and gradient
scaler), `epoch` (epochs completed), `stage`, `precision`, `metrics` (of the last
evaluation), `best_top1`, `config` (the resolved stage config as plain containers) and
`init_from` (the checkpoint this stage started from, or None).
"""
from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import CheckpointError
from ..files import save_tensors

REQUIRED_KEYS = ("model", "num_classes", "in_channels", "epoch", "stage", "config")


def save_checkpoint(state: dict[str, Any], path: Path) -> None:
    """Written whole or not at all (see `atomic_write`)."""
    save_tensors(state, path)


def load_tensors(path: str | Path, what: str = "checkpoint") -> Any:
    """torch.load with weights_only (no code runs), as one clear error for a missing or unreadable file."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointError(f"{what} {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "Unsupported global" in str(err):  # code in the pickle; torch's message invites the unsafe way round
            raise CheckpointError(f"{path} holds more than tensors and plain values (Python objects, which could run "
                                  f"code when loaded), so it was not loaded") from None
        raise CheckpointError(f"{path} is not a readable {what} (not a PyTorch file)") from None
    except (zipfile.BadZipFile, RuntimeError, EOFError, ValueError, OSError) as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"{path} is not a readable {what} ({first_line})") from None


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    path = Path(path).expanduser()
    state = load_tensors(path)
    if not isinstance(state, dict) or any(k not in state for k in REQUIRED_KEYS):
        raise CheckpointError(f"{path} is not a bnntrain checkpoint: expected a dict with keys "
                              f"{', '.join(REQUIRED_KEYS)}")
    return state


def load_model_weights(model: nn.Module, state_dict: dict[str, torch.Tensor], source: str | Path) -> None:
    """Load weights strictly, naming the keys that do not fit (another architecture, width, ...)."""
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    shapes = [f"{k} {tuple(state_dict[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
              if k in state_dict and state_dict[k].shape != v.shape]
    if missing or unexpected or shapes:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes)):
            if keys:
                more = f" (+{len(keys) - 3} more)" if len(keys) > 3 else ""
                parts.append(f"{label}: {', '.join(keys[:3])}{more}")
        raise CheckpointError(f"{source} was saved from another architecture; {'; '.join(parts)}")
    model.load_state_dict(state_dict)
