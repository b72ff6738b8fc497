"""Cached encoder features for methods whose training never changes the encoder's output.

Linear probing and CLAdapter's stage 1 train only what comes after a frozen encoder (the
method's config says so: ``config.encoder_output_fixed(stage)``), so the encoder can run once
under ``no_grad`` and every later epoch reads its features from memory.
"""

from __future__ import annotations

from typing import Iterable

import torch
import torch.nn as nn

from medadapt.adapters.wrappers import Adapted
from medadapt.injection import disable_adapters, encoder_output_fixed, injection_record


def output_adapter(model: nn.Module) -> nn.Module | None:
    """The module the method applies to the encoder's output (CLAdapter), or None when there
    is none (linear probing). Raises unless the model's encoder output is fixed at its stage."""
    record = injection_record(model)
    if record is None or not encoder_output_fixed(model):
        method = None if record is None else record["method"]
        stage = None if record is None else record.get("stage", 1)
        raise ValueError(f"cached features need a frozen encoder whose output training cannot change "
                         f"(linear probing, CLAdapter stage 1), not {method!r} at stage {stage}")
    wrappers = [m for m in model.modules() if isinstance(m, Adapted) and m.mode == "replace"]
    if not wrappers:
        return None
    if wrappers[0].adapter.layout.kind != "channels_first":
        raise ValueError("cached CLAdapter features are supported for encoders with NCHW outputs (SAM, LiteMedSAM, CNNs)")
    return wrappers[0].adapter


@torch.no_grad()
def cache_features(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(features, target) per batch: what the model's head pools, without the output adapter."""
    was_training = model.training
    model.eval()
    cached = []
    with disable_adapters(model):
        for x, y in batches:
            cached.append((model.features(x), y))
    model.train(was_training)
    return cached


def head_forward(model: nn.Module, features: torch.Tensor, adapter: nn.Module | None) -> torch.Tensor:
    """What a Classifier computes from cached encoder features: [CLAdapter] -> pool -> head."""
    if adapter is not None:
        features = adapter(features)
    return model.head(model.pooled(features))
