"""Adapter-only checkpoints: the trainable weights as safetensors plus a JSON config.

``save_adapters(model, dir)`` writes ``adapter_model.safetensors`` and ``adapter_config.json``
(method, options, targets, and a fingerprint of the frozen base weights). ``load_adapters``
re-creates the adapters on a freshly built base model, checks the fingerprint and loads
strictly, listing whatever differs.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from medadapt.injection import inject, injection_record
from medadapt.io import atomic_path, atomic_write_text

WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"
FORMAT = "medadapt-adapters"


def _tensor_digest(t: torch.Tensor) -> str:
    data = t.detach().to("cpu").contiguous().reshape(-1)
    h = hashlib.sha256(str((tuple(data.shape), str(data.dtype))).encode())
    h.update(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    return h.hexdigest()[:16]


def canonical_name(model: nn.Module):
    """A function mapping a parameter name to its name without gradient-checkpointing wrappers,
    so files do not depend on whether checkpointing was on when they were written."""
    from medadapt.memory import CheckpointedBlock

    wrappers = [name + "." for name, m in model.named_modules() if isinstance(m, CheckpointedBlock)]

    def rename(name: str) -> str:
        for prefix in wrappers:
            if name.startswith(prefix + "block."):
                return prefix + name[len(prefix) + len("block."):]
        return name

    return rename


def named_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    rename = canonical_name(model)
    return {rename(n): p for n, p in model.named_parameters()}


def _state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    rename = canonical_name(model)
    return {rename(n): t for n, t in model.state_dict().items()}


def base_fingerprint(model: nn.Module) -> dict[str, str]:
    """A digest of every frozen parameter and buffer: what the adapters were trained on."""
    trainable = {name for name, p in named_parameters(model).items() if p.requires_grad}
    return {name: _tensor_digest(t) for name, t in _state_dict(model).items() if name not in trainable}


def _saved_tensors(model: nn.Module, record: dict) -> dict[str, torch.Tensor]:
    if record["method"] == "full":
        # Full fine-tuning changes everything, BatchNorm statistics included.
        return {k: v.detach().cpu().contiguous() for k, v in _state_dict(model).items()}
    return {n: p.detach().cpu().contiguous() for n, p in named_parameters(model).items() if p.requires_grad}


STORAGE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def save_adapters(model: nn.Module, path: str | Path, dtype: str | torch.dtype | None = None) -> Path:
    """Write the trainable weights and the adapter config into the folder ``path``.

    ``dtype`` ("float16", "bfloat16", "float32" or a torch dtype) stores floating-point
    weights in that precision; :func:`load_adapters` casts them back to the model's. float16
    halves the file (DKA's 51x51 kernels are most of it) and changes outputs by about 1e-4
    relative; None keeps the weights as they are.
    """
    record = injection_record(model)
    if record is None:
        raise ValueError("save_adapters needs a model prepared with medadapt.inject")
    if record.get("merged"):
        raise ValueError("this model's adapters were merged into the backbone; save the full model instead")
    storage = _storage_dtype(dtype)
    folder = Path(path)
    tensors = _saved_tensors(model, record)
    if storage is not None:
        tensors = {k: v.to(storage) if v.is_floating_point() else v for k, v in tensors.items()}
    config = {
        "format": FORMAT,
        "version": 1,
        "method": record["method"],
        "options": record["options"],
        "family": record["family"],
        "encoder": record["encoder"],
        "targets": record["targets"],
        "stage": record.get("stage", 1),
        "storage_dtype": None if storage is None else str(storage).removeprefix("torch."),
        "tensors": {k: list(v.shape) for k, v in tensors.items()},
        "base_fingerprint": {} if record["method"] == "full" else base_fingerprint(model),
    }
    with atomic_path(folder / WEIGHTS_NAME) as tmp:
        save_file(tensors, str(tmp), metadata={"format": FORMAT, "method": record["method"]})
    atomic_write_text(folder / CONFIG_NAME, json.dumps(config, indent=1))
    return folder


def _storage_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype) and dtype in STORAGE_DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype.removeprefix("torch.") in STORAGE_DTYPES:
        return STORAGE_DTYPES[dtype.removeprefix("torch.")]
    raise ValueError(f"save_adapters: dtype must be one of {sorted(STORAGE_DTYPES)} or None, got {dtype!r}")


def read_adapter_config(path: str | Path) -> dict:
    folder = Path(path)
    config_file = folder / CONFIG_NAME
    if not config_file.is_file():
        raise FileNotFoundError(f"no {CONFIG_NAME} in {folder}: not a medadapt adapter folder")
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{config_file} is not valid JSON: {error}") from None
    if config.get("format") != FORMAT:
        raise ValueError(f"{config_file} is not a medadapt adapter config (format={config.get('format')!r})")
    return config


def _describe(names, limit=10) -> str:
    names = sorted(names)
    more = f" ... and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def load_adapters(model: nn.Module, path: str | Path, check_base: bool = True) -> nn.Module:
    """Re-create the saved adapters on ``model`` (a fresh base model) and load them strictly.

    Arguments:
      model: the same architecture the adapters were trained on, with its pretrained weights.
      path: a folder written by :func:`save_adapters`.
      check_base: compare the base weights' fingerprint and refuse a different base model.
    """
    config = read_adapter_config(path)
    record = injection_record(model)
    if record is None:
        inject(model, config["method"], **config["options"])
        if config.get("stage", 1) == 2:
            from medadapt.injection import set_stage

            set_stage(model, 2)
    elif record["method"] != config["method"] or record["options"] != config["options"]:
        raise ValueError(
            f"model already has {record['method']!r} adapters with other options than {path} "
            f"({config['method']!r}); load onto a fresh base model"
        )
    record = injection_record(model)
    if record["targets"] != config["targets"]:
        raise ValueError(f"adapters in {path} target {len(config['targets'])} modules, this model "
                         f"offers {len(record['targets'])}: different architecture")
    if check_base and config["base_fingerprint"]:
        current = base_fingerprint(model)
        saved = config["base_fingerprint"]
        missing = set(saved) - set(current)
        extra = set(current) - set(saved)
        changed = {k for k in set(saved) & set(current) if saved[k] != current[k]}
        if missing or extra or changed:
            parts = []
            if changed:
                parts.append(f"{len(changed)} weights differ ({_describe(changed)})")
            if missing:
                parts.append(f"missing in this model: {_describe(missing)}")
            if extra:
                parts.append(f"not in the trained base: {_describe(extra)}")
            raise ValueError(f"the base model differs from the one the adapters in {path} were trained on: "
                             + "; ".join(parts) + ". Pass check_base=False to load anyway.")

    weights_file = Path(path) / WEIGHTS_NAME
    if not weights_file.is_file():
        raise FileNotFoundError(f"{weights_file} is missing")
    try:
        tensors = load_file(str(weights_file))
    except Exception as error:  # safetensors raises its own error types for corrupt files
        raise ValueError(f"{weights_file} is not a readable safetensors file: {error}") from None
    expected = _saved_tensors(model, record)
    missing = set(expected) - set(tensors)
    unexpected = set(tensors) - set(expected)
    shapes = {k for k in set(expected) & set(tensors) if tuple(expected[k].shape) != tuple(tensors[k].shape)}
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing: {_describe(missing)}")
        if unexpected:
            parts.append(f"unexpected: {_describe(unexpected)}")
        if shapes:
            parts.append("shape mismatch: " + _describe(
                f"{k} {tuple(tensors[k].shape)} vs {tuple(expected[k].shape)}" for k in shapes))
        raise ValueError(f"{weights_file} does not fit this model: " + "; ".join(parts))
    if config["method"] == "full":
        state = _state_dict(model)
        with torch.no_grad():
            for name, value in tensors.items():
                state[name].copy_(value)
    else:
        params = named_parameters(model)
        with torch.no_grad():
            for name, value in tensors.items():
                params[name].copy_(value)
    return model
