"""CIAT (Zhu et al., 2021): counter-interference adapters, for vision backbones.

CIAT pairs parallel adapters beside each sub-layer ("layer filters") with an adapter on the
embeddings that enter the encoder ("embedding filter"). Here the embedding filter is a
sequential adapter on the input of the first target block, and the layer filters are
parallel bottlenecks beside attention and MLP.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch.nn as nn

from medadapt.adapters.base import (
    VIT_B_WIDTH,
    BlockAdapterConfig,
    BottleneckAdapter,
    TokenLayout,
)


@dataclass
class CIATConfig(BlockAdapterConfig):
    """CIAT options: bottleneck 16 on ViT-B (``bottleneck`` None: ``bottleneck_ratio`` of each
    block's width), parallel layer filters, an embedding filter."""

    summary: ClassVar[str] = "CIAT: parallel layer-filter adapters plus an embedding-filter adapter"
    size_option: ClassVar[str | None] = "bottleneck"

    bottleneck: int | None = None
    bottleneck_ratio: float = 16 / VIT_B_WIDTH
    activation: str = "relu"
    embedding_filter: bool = True

    def plan(self, placement: str) -> list[tuple[str, str, float]]:
        steps = super().plan(placement)
        if self.embedding_filter:
            # "input" wraps the first target block: the adapter sees the embeddings entering it.
            steps = [("input", "pre", self.scale)] + steps
        return steps

    def build(self, dim: int, layout: TokenLayout) -> nn.Module:
        return BottleneckAdapter(dim, layout, self.bottleneck_for(dim), self.activation)
