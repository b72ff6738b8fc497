"""Self-describing adapter folders: record how a model was built, rebuild it from the folder.

:func:`medadapt.create_model` records its arguments on the model it returns
(:func:`record_build`); :func:`medadapt.save_adapters` writes them into the folder's config;
:func:`load_model` calls ``create_model`` with them again and loads the adapters strictly.
A backbone checkpoint file is not copied into the folder, only its SHA-256: the user passes
the file again and it is checked.
"""

from __future__ import annotations

import hashlib
import inspect
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from medadapt.checkpoint import BUILD_ATTR, _tensor_digest, read_adapter_config

# Arguments that are not part of the recipe: the adapters are the folder itself, and the
# backbone checkpoint is recorded by its fingerprint.
_NOT_RECORDED = ("adapter_checkpoint", "backbone_checkpoint")


def _plain_data(value: Any, where: str) -> Any:
    """``value`` as JSON data (tuples become lists); TypeError naming ``where`` otherwise."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_plain_data(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, Mapping) and all(isinstance(k, str) for k in value):
        return {k: _plain_data(v, f"{where}[{k!r}]") for k, v in value.items()}
    raise TypeError(f"{where} is a {type(value).__name__}, not JSON data")


_file_digests: dict[tuple[str, int, int], str] = {}


def _file_sha256(path: Path) -> str:
    # Cached by (path, size, mtime): servers and bundles build the same model many times.
    status = path.stat()
    key = (os.path.realpath(path), status.st_size, status.st_mtime_ns)
    if key not in _file_digests:
        digest = hashlib.sha256()
        with open(path, "rb") as file:
            for chunk in iter(lambda: file.read(1 << 24), b""):
                digest.update(chunk)
        _file_digests[key] = digest.hexdigest()
    return _file_digests[key]


def _mapping_sha256(mapping: Mapping) -> str:
    digest = hashlib.sha256()
    for key in sorted(mapping, key=str):
        value = mapping[key]
        if isinstance(value, torch.Tensor):
            part = _tensor_digest(value)
        elif isinstance(value, Mapping):
            part = _mapping_sha256(value)
        else:
            part = repr(value)
        digest.update(f"{key}={part};".encode())
    return digest.hexdigest()


def checkpoint_fingerprint(checkpoint) -> dict | None:
    """What identifies a backbone checkpoint: its file name and the SHA-256 of its bytes (of
    its tensors for a state dict passed in memory); None when there is none (weights that
    ship in a package, or random ones)."""
    if checkpoint is None:
        return None
    if isinstance(checkpoint, Mapping):
        return {"file": None, "sha256": _mapping_sha256(checkpoint)}
    path = Path(checkpoint)
    return {"file": path.name, "sha256": _file_sha256(path)}


def record_build(model: nn.Module, arguments: dict[str, Any]) -> None:
    """Record ``create_model``'s ``arguments`` on ``model`` as plain data for save_adapters.

    Arguments that are not JSON data (a callable in backbone_options, say) cannot be
    recorded; the record then says why, and load_model reports it.
    """
    recipe = {k: v for k, v in arguments.items() if k not in _NOT_RECORDED}
    try:
        record = {"builder": "medadapt.create_model", "arguments": {k: _plain_data(v, k) for k, v in recipe.items()},
                  "backbone_checkpoint": checkpoint_fingerprint(arguments.get("backbone_checkpoint"))}
    except TypeError as error:
        record = {"builder": "medadapt.create_model", "unrecordable": str(error)}
    setattr(model, BUILD_ATTR, record)


def load_model(folder: str | os.PathLike, backbone_checkpoint=None,
               device: str | torch.device | None = None) -> nn.Module:
    """Rebuild the whole model saved in ``folder`` and load its adapters strictly.

    Arguments:
      folder: a folder written by :func:`medadapt.save_adapters` for a model built by
        :func:`medadapt.create_model`.
      backbone_checkpoint: the backbone weights file the model was built with, when it was
        built with one; it must be the same file (its SHA-256 is checked).
      device: where to put the model; None leaves it on the CPU.

    Backbones with random weights cannot be rebuilt (their weights are in no file): the
    base-weight check refuses them.
    """
    from medadapt.models.factory import create_model

    config = read_adapter_config(folder)
    build = config.get("model")
    if build is None:
        raise ValueError(f"the config in {folder} records no create_model arguments (the model was not "
                         "built by medadapt.create_model, or by an older medadapt): build it yourself and "
                         "call medadapt.load_adapters(model, folder)")
    if "unrecordable" in build:
        raise ValueError(f"the config in {folder} cannot rebuild the model: {build['unrecordable']}")
    arguments = build.get("arguments")
    if not isinstance(arguments, dict):
        raise ValueError(f"the config in {folder} is malformed: model.arguments must be a mapping, "
                         f"got {arguments!r:.60}")
    unknown = sorted(set(arguments) - set(inspect.signature(create_model).parameters))
    if unknown:
        raise ValueError(f"the config in {folder} records create_model arguments this medadapt does not "
                         f"take: {unknown}")
    _check_backbone_checkpoint(build.get("backbone_checkpoint"), backbone_checkpoint, folder)
    model = create_model(**arguments, backbone_checkpoint=backbone_checkpoint, adapter_checkpoint=str(folder))
    return model if device is None else model.to(device)


def _check_backbone_checkpoint(recorded: dict | None, given, folder) -> None:
    """Refuse a backbone checkpoint other than the one the saved model was built with."""
    if recorded is None:
        if given is not None:
            raise ValueError(f"the model in {folder} was built without a backbone checkpoint (with the "
                             "backbone's packaged weights): do not pass backbone_checkpoint")
        return
    if not isinstance(recorded, dict) or not recorded.get("sha256"):
        raise ValueError(f"the config in {folder} is malformed: model.backbone_checkpoint must hold a sha256, "
                         f"got {recorded!r:.60}")
    name = recorded.get("file") or "a state dict passed in memory"
    if given is None:
        raise ValueError(f"the model in {folder} was built with the backbone checkpoint {name} "
                         f"(sha256 {recorded['sha256']}): pass backbone_checkpoint=<that file>")
    if isinstance(given, (str, os.PathLike)) and not Path(given).is_file():
        raise FileNotFoundError(f"backbone_checkpoint {given} is not a file")
    found = checkpoint_fingerprint(given)
    if found["sha256"] != recorded["sha256"]:
        given_name = given if found["file"] else "(a state dict)"
        raise ValueError(f"backbone_checkpoint {given_name} is not the checkpoint {name} the model in {folder} "
                         f"was built with: sha256 {found['sha256']} vs {recorded['sha256']}")
