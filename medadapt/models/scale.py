"""How much of a model trains, beside what the same method trains at the papers' scale.

The papers size their adapters on ViT-B/16 (768 channels): DKA's bottleneck 192 for
segmentation trains about 10 % of the model, 16 for classification about 1 %. medadapt sizes
adapters by the same ratio to each block's width (`AdapterConfig.bottleneck_for`), so a
model on another backbone trains its own share; `scale_report` puts the two side by side.
The reference is the same ``create_model`` call with ViT-B/16 as the backbone, built on the
meta device (no memory, no weights), so it is exact for every method and option.
"""

from __future__ import annotations

import functools
import json
import warnings
from collections import Counter
from typing import Any

import torch
import torch.nn as nn

from medadapt.adapters.base import adapter_modules
from medadapt.checkpoint import build_record
from medadapt.injection import count_parameters, injection_record, trainable_summary

REFERENCE_BACKBONE = "timm:vit_base_patch16_224"
REFERENCE_NAME = "ViT-B/16"


def trainable_share(model: nn.Module) -> float:
    """The trainable share of ``model``'s parameters, in percent."""
    counts = count_parameters(model)
    return 100.0 * counts["trainable"] / max(counts["total"], 1)


def adapter_widths(model: nn.Module) -> list[tuple[int, int]]:
    """(block width, bottleneck) of every bottleneck adapter in ``model``, outermost first."""
    widths = []
    for _, module in adapter_modules(model):
        down = getattr(getattr(module, "adapter", None), "down", None)
        if isinstance(down, nn.Linear):
            widths.append((down.in_features, down.out_features))
    return widths


@functools.lru_cache(maxsize=64)
def _reference_share(arguments_json: str) -> float:
    from medadapt.backbones.base import NotPretrainedWarning
    from medadapt.models.factory import create_model

    arguments = json.loads(arguments_json)
    with warnings.catch_warnings(), torch.device("meta"):
        warnings.simplefilter("ignore", NotPretrainedWarning)
        reference = create_model(**arguments)
    return trainable_share(reference)


def reference_share(arguments: dict[str, Any]) -> float | None:
    """The trainable share (percent) of the ``create_model`` call ``arguments`` with ViT-B/16
    as the backbone: the papers' scale of the same method, options and task. None when the
    call cannot be rebuilt that way (a backbone-specific option, an unrecordable argument)."""
    recipe = {k: v for k, v in arguments.items() if k not in ("backbone", "backbone_options", "backbone_checkpoint",
                                                               "adapter_checkpoint", "gradient_checkpointing",
                                                               "export_input_size")}
    try:
        return _reference_share(json.dumps({**recipe, "backbone": REFERENCE_BACKBONE}, sort_keys=True))
    except Exception:  # noqa: BLE001 - a reference that cannot be built is left out, not an error
        return None


def print_trainable_parameters(model: nn.Module) -> None:
    """peft's line, and for a ``create_model`` model what the same method trains at the papers'
    scale (ViT-B/16) and the adapters' bottleneck widths."""
    print(trainable_summary(model))
    if build_record(model):
        print(scale_report(model))


def scale_report(model: nn.Module) -> str:
    """One line: what ``model`` trains, what the same method trains at the papers' scale, and
    the width of its bottleneck adapters by block width."""
    counts = count_parameters(model)
    text = (f"{counts['trainable']:,} of {counts['total']:,} parameters trainable "
            f"({trainable_share(model):.1f} %)")
    record, build = injection_record(model), build_record(model)
    if record and build and "arguments" in build:
        share = reference_share(build["arguments"])
        if share is not None:
            text += f"; {record['method']} at the papers' scale ({REFERENCE_NAME}) trains {share:.1f} %"
    widths = Counter(adapter_widths(model))
    if widths:
        text += "; bottlenecks " + ", ".join(f"{d}->{b} (x{n})" for (d, b), n in sorted(widths.items()))
    return text


# ---------------------------------------------------------------------------- memory
def estimated_training_bytes(model: nn.Module, batch_size: int) -> int | None:
    """Roughly what one training step needs: the weights, plus the gradients and AdamW's two
    moments of the trainable ones, plus what the forward pass keeps for the backward (the
    outputs of the model's leaf modules, a rough count: it leaves out attention matrices and
    counts outputs that share memory), for a batch at the model's input size. The pass runs
    the model's own modules with meta-device stand-ins for every weight and the input: no
    memory, no arithmetic. None for a model that cannot be run that way (box prompts)."""
    from torch.func import functional_call

    model = getattr(model, "module", model)  # DistributedDataParallel holds the model
    build = build_record(model)
    size = getattr(model, "export_input_size", None)
    if not build or "arguments" not in build or size is None:
        return None
    channels = build["arguments"].get("in_channels") or 3
    stand_ins = {name: torch.empty_like(t, device="meta")
                 for name, t in [*model.named_parameters(), *model.named_buffers()]}
    kept = [0]

    def count(module, inputs, output):
        for tensor in output if isinstance(output, (tuple, list)) else [output]:
            if isinstance(tensor, torch.Tensor):
                kept[0] += tensor.numel() * tensor.element_size()

    passes_through = (nn.Identity, nn.Dropout)
    hooks = [m.register_forward_hook(count) for m in model.modules()
             if not list(m.children()) and not isinstance(m, passes_through)]
    try:
        functional_call(model, stand_ins, (torch.zeros(1, channels, *size, device="meta"),))
    except Exception:  # noqa: BLE001 - a model this estimate cannot run is not checked
        return None
    finally:
        for hook in hooks:
            hook.remove()
    counts = count_parameters(model)
    return 4 * counts["total"] + 12 * counts["trainable"] + int(batch_size) * kept[0]


def available_bytes(device: torch.device | str) -> int | None:
    """Free memory on ``device``: the GPU's, or the system's available memory for the CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        for line in open("/proc/meminfo", encoding="utf-8"):
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def check_fits(model: nn.Module, batch_size: int, device: torch.device | str = "cpu") -> None:
    """Refuse, before any work, a model and batch whose training step cannot fit in the memory
    ``device`` has (`estimated_training_bytes` against `available_bytes`), saying what it needs."""
    need, have = estimated_training_bytes(model, batch_size), available_bytes(device)
    if need is None or have is None or need <= have:
        return
    size = "x".join(str(s) for s in getattr(model, "export_input_size", ()))
    raise MemoryError(f"training this model at {size} with batch_size {batch_size} needs about {need / 2**30:.1f} GiB, "
                      f"and {torch.device(device)} has {have / 2**30:.1f} GiB free: use a smaller image_size (or the "
                      "backbone's img_size), a smaller batch_size, or gradient_checkpointing")
