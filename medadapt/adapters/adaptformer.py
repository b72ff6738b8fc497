"""AdaptFormer: a scaled bottleneck beside the MLP only (Chen et al., 2022)."""

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
class AdaptFormerConfig(BlockAdapterConfig):
    """AdaptFormer options: bottleneck 64 on ViT-B (``bottleneck`` None: ``bottleneck_ratio`` of
    each block's width) and scale 0.1 as in the paper; ReLU."""

    summary: ClassVar[str] = "AdaptFormer: scaled parallel bottleneck beside the MLP"
    size_option: ClassVar[str | None] = "bottleneck"

    bottleneck: int | None = None
    bottleneck_ratio: float = 64 / VIT_B_WIDTH
    scale: float = 0.1
    activation: str = "relu"
    dropout: float = 0.1

    def plan(self, placement: str) -> list[tuple[str, str, float]]:
        if placement == "parallel":
            return [("mlp", "parallel", self.scale)]
        return super().plan(placement)

    def build(self, dim: int, layout: TokenLayout) -> nn.Module:
        return BottleneckAdapter(dim, layout, self.bottleneck_for(dim), self.activation, self.dropout)
