"""Adapter-only checkpoints: the trainable weights as safetensors plus a JSON config.

``save_adapters(model, dir)`` writes ``medadapt_adapters.safetensors`` and
``medadapt_config.json``: the method, its options and targets, a fingerprint of the frozen
base weights and, for models built by :func:`medadapt.create_model`, the arguments that
rebuild the whole model (:func:`medadapt.load_model`). ``load_adapters`` re-creates the
adapters on a freshly built base model, checks the files and the fingerprint and loads
strictly, listing whatever differs; a refused load leaves the model as it was.

The files once used Hugging Face PEFT's names (``adapter_model.safetensors``,
``adapter_config.json``), but PEFT cannot load them (other module names, another config
format), so they now carry medadapt's own names; folders with the old names still load.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
from pathlib import Path
from typing import Iterator

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from medadapt.injection import inject, injection_record, set_stage
from medadapt.io import atomic_path, atomic_write_text, read_json
from medadapt.patterns import option_pattern_problems

WEIGHTS_NAME = "medadapt_adapters.safetensors"
CONFIG_NAME = "medadapt_config.json"
# The names folders had before; read when a folder has no file of the current names.
LEGACY_WEIGHTS_NAME = "adapter_model.safetensors"
LEGACY_CONFIG_NAME = "adapter_config.json"
FORMAT = "medadapt-adapters"
VERSION = 1
# create_model's arguments, recorded on the model it returns (plain JSON data).
BUILD_ATTR = "medadapt_build"


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


def holds_whole_encoder(method: str, options: dict, stage: int = 1) -> bool:
    """True when the method trains the encoder's own weights at ``stage`` (full fine-tuning,
    CLAdapter's stage 2): its folder then holds the whole encoder, with no frozen base to check."""
    from medadapt.adapters import make_config

    return "encoder" in make_config(method, dict(options)).stage_trains(int(stage))


def _stored_tensors(model: nn.Module, record: dict) -> dict[str, torch.Tensor]:
    """The model's own tensors that an adapter file holds, by their file names."""
    if holds_whole_encoder(record["method"], record["options"], record.get("stage", 1)):
        # The encoder trains: everything is stored, BatchNorm statistics included.
        return _state_dict(model)
    return {n: p for n, p in named_parameters(model).items() if p.requires_grad}


def _saved_tensors(model: nn.Module, record: dict) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in _stored_tensors(model, record).items()}


STORAGE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def build_record(model: nn.Module) -> dict | None:
    """The create_model arguments recorded on ``model``, or None for a model built otherwise."""
    return getattr(model, BUILD_ATTR, None) or getattr(getattr(model, "module", None), BUILD_ATTR, None)


def adapter_files(path: str | Path) -> tuple[Path, Path]:
    """The (config, weights) files of the adapter folder ``path``: the current names, or the
    old PEFT-style names for a folder written before the rename."""
    folder = Path(path)
    if not (folder / CONFIG_NAME).is_file() and (folder / LEGACY_CONFIG_NAME).is_file():
        return folder / LEGACY_CONFIG_NAME, folder / LEGACY_WEIGHTS_NAME
    return folder / CONFIG_NAME, folder / WEIGHTS_NAME


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
    from medadapt import __version__

    config = {
        "format": FORMAT,
        "version": VERSION,
        "medadapt_version": __version__,
        "method": record["method"],
        "options": record["options"],
        "family": record["family"],
        "encoder": record["encoder"],
        "targets": record["targets"],
        "stage": record.get("stage", 1),
        "storage_dtype": None if storage is None else str(storage).removeprefix("torch."),
        "tensors": {k: list(v.shape) for k, v in tensors.items()},
        "base_fingerprint": ({} if holds_whole_encoder(record["method"], record["options"], record.get("stage", 1))
                             else base_fingerprint(model)),
        # What rebuilds the whole model (medadapt.load_model); None if not built by create_model.
        "model": build_record(model),
    }
    with atomic_path(folder / WEIGHTS_NAME) as tmp:
        save_file(tensors, str(tmp), metadata={"format": FORMAT, "method": record["method"]})
    atomic_write_text(folder / CONFIG_NAME, json.dumps(config, indent=1))
    _remove_legacy_files(folder)
    return folder


def _remove_legacy_files(folder: Path) -> None:
    # Files of the old names left in a folder saved again would be a second, stale copy.
    legacy_config = folder / LEGACY_CONFIG_NAME
    try:
        is_ours = read_json(legacy_config).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return
    if is_ours:
        (folder / LEGACY_WEIGHTS_NAME).unlink(missing_ok=True)
        legacy_config.unlink(missing_ok=True)


def _storage_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype) and dtype in STORAGE_DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype.removeprefix("torch.") in STORAGE_DTYPES:
        return STORAGE_DTYPES[dtype.removeprefix("torch.")]
    raise ValueError(f"save_adapters: dtype must be one of {sorted(STORAGE_DTYPES)} or None, got {dtype!r}")


