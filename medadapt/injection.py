"""One injection mechanism for every method: find the encoder, freeze it, let the method wrap it.

``inject(model, method, **options)`` works on a bare encoder, a :class:`medadapt.backbones.Backbone`
or a whole task model: the first module a backbone family recognises is the encoder; the
method's config puts its modules into it (:meth:`AdapterConfig.inject`) and its first training
stage decides what trains (a frozen encoder's BatchNorm included), while everything outside
the encoder (heads, decoders, input stems) stays as the caller left it, trainable by default.

What a method does over its lifecycle (its trainable parameters, stages, merging, whether it
can be switched off) is asked of its config, so nothing here depends on which method it is.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch.nn as nn

from medadapt.adapters import make_config
from medadapt.adapters.base import (
    AdapterConfig,
    AdapterModule,
    adapter_modules,
    replace_module,
)
from medadapt.adapters.wrappers import _FROZEN, frozen_batchnorm
from medadapt.families import find_encoder

RECORD_ATTR = "medadapt_injection"


# ----------------------------------------------------------------------------- helpers

def freeze_batchnorm(module: nn.Module) -> None:
    for name, child in list(module.named_modules()):
        if type(child) in _FROZEN:
            replace_module(module, name, frozen_batchnorm(child))


def injection_record(model: nn.Module) -> dict | None:
    # DistributedDataParallel keeps the injected model in .module.
    return getattr(model, RECORD_ATTR, None) or getattr(getattr(model, "module", None), RECORD_ATTR, None)


def method_config(model: nn.Module) -> AdapterConfig:
    """The config of the method injected into ``model``, rebuilt from its record."""
    record = injection_record(model)
    if record is None:
        raise ValueError(f"{type(model).__name__} has no adapters: prepare it with medadapt.inject")
    return make_config(record["method"], dict(record["options"]))


def _apply_stage(encoder: nn.Module, config: AdapterConfig, stage: int) -> None:
    """requires_grad of every encoder parameter as ``config``'s ``stage`` trains it."""
    trains = config.stage_trains(stage)
    adapter_ids = {id(p) for p in config.adapter_parameters(encoder)}
    for p in encoder.parameters():
        p.requires_grad_(("adapter" if id(p) in adapter_ids else "encoder") in trains)


# ----------------------------------------------------------------------------- inject

def inject(model: nn.Module, method: str, **options) -> nn.Module:
    """Put ``method``'s adapters into the encoder inside ``model`` and freeze the encoder.

    Arguments:
      model: an encoder, a Backbone or a task model containing one.
      method: a name from :func:`medadapt.list_methods`.
      options: the method's options (see its config class), plus ``targets`` (block indices
        or a regex on block names), ``spatial_dims`` and ``num_slices`` for 3D.

    Returns the same model, modified in place, at the method's training stage 1.
    """
    if injection_record(model) is not None:
        raise ValueError(f"model already has {injection_record(model)['method']!r} adapters; "
                         "build a fresh model to inject another method")
    config = make_config(method, options)
    encoder_name, encoder, family = find_encoder(model)
    if "encoder" not in config.stage_trains(1):
        # A frozen encoder must not drift its running statistics (small medical batches would
        # give poor ones); they stay frozen in later stages too.
        freeze_batchnorm(encoder)
    try:
        targets = config.inject(encoder, family)
    except ValueError as error:
        raise ValueError(f"{method}: {error}") from None
    _apply_stage(encoder, config, 1)

    setattr(model, RECORD_ATTR, {
        "method": method,
        "options": config.options(),
        "family": family.name,
        "encoder": encoder_name,
        "targets": targets,
        "stage": 1,
    })
    return model


# ----------------------------------------------------------------------------- inspection

def count_parameters(model: nn.Module) -> dict[str, int]:
    """{"trainable": ..., "total": ...} over unique parameters."""
    params = {id(p): p for p in model.parameters()}.values()
    return {
        "trainable": sum(p.numel() for p in params if p.requires_grad),
        "total": sum(p.numel() for p in params),
    }


def trainable_summary(model: nn.Module) -> str:
    counts = count_parameters(model)
    share = 100.0 * counts["trainable"] / max(counts["total"], 1)
    record = injection_record(model)
    method = f"method: {record['method']} || " if record else ""
    return f"{method}trainable params: {counts['trainable']:,} || all params: {counts['total']:,} || trainable%: {share:.4f}"


