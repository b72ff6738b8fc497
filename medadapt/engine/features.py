"""Cached encoder features for methods that never change the encoder's output.

Linear probing and CLAdapter's stage 1 train only what comes after a frozen encoder, so the
encoder can run once under ``no_grad`` and every later epoch reads its features from memory.
"""

from __future__ import annotations

from typing import Iterable

import torch
import torch.nn as nn

from medadapt.adapters.wrappers import Adapted
from medadapt.injection import disable_adapters, injection_record


def output_adapter(model: nn.Module) -> nn.Module | None:
    """The module applied to the encoder's output (CLAdapter), or None for linear probing."""
    record = injection_record(model)
    if record is None or record["method"] not in ("linear", "cladapter"):
        method = None if record is None else record["method"]
        raise ValueError(f"cached features need a frozen encoder (linear or cladapter stage 1), not {method!r}")
    if record.get("stage", 1) != 1:
        raise ValueError("CLAdapter stage 2 trains the encoder: its features cannot be cached")
    wrappers = [m for m in model.modules() if isinstance(m, Adapted) and m.mode == "replace"]
    if not wrappers:
        return None
    if wrappers[0].adapter.layout.kind != "channels_first":
        raise ValueError("cached CLAdapter features are supported for encoders with NCHW outputs (SAM, LiteMedSAM, CNNs)")
    return wrappers[0].adapter


@torch.no_grad()
def cache_features(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(features, target) per batch: the encoder's output maps without the output adapter."""
    was_training = model.training
    model.eval()
    cached = []
    with disable_adapters(model):
        for x, y in batches:
            cached.append((model.features(x), y))
    model.train(was_training)
    return cached


def head_forward(model: nn.Module, features: torch.Tensor, adapter: nn.Module | None) -> torch.Tensor:
    """What a Classifier computes from cached encoder maps: [CLAdapter] -> mean pool -> head."""
    if adapter is not None:
        features = adapter(features)
    return model.head(features.flatten(2).mean(dim=-1))