def read_adapter_config(path: str | Path) -> dict:
    """The validated config of the adapter folder ``path``; ValueError names what is wrong."""
    folder = Path(path)
    config_file, _ = adapter_files(folder)
    if not config_file.is_file():
        raise FileNotFoundError(f"no {CONFIG_NAME} (or the older {LEGACY_CONFIG_NAME}) in {folder}: "
                                "not a medadapt adapter folder")
    config = read_json(config_file)
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        found = config.get("format") if isinstance(config, dict) else type(config).__name__
        raise ValueError(f"{config_file} is not a medadapt adapter config (format={found!r})")
    problems = _config_problems(config)
    if problems:
        raise ValueError(f"{config_file} is malformed: " + "; ".join(problems))
    options = config["options"]
    if "placement" in options and options["placement"] is None:
        # Folders written before the placement a method was built with was recorded: None
        # then meant the one default every block method had, beside attention and MLP.
        config["options"] = {**options, "placement": "parallel"}
    return config


def _is_str_list(value) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def _is_shape_table(value) -> bool:
    return isinstance(value, dict) and all(
        isinstance(shape, list) and all(isinstance(n, int) and n >= 0 for n in shape) for shape in value.values())


def _is_fingerprint(value) -> bool:
    return isinstance(value, dict) and all(isinstance(k, str) and isinstance(v, str) and v for k, v in value.items())


def _config_problems(config: dict) -> list[str]:
    """What is missing or wrong in an adapter config, one phrase per field."""
    required = {
        "version": (lambda v: v == VERSION, f"{VERSION} (the version this medadapt reads)"),
        "method": (lambda v: isinstance(v, str) and v != "", "a method name"),
        "options": (lambda v: isinstance(v, dict), "a mapping of the method's options"),
        "family": (lambda v: isinstance(v, str), "a backbone family name"),
        "encoder": (lambda v: isinstance(v, str), "the encoder's module name"),
        "targets": (_is_str_list, "a list of module names"),
        "tensors": (_is_shape_table, "a mapping of tensor names to shapes"),
        "base_fingerprint": (_is_fingerprint, "a mapping of weight names to digests"),
    }
    optional = {
        "stage": (lambda v: v in (1, 2), "1 or 2"),
        "storage_dtype": (lambda v: v is None or v in STORAGE_DTYPES, f"null or one of {sorted(STORAGE_DTYPES)}"),
        "model": (lambda v: v is None or isinstance(v, dict), "null or a mapping of create_model arguments"),
    }
    problems = []
    for key, (valid, what) in {**required, **optional}.items():
        if key not in config:
            if key in required:
                problems.append(f"{key!r} is missing")
        elif not valid(config[key]):
            problems.append(f"{key!r} must be {what}, got {_short(config[key])}")
    if isinstance(config.get("options"), dict):
        # Before anything matches them: injection would hang on a pathological pattern.
        problems += option_pattern_problems(config["options"])
    try:
        saves_whole_encoder = holds_whole_encoder(config["method"], config["options"], config.get("stage", 1))
    except (KeyError, TypeError, ValueError):
        saves_whole_encoder = False  # reported as a malformed method or options above
    if (not saves_whole_encoder and "base_fingerprint" in config
            and _is_fingerprint(config["base_fingerprint"]) and not config["base_fingerprint"]):
        # Only a folder holding the whole encoder (full fine-tuning, stage 2) may have no frozen
        # base; an empty fingerprint elsewhere would let the adapters load onto any base unchecked.
        problems.append("'base_fingerprint' is empty: nothing tells which base model the adapters belong to")
    return problems


