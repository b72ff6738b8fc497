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
