"""Houlsby bottleneck adapter: Down -> activation -> Up, on the output of attention and MLP."""

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
class HoulsbyConfig(BlockAdapterConfig):
    """Houlsby et al. (2019): sequential bottleneck adapters inside both residual branches;
    bottleneck 16 on ViT-B (``bottleneck`` None: ``bottleneck_ratio`` of each block's width)."""

    summary: ClassVar[str] = "Houlsby bottleneck adapter after attention and after the MLP"
    default_placement: ClassVar[str] = "sequential"
    size_option: ClassVar[str | None] = "bottleneck"

    bottleneck: int | None = None
    bottleneck_ratio: float = 16 / VIT_B_WIDTH
    activation: str = "gelu"
    dropout: float = 0.0

    def build(self, dim: int, layout: TokenLayout) -> nn.Module:
        return BottleneckAdapter(dim, layout, self.bottleneck_for(dim), self.activation, self.dropout)
