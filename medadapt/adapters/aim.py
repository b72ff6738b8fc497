"""AIM (Yang et al., 2023) for images: an adapter after attention and a scaled one beside the MLP.

AIM's temporal adapter has no counterpart for single images; in 3D (slice stacks) the
spatial variants of other methods carry the through-slice context instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch.nn as nn

from medadapt.adapters.base import BlockAdapterConfig, BottleneckAdapter, TokenLayout


@dataclass
class AIMConfig(BlockAdapterConfig):
    """AIM options: bottleneck 16 (ratio 0.25 of d in the paper's ViT-B), MLP scale 0.5."""

    summary: ClassVar[str] = "AIM: adapter after attention plus scaled adapter beside the MLP"
    default_placement: ClassVar[str] = "aim"

    bottleneck: int = 16
    mlp_scale: float = 0.5
    activation: str = "gelu"

    @classmethod
    def placements(cls) -> tuple[str, ...]:
        return ("aim", "parallel", "sequential", "block")

    def plan(self, placement: str) -> list[tuple[str, str, float]]:
        if placement == "aim":
            return [("attn", "sequential", self.scale), ("mlp", "parallel", self.mlp_scale)]
        return super().plan(placement)

    def build(self, dim: int, layout: TokenLayout) -> nn.Module:
        return BottleneckAdapter(dim, layout, self.bottleneck, self.activation)
