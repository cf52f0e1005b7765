"""Checkpoints: plain dicts of tensors and containers, written atomically, read with weights_only.

What a stage checkpoint holds is defined in `layout.py`. Each file also holds `checksum`
("sha256:<hex>" of all the other entries, see `bnntrain.files.checksum`), which loading
checks and removes: a file whose contents do not match it is refused as damaged. A file
from before checksums loads with a note.
"""
from __future__ import annotations

import pickle
import re
import sys
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import CheckpointError
from ..files import CHECKSUM_KEY, checksum, save_tensors
from .layout import REQUIRED_KEYS
# What torch's weights_only unpickler says of a pickle that imports or calls something
# (code), and the name it gives; its other refusals are of malformed pickles.
CODE_IN_PICKLE = re.compile(r"GLOBAL (\S+)|call reduce|create new object|Can only build")
_noted: set[Path] = set()  # files without a checksum already noted in this process


def save_checkpoint(state: dict[str, Any], path: Path) -> None:
    """Written whole or not at all (see `atomic_write`), with its checksum.

    Args:
        state: the checkpoint: a dict of tensors and plain containers (see `layout`).
        path: where to write it; its folder is made where missing.

    Raises:
        UserError: the file cannot be written (no space left, no permission).
    """
    save_tensors(state, path)


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()[0] if str(err).strip() else ""
    # torch's own errors say what failed; a KeyError's "133" alone would not.
    return text if isinstance(err, (RuntimeError, OSError)) and text else f"{type(err).__name__}: {text}".rstrip(": ")


def _refused_pickle(err: pickle.UnpicklingError, path: Path, what: str) -> CheckpointError:
    code = CODE_IN_PICKLE.search(str(err))
    if code is None:
        return CheckpointError(f"{path} is not a readable {what} (not a PyTorch file, or a damaged one)")
    name = code.group(1)
    if name and name.startswith("torch."):  # torch's own rebuild functions, one character off
        return CheckpointError(f"{path} is not a readable {what} (damaged: it names {name}, which torch lacks)")
    # torch's message invites the unsafe way round (weights_only=False); this does not.
    named = f": it names {name}, which loading would call" if name else ""
    return CheckpointError(f"{path} holds more than tensors and plain values (Python code{named}), so it was "
                           f"not loaded; bnntrain writes no such file: it comes from elsewhere, or is damaged")


def _verified(obj: Any, path: Path, expect_checksum: bool) -> Any:
    """`obj` without its checksum entry, once that matches; a note where one is expected and absent."""
    if isinstance(obj, dict) and CHECKSUM_KEY in obj:
        saved = obj.pop(CHECKSUM_KEY)
        if saved != checksum(obj):
            raise CheckpointError(f"{path} is damaged: its contents do not match the checksum saved with it")
    elif expect_checksum and path.resolve() not in _noted:
        _noted.add(path.resolve())
        print(f"note: {path} has no checksum (saved by an earlier bnntrain), so damage to it cannot be detected",
              file=sys.stderr)
    return obj


def load_tensors(path: str | Path, what: str = "checkpoint", expect_checksum: bool = False) -> Any:
    """torch.load with weights_only (no code runs), its checksum checked where it has one, as one
    clear error for a missing, unreadable or damaged file. `expect_checksum`: bnntrain wrote it,
    so a missing checksum is noted."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointError(f"{what} {path} does not exist")
    try:
        with warnings.catch_warnings():  # a damaged pickle's odd protocol number: the error, or the checksum, says it
            warnings.simplefilter("ignore", UserWarning)
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise _refused_pickle(err, path, what) from None
    except (zipfile.BadZipFile, RuntimeError, EOFError, ValueError, OSError, KeyError, IndexError,
            TypeError, AttributeError, UnicodeDecodeError, OverflowError) as err:
        # A damaged file can trip torch's reader anywhere; each is one line naming the file.
        raise CheckpointError(f"{path} is not a readable {what} ({_first_line(err)})") from None
    return _verified(obj, path, expect_checksum)


def _check_entries(state: dict[str, Any], path: Path) -> None:
    """The entries that rebuilding a model reads, of the types it reads them as."""
    model = state["model"]
    if not isinstance(model, dict):
        raise CheckpointError(f"{path} is not a bnntrain checkpoint: its model entry is a {type(model).__name__}, "
                              f"not a state dict (names -> tensors)")
    bad = next(((k, v) for k, v in model.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)), None)
    if bad is not None:
        raise CheckpointError(f"{path} is not a bnntrain checkpoint: its model entry maps {bad[0]!r} to a "
                              f"{type(bad[1]).__name__}, not a tensor")
    for key in ("num_classes", "in_channels", "epoch"):
        value = state[key]
        if not isinstance(value, int) or isinstance(value, bool) or value < (0 if key == "epoch" else 1):
            raise CheckpointError(f"{path} is not a bnntrain checkpoint: its {key} is {value!r}, "
                                  f"not a whole number >= {0 if key == 'epoch' else 1}")
    if not isinstance(state["config"], dict):
        raise CheckpointError(f"{path} is not a bnntrain checkpoint: its config is a "
                              f"{type(state['config']).__name__}, not a dict")


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a bnntrain checkpoint with `weights_only` (no code runs), its checksum checked.

    Args:
        path: the checkpoint file.

    Returns:
        The checkpoint dict, without its checksum entry, on the CPU.

    Raises:
        CheckpointError: the file is missing, unreadable, damaged, holds code, or is not a
            bnntrain checkpoint (a required entry missing or of the wrong type).
    """
    path = Path(path).expanduser()
    state = load_tensors(path, expect_checksum=True)
    if not isinstance(state, dict) or any(k not in state for k in REQUIRED_KEYS):
        raise CheckpointError(f"{path} is not a bnntrain checkpoint: expected a dict with keys "
                              f"{', '.join(REQUIRED_KEYS)}")
    _check_entries(state, path)
    return state


def _listed(label: str, keys: list[str]) -> str:
    more = f" (+{len(keys) - 3} more)" if len(keys) > 3 else ""
    return f"{label}: {', '.join(keys[:3])}{more}"


def load_model_weights(model: nn.Module, state_dict: dict[str, torch.Tensor], source: str | Path) -> None:
    """Load weights strictly, naming the keys that do not fit: only some missing is an incomplete
    file; keys the model lacks, or other shapes, are another architecture (width, depth, ...).

    Args:
        model: the module to load into.
        state_dict: the weights, names to tensors.
        source: where they come from, for the errors.

    Raises:
        CheckpointError: keys missing, unexpected keys or other shapes.
    """
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    shapes = [f"{k} {tuple(state_dict[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
              if k in state_dict and state_dict[k].shape != v.shape]
    if missing and not unexpected and not shapes:
        raise CheckpointError(f"{source} lacks {len(missing)} of the model's {len(own)} tensors (incomplete or "
                              f"damaged); {_listed('missing', missing)}")
    if missing or unexpected or shapes:
        parts = [_listed(label, keys) for label, keys in
                 (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes)) if keys]
        raise CheckpointError(f"{source} was saved from another architecture; {'; '.join(parts)}")
    model.load_state_dict(state_dict)
