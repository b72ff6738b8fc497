"""Reading checkpoint files safely and loading them strictly.

Every backbone loads its weights through ``read_checkpoint`` (``torch.load`` with
``weights_only=True``, or safetensors) and ``load_strict``, which refuses a partial load:
a MedSAM file that silently loads half its keys gives a plausible but untrained encoder,
the most reported failure of SAM-family fine-tuning code.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Union

import torch
import torch.nn as nn

from .base import CheckpointError

__all__ = ["Checkpoint", "read_checkpoint", "unwrap_state_dict", "strip_prefix", "load_strict"]

# A path to a .pth/.pt/.bin/.safetensors file, or an already loaded state dict.
Checkpoint = Union[str, os.PathLike, Mapping]

# Training scripts wrap the weights with optimiser state and counters under these keys.
_WRAPPER_KEYS = ("state_dict", "model", "model_state_dict")
_MAX_LISTED = 25


def read_checkpoint(checkpoint: Checkpoint) -> dict[str, Any]:
    """Read a checkpoint without executing code from it.

    Arguments:
        checkpoint: a path (``.safetensors`` is read with safetensors, anything else with
            ``torch.load(map_location="cpu", weights_only=True)``) or a mapping, returned
            as a dict unchanged.

    Raises FileNotFoundError if the path does not exist and CheckpointError (a ValueError)
    if the file is not a checkpoint or is a pickle that would need to run code or import
    classes to load.
    """
    if isinstance(checkpoint, Mapping):
        return dict(checkpoint)
    path = Path(checkpoint).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except Exception as error:  # safetensors raises its own SafetensorError
            raise CheckpointError(f"{path} is not a readable safetensors file: {error}") from error
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        if "weights only load failed" in str(error).lower():
            raise CheckpointError(
                f"refused to load {path}: it is a pickle that would run code or import "
                f"classes beyond tensors and plain containers, which is unsafe for a file of "
                f"unknown origin. Re-save it as a plain state dict (torch.save(model.state_dict()) "
                f"or safetensors) from a trusted environment. torch said: {reason}"
            ) from error
        raise CheckpointError(f"{path} is not a PyTorch checkpoint ({reason})") from error
    except Exception as error:  # the unpickler fails in many ways on arbitrary bytes
        raise CheckpointError(
            f"{path} is not a PyTorch checkpoint ({type(error).__name__}: {error})"
        ) from error
    if not isinstance(obj, Mapping):
        raise CheckpointError(
            f"{path} holds a {type(obj).__name__}, not a state dict (a mapping of names to tensors)"
        )
    return dict(obj)


def unwrap_state_dict(obj: Mapping[str, Any]) -> dict[str, Any]:
    """Remove training wrappers: {"model": ...}, {"state_dict": ...} and a DDP "module." prefix."""
    state: Mapping[str, Any] = obj
    unwrapped = True
    while unwrapped:
        unwrapped = False
        for key in _WRAPPER_KEYS:
            if isinstance(state.get(key), Mapping):
                state = state[key]
                unwrapped = True
                break
    state = dict(state)
    # DistributedDataParallel prefixes every key; only strip when all keys carry it so a
    # model that really has a submodule called "module" is left alone.
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state


def strip_prefix(state: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    """The entries whose key starts with ``prefix``, with the prefix removed."""
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def _shape(value: Any) -> str:
    if torch.is_tensor(value):
        return str(tuple(value.shape))
    return f"<{type(value).__name__}, not a tensor>"


def _listing(title: str, lines: list[str]) -> str:
    shown = lines[:_MAX_LISTED]
    more = f"\n    ... and {len(lines) - len(shown)} more" if len(lines) > len(shown) else ""
    return f"\n  {title} ({len(lines)}):\n    " + "\n    ".join(shown) + more


def load_strict(module: nn.Module, state: Mapping[str, Any], source: str) -> None:
    """Load ``state`` into ``module``, or raise CheckpointError listing every difference.

    Arguments:
        module: the module to load into.
        state: a state dict already in the module's naming.
        source: how to name the checkpoint in error messages (usually its path).
    """
    expected = module.state_dict()
    state = dict(state)
    # BatchNorm's step counter is absent from older files (e.g. torchvision's original
    # ResNet weights) and carries no learned information; torch itself fills it in.
    for key, value in expected.items():
        if key.endswith("num_batches_tracked") and key not in state:
            state[key] = value.clone()
    missing = [f"{k} {_shape(v)}" for k, v in expected.items() if k not in state]
    unexpected = [f"{k} {_shape(v)}" for k, v in state.items() if k not in expected]
    mismatched = [
        f"{k}: checkpoint {_shape(v)}, model {_shape(expected[k])}"
        for k, v in state.items()
        if k in expected and (not torch.is_tensor(v) or v.shape != expected[k].shape)
    ]
    if missing or unexpected or mismatched:
        message = f"{source} does not match {type(module).__name__}:"
        if missing:
            message += _listing("missing keys", missing)
        if unexpected:
            message += _listing("unexpected keys", unexpected)
        if mismatched:
            message += _listing("mis-shaped keys", mismatched)
        raise CheckpointError(message)
    module.load_state_dict(state, strict=True)


def describe(checkpoint: Checkpoint) -> str:
    """A short name for a checkpoint in messages."""
    return "the given state dict" if isinstance(checkpoint, Mapping) else str(checkpoint)
