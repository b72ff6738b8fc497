"""Houlsby bottleneck adapter: Down -> activation -> Up, on the output of attention and MLP."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch.nn as nn

from medadapt.adapters.base import BlockAdapterConfig, BottleneckAdapter, TokenLayout


@dataclass
class HoulsbyConfig(BlockAdapterConfig):
    """Houlsby et al. (2019): sequential bottleneck adapters inside both residual branches."""

    summary: ClassVar[str] = "Houlsby bottleneck adapter after attention and after the MLP"
    default_placement: ClassVar[str] = "sequential"
    size_option: ClassVar[str | None] = "bottleneck"

    bottleneck: int = 16
    activation: str = "gelu"
    dropout: float = 0.0

    def build(self, dim: int, layout: TokenLayout) -> nn.Module:
        return BottleneckAdapter(dim, layout, self.bottleneck, self.activation, self.dropout)
