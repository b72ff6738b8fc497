"""One injection mechanism for every method: find the encoder, freeze it, wrap its sub-layers.

``inject(model, method, **options)`` works on a bare encoder, a :class:`medadapt.backbones.Backbone`
or a whole task model: the first module a backbone family recognises is the encoder; it is
frozen (BatchNorm included) and receives the adapters, while everything outside it (heads,
decoders, input stems) stays as the caller left it, trainable by default.
"""

from __future__ import annotations

import contextlib
import re
from typing import Iterator

import torch
import torch.nn as nn

from medadapt.adapters import make_config
from medadapt.adapters.base import AdapterConfig, BlockAdapterConfig, TokenLayout
from medadapt.adapters.dka import DualKernelAdapter
from medadapt.adapters.lora import LoRALinear
from medadapt.adapters.vpt import PromptedBlock, make_prompts
from medadapt.adapters.wrappers import _FROZEN, Adapted, frozen_batchnorm
from medadapt.families import Family, Site, find_encoder

RECORD_ATTR = "medadapt_injection"


# ----------------------------------------------------------------------------- helpers

def replace_module(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def freeze_batchnorm(module: nn.Module) -> None:
    for name, child in list(module.named_modules()):
        if type(child) in _FROZEN:
            replace_module(module, name, frozen_batchnorm(child))


def injection_record(model: nn.Module) -> dict | None:
    # DistributedDataParallel keeps the injected model in .module.
    return getattr(model, RECORD_ATTR, None) or getattr(getattr(model, "module", None), RECORD_ATTR, None)


def select_blocks(blocks: list[tuple[str, nn.Module]], targets, method: str) -> list[tuple[int, str, nn.Module]]:
    indexed = [(i, name, block) for i, (name, block) in enumerate(blocks)]
    if targets is None:
        chosen = indexed
    elif isinstance(targets, str):
        pattern = re.compile(targets)
        chosen = [t for t in indexed if pattern.search(t[1])]
    else:
        n = len(blocks)
        bad = [t for t in targets if not -n <= int(t) < n]
        if bad:
            raise ValueError(f"{method}: target block indices {bad} are out of range for {n} blocks")
        wanted = sorted({int(t) % n for t in targets})
        chosen = [indexed[i] for i in wanted]
    if not chosen:
        names = [name for name, _ in blocks][:6]
        raise ValueError(f"{method}: targets={targets!r} select no block (blocks are named like {names})")
    return chosen


def _layout(site: Site, config: AdapterConfig) -> TokenLayout:
    return TokenLayout(spatial_dims=config.spatial_dims, num_slices=config.num_slices or 1, **site.layout)


# ----------------------------------------------------------------------------- inject

def inject(model: nn.Module, method: str, **options) -> nn.Module:
    """Put ``method``'s adapters into the encoder inside ``model`` and freeze the encoder.

    Arguments:
      model: an encoder, a Backbone or a task model containing one.
      method: a name from :func:`medadapt.list_methods`.
      options: the method's options (see its config class), plus ``targets`` (block indices
        or a regex on block names), ``spatial_dims`` and ``num_slices`` for 3D.

    Returns the same model, modified in place.
    """
    if injection_record(model) is not None:
        raise ValueError(f"model already has {injection_record(model)['method']!r} adapters; "
                         "build a fresh model to inject another method")
    config = make_config(method, options)
    encoder_name, encoder, family = find_encoder(model)
    if config.kind == "full":
        model.requires_grad_(True)
        targets: list[str] = []
    else:
        encoder.requires_grad_(False)
        freeze_batchnorm(encoder)
        targets = _INJECTORS[config.kind](method, config, encoder, family)

    setattr(model, RECORD_ATTR, {
        "method": method,
        "options": config.options(),
        "family": family.name,
        "encoder": encoder_name,
        "targets": targets,
    })
    return model


def _inject_nothing(method, config, encoder, family) -> list[str]:
    return []


def _inject_biases(method, config, encoder, family) -> list[str]:
    names = [n for n, p in encoder.named_parameters() if n.endswith("bias")]
    if not names:
        raise ValueError(f"bitfit: the {family.name} encoder has no bias terms to train")
    for n, p in encoder.named_parameters():
        if n.endswith("bias"):
            p.requires_grad_(True)
    return names


def _block_plan(config: BlockAdapterConfig, family: Family, method: str) -> list[tuple[str, str, float]]:
    placement = config.placement
    if family.cnn:
        # CNN blocks have no attention/MLP split: the update goes on the whole block.
        mode = "parallel" if placement == "parallel" else "sequential"
        plan = [("block", mode, config.scale)]
        plan += [s for s in config.plan(placement or config.default_placement) if s[0] == "input"]
        return plan
    return config.plan(placement or config.default_placement)


def _inject_block_adapters(method, config: BlockAdapterConfig, encoder, family) -> list[str]:
    plan = _block_plan(config, family, method)
    chosen = select_blocks(family.blocks(encoder), config.targets, method)
    wrapped: list[str] = []
    # Sub-layers first, then whole-block wrappers, so the recorded names stay valid.
    ordered = sorted(plan, key=lambda step: step[0] in ("block", "input"))
    for position, (index, block_name, block) in enumerate(chosen):
        for site_name, mode, scale in ordered:
            if site_name == "input" and position > 0:
                continue
            site = family.site(encoder, block_name, block, site_name)
            if site is None:
                raise ValueError(f"{method}: the {family.name} block {block_name} has no {site_name!r} sub-layer")
            if mode == "parallel" and site_name == "block" and not family.block_keeps_shape(encoder.get_submodule(site.name)):
                raise ValueError(
                    f"{method}: placement='parallel' needs blocks that keep their shape, but {family.name} "
                    f"block {block_name} changes it; use placement='block'"
                )
            adapter = config.build(site.dim, _layout(site, config))
            base = encoder.get_submodule(site.name)
            replace_module(encoder, site.name, Adapted(base, adapter, "pre" if site_name == "input" else mode, scale))
            wrapped.append(site.name)
    return wrapped


def _inject_lora(method, config, encoder, family) -> list[str]:
    pattern_text = config.target_modules or family.lora_pattern
    if pattern_text is None:
        raise ValueError(
            f"lora wraps linear layers, and the {family.name} backbone has no attention projections; "
            "pass target_modules='<regex of nn.Linear names>' or use another method"
        )
    pattern = re.compile(pattern_text)
    wrapped = []
    for _, block_name, block in select_blocks(family.blocks(encoder), config.targets, method):
        for name, module in list(block.named_modules()):
            if name and isinstance(module, nn.Linear) and pattern.search(name):
                full = f"{block_name}.{name}"
                replace_module(encoder, full, config.build(module))
                wrapped.append(full)
    if not wrapped:
        raise ValueError(f"lora: target_modules={pattern_text!r} matches no nn.Linear in the {family.name} blocks")
    return wrapped


def _inject_prompts(method, config, encoder, family) -> list[str]:
    info = family.prompt_info(encoder)
    if info is None:
        raise ValueError(
            f"vpt needs a token sequence, and the {family.name} backbone has none "
            f"({family.description}); use an adapter method instead"
        )
    blocks = family.blocks(encoder)
    chosen = select_blocks(blocks, config.targets, method)
    n = config.num_tokens
    wrapped = []
    if config.deep:
        for _, name, block in chosen:
            replace_module(encoder, name, PromptedBlock(block, make_prompts(n, info.dim, info.patch_dim), info.num_prefix, n))
            wrapped.append(name)
        return wrapped
    first, last = chosen[0][1], blocks[-1][0]
    for name, block in blocks:
        if name in (first, last):
            prompts = make_prompts(n, info.dim, info.patch_dim) if name == first else None
            replace_module(encoder, name, PromptedBlock(block, prompts, info.num_prefix, n if name == last else 0))
            wrapped.append(name)
    return wrapped


def _inject_output(method, config, encoder, family) -> list[str]:
    site = family.output_site(encoder)
    adapter = config.build(site.dim, _layout(site, config))
    replace_module(encoder, site.name, Adapted(encoder.get_submodule(site.name), adapter, "replace"))
    return [site.name]


_INJECTORS = {
    "head": _inject_nothing,
    "bias": _inject_biases,
    "block": _inject_block_adapters,
    "linear": _inject_lora,
    "prompt": _inject_prompts,
    "output": _inject_output,
}


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


def print_trainable_parameters(model: nn.Module) -> None:
    print(trainable_summary(model))


def _adapter_parameter_ids(model: nn.Module) -> set[int]:
    ids: set[int] = set()
    for module in model.modules():
        if isinstance(module, Adapted):
            ids.update(id(p) for p in module.adapter.parameters())
        elif isinstance(module, LoRALinear):
            ids.update(id(p) for p in [*module.lora_a.parameters(), *module.lora_b.parameters()])
        elif isinstance(module, PromptedBlock) and module.prompts is not None:
            ids.add(id(module.prompts))
    return ids


def param_groups(model: nn.Module, lr_adapter: float = 1e-3, lr_head: float = 1e-4,
                 lr_backbone: float | None = None, weight_decay: float = 0.0) -> list[dict]:
    """Optimizer parameter groups with separate learning rates.

    The DKA paper finds asynchronous rates crucial: adapters at 1e-3, the head at 1e-4.
    "adapter" holds adapter modules (and BitFit's biases), "head" every trainable parameter
    outside the encoder, "backbone" trainable encoder weights (full fine-tuning, CLAdapter's
    stage 2) at ``lr_backbone`` (default: ``lr_head``).
    """
    record = injection_record(model)
    _, encoder, _ = find_encoder(model)
    adapter_ids = _adapter_parameter_ids(model)
    encoder_ids = {id(p) for p in encoder.parameters()}
    bitfit = record is not None and record["method"] == "bitfit"
    groups: dict[str, list] = {"adapter": [], "head": [], "backbone": []}
    seen: set[int] = set()
    for p in model.parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        if id(p) in adapter_ids:
            groups["adapter"].append(p)
        elif id(p) in encoder_ids:
            groups["adapter" if bitfit else "backbone"].append(p)
        else:
            groups["head"].append(p)
    rates = {"adapter": lr_adapter, "head": lr_head, "backbone": lr_head if lr_backbone is None else lr_backbone}
    return [{"params": ps, "lr": rates[name], "weight_decay": weight_decay, "name": name}
            for name, ps in groups.items() if ps]


def set_stage(model: nn.Module, stage: int) -> None:
    """Staged fine-tuning (CLAdapter): stage 1 trains adapters and head on a frozen encoder;
    stage 2 trains every parameter (build the optimizer again, at lr / 10 by the paper).
    BatchNorm statistics stay frozen in both stages."""
    if stage not in (1, 2):
        raise ValueError(f"stage must be 1 or 2, got {stage!r}")
    record = injection_record(model)
    if record is None:
        raise ValueError("set_stage needs a model prepared with medadapt.inject")
    _, encoder, _ = find_encoder(model)
    adapter_ids = _adapter_parameter_ids(model)
    for p in encoder.parameters():
        if id(p) not in adapter_ids:
            p.requires_grad_(stage == 2)
    record["stage"] = stage


@contextlib.contextmanager
def disable_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """Run ``model`` as the pretrained backbone would, without its adapters."""
    record = injection_record(model)
    if record is not None and record["method"] in ("bitfit", "full"):
        raise ValueError(f"{record['method']} changes the backbone's own weights; there is no adapter to disable")
    switches = [m for m in model.modules() if isinstance(m, (Adapted, LoRALinear, PromptedBlock))]
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
    adapters cannot be merged and raise.
    """
    record = injection_record(model)
    if record is None:
        raise ValueError("merge_adapters needs a model prepared with medadapt.inject")
    method = record["method"]
    if method == "lora":
        for name, module in list(model.named_modules()):
            if isinstance(module, LoRALinear):
                replace_module(model, name, module.merged())
    elif method == "dka":
        for module in model.modules():
            if isinstance(module, DualKernelAdapter):
                module.fold_kernels()
    elif method not in ("bitfit", "linear", "full"):
        raise ValueError(f"{method} adapters are non-linear and cannot be merged into the backbone")
    record["merged"] = True
    return model


__all__ = ["inject", "count_parameters", "trainable_summary", "print_trainable_parameters",
           "param_groups", "set_stage", "disable_adapters", "merge_adapters", "injection_record"]