def adapter_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters the injected method trains inside the encoder (its adapters, BitFit's
    biases); for a model without a record, those of any adapter modules it holds."""
    _, encoder, _ = find_encoder(model)
    if injection_record(model) is None:
        return AdapterConfig().adapter_parameters(encoder)
    return method_config(model).adapter_parameters(encoder)


def param_groups(model: nn.Module, lr_adapter: float = 1e-3, lr_head: float = 1e-4,
                 lr_backbone: float | None = None, weight_decay: float = 0.0) -> list[dict]:
    """Optimizer parameter groups with separate learning rates.

    The DKA paper finds asynchronous rates crucial: adapters at 1e-3, the head at 1e-4.
    "adapter" holds the method's own parameters (adapter modules, BitFit's biases), "head"
    every trainable parameter outside the encoder, "backbone" trainable encoder weights (full
    fine-tuning, CLAdapter's stage 2) at ``lr_backbone`` (default: ``lr_head``).
    """
    _, encoder, _ = find_encoder(model)
    adapter_ids = {id(p) for p in adapter_parameters(model)}
    encoder_ids = {id(p) for p in encoder.parameters()}
    groups: dict[str, list] = {"adapter": [], "head": [], "backbone": []}
    seen: set[int] = set()
    for p in model.parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        if id(p) in adapter_ids:
            groups["adapter"].append(p)
        elif id(p) in encoder_ids:
            groups["backbone"].append(p)
        else:
            groups["head"].append(p)
    rates = {"adapter": lr_adapter, "head": lr_head, "backbone": lr_head if lr_backbone is None else lr_backbone}
    return [{"params": ps, "lr": rates[name], "weight_decay": weight_decay, "name": name}
            for name, ps in groups.items() if ps]


def set_stage(model: nn.Module, stage: int) -> None:
    """Switch ``model`` to training stage ``stage`` of its method (``config.num_stages`` of
    them; ``config.stage_trains(stage)`` says what trains). CLAdapter's staged fine-tuning:
    stage 1 trains adapter and head on a frozen encoder, stage 2 every parameter (build the
    optimizer again, at lr / 10 by the paper). BatchNorm statistics of an encoder frozen at
    stage 1 stay frozen."""
    record = injection_record(model)
    if record is None:
        raise ValueError("set_stage needs a model prepared with medadapt.inject")
    config = method_config(model)
    try:
        config.check_stage(stage)
    except ValueError as error:
        raise ValueError(f"{record['method']}: {error}") from None
    _, encoder, _ = find_encoder(model)
    _apply_stage(encoder, config, stage)
    record["stage"] = stage


def encoder_output_fixed(model: nn.Module) -> bool:
    """True when training ``model`` at its current stage cannot change its encoder's output
    (linear probing; CLAdapter's stage 1), so the encoder's features can be computed once."""
    record = injection_record(model)
    if record is None:
        raise ValueError(f"{type(model).__name__} has no adapters: prepare it with medadapt.inject")
    return method_config(model).encoder_output_fixed(record.get("stage", 1))


@contextlib.contextmanager
def disable_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """Run ``model`` as the pretrained backbone would, without its adapters."""
    record = injection_record(model)
    if record is not None and method_config(model).changes_base_weights:
        raise ValueError(f"{record['method']} changes the backbone's own weights; there is no adapter to disable")
    switches = [m for _, m in adapter_modules(model)]
    previous = [m.enabled for m in switches]
    for m in switches:
        m.enabled = False
    try:
        yield model
    finally:
        for m, state in zip(switches, previous):
            m.enabled = state


def merge_adapters(model: nn.Module) -> nn.Module:
    """Fold adapters into the weights where the math allows.

    LoRA updates are added to their linear layers (the wrappers disappear); BitFit's biases
    are already the weights; DKA's small kernel is folded into its large one. Non-linear
    adapters cannot be merged and raise, leaving the model as it was.
    """
    record = injection_record(model)
    if record is None:
        raise ValueError("merge_adapters needs a model prepared with medadapt.inject")
    _, encoder, _ = find_encoder(model)
    try:
        method_config(model).merge(encoder)
    except ValueError as error:
        raise ValueError(f"{record['method']}: {error}") from None
    record["merged"] = True
    return model


__all__ = ["inject", "count_parameters", "trainable_summary", "adapter_parameters",
           "param_groups", "set_stage", "encoder_output_fixed", "disable_adapters", "merge_adapters",
           "injection_record", "method_config", "replace_module", "AdapterModule"]