def _short(value, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _describe(names, limit=10) -> str:
    names = sorted(names)
    more = f" ... and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def _read_tensors(weights_file: Path, config: dict) -> dict[str, torch.Tensor]:
    """The weights file's tensors, checked on their own: readable, as the config lists them,
    and finite."""
    if not weights_file.is_file():
        raise FileNotFoundError(f"{weights_file} is missing")
    try:
        tensors = load_file(str(weights_file))
    except Exception as error:  # safetensors raises its own error types for corrupt files
        raise ValueError(f"{weights_file} is not a readable safetensors file: {error}") from None
    listed = {k: tuple(v) for k, v in config["tensors"].items()}
    found = {k: tuple(v.shape) for k, v in tensors.items()}
    if listed != found:
        differ = sorted(set(listed) ^ set(found)) + sorted(k for k in set(listed) & set(found) if listed[k] != found[k])
        raise ValueError(f"{weights_file} does not hold the tensors its config lists ({_describe(differ)}): "
                         "the two files are from different saves")
    not_finite = [k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if not_finite:
        raise ValueError(f"{weights_file}: tensors hold NaN or Inf values: {_describe(not_finite)}; "
                         "training diverged, or the file is damaged")
    return tensors


@contextlib.contextmanager
def _restored_on_failure(model: nn.Module) -> Iterator[None]:
    """Undo whatever the block did to ``model``'s structure if it raises.

    Injection replaces child modules (the originals live on inside the wrappers), sets
    attributes and requires_grad and writes the injection record; it never changes a weight.
    So each module's attributes, the contents of its registries (children, parameters,
    buffers, hooks), the requires_grad flags and the record are all there is to restore.
    """
    saved = []
    for module in model.modules():
        attributes = dict(vars(module))
        registries = {k: copy.copy(v) for k, v in attributes.items() if isinstance(v, (dict, set))}
        saved.append((module, attributes, registries))
    requires_grad = [(p, p.requires_grad) for p in model.parameters()]
    record = injection_record(model)
    saved_record = copy.deepcopy(record)
    try:
        yield
    except BaseException:
        for module, attributes, registries in saved:
            vars(module).clear()
            vars(module).update(attributes)
            for name, contents in registries.items():
                attributes[name].clear()
                attributes[name].update(contents)
        for param, flag in requires_grad:
            param.requires_grad_(flag)
        if record is not None:
            record.clear()
            record.update(saved_record)
        raise


def load_adapters(model: nn.Module, path: str | Path, check_base: bool = True) -> nn.Module:
    """Re-create the saved adapters on ``model`` (a fresh base model) and load them strictly.

    Arguments:
      model: the same architecture the adapters were trained on, with its pretrained weights.
      path: a folder written by :func:`save_adapters`.
      check_base: compare the base weights' fingerprint and refuse a different base model.

    The files are checked first (a well-formed config; floating-point, finite tensors as the
    config lists them); anything refused raises, and leaves ``model`` as it was.
    """
    config = read_adapter_config(path)
    _, weights_file = adapter_files(path)
    tensors = _read_tensors(weights_file, config)
    with _restored_on_failure(model):
        record = _prepare(model, config, path)
        if record["targets"] != config["targets"]:
            raise ValueError(f"adapters in {path} target {len(config['targets'])} modules, this model "
                             f"offers {len(record['targets'])}: different architecture")
        if check_base and config["base_fingerprint"]:
            _check_base(model, config["base_fingerprint"], path)
        destinations = _stored_tensors(model, record)
        _check_fit(tensors, destinations, weights_file)
        with torch.no_grad():
            for name, value in tensors.items():
                destinations[name].copy_(value)
    return model


def _prepare(model: nn.Module, config: dict, path) -> dict:
    """Inject the saved method into ``model`` (or check the one it has) at the saved stage."""
    record = injection_record(model)
    if record is None:
        try:
            inject(model, config["method"], **config["options"])
        except (TypeError, ValueError) as error:
            raise ValueError(f"the {config['method']!r} adapters in {path} do not fit this model with their "
                             f"saved options: {error}") from error
    elif record["method"] != config["method"] or record["options"] != config["options"]:
        raise ValueError(
            f"model already has {record['method']!r} adapters with other options than {path} "
            f"({config['method']!r}); load onto a fresh base model"
        )
    stage = config.get("stage", 1)
    if injection_record(model).get("stage", 1) != stage:
        set_stage(model, stage)   # stage 2 saves the encoder too: the same tensors must be trainable
    return injection_record(model)


def _check_base(model: nn.Module, saved: dict[str, str], path) -> None:
    current = base_fingerprint(model)
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


def _check_fit(tensors: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], weights_file: Path) -> None:
    missing = set(expected) - set(tensors)
    unexpected = set(tensors) - set(expected)
    common = set(expected) & set(tensors)
    shapes = {k for k in common if tuple(expected[k].shape) != tuple(tensors[k].shape)}
    # Floating-point weights need floating-point data (any precision: it is cast); integer
    # buffers (BatchNorm's counters under full fine-tuning) need their own dtype.
    dtypes = {k for k in common if (tensors[k].is_floating_point() != expected[k].is_floating_point()
                                    or not expected[k].is_floating_point() and tensors[k].dtype != expected[k].dtype)}
    if missing or unexpected or shapes or dtypes:
        parts = []
        if missing:
            parts.append(f"missing: {_describe(missing)}")
        if unexpected:
            parts.append(f"unexpected: {_describe(unexpected)}")
        if shapes:
            parts.append("shape mismatch: " + _describe(
                f"{k} {tuple(tensors[k].shape)} vs {tuple(expected[k].shape)}" for k in shapes))
        if dtypes:
            parts.append("wrong dtype: " + _describe(
                f"{k} {str(tensors[k].dtype).removeprefix('torch.')} where the model has "
                f"{str(expected[k].dtype).removeprefix('torch.')}" for k in dtypes))
        raise ValueError(f"{weights_file} does not fit this model: " + "; ".join(parts))
