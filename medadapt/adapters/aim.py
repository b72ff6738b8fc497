"""AIM (Yang et al., 2023) for images: an adapter after attention and a scaled one beside the MLP.

AIM's temporal adapter has no counterpart for single images; in 3D (slice stacks) the
spatial variants of other methods carry the through-slice context instead.
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
class AIMConfig(BlockAdapterConfig):
    """AIM options: bottleneck 192 on ViT-B, MLP scale 0.5, GELU.

    Arguments:
      bottleneck: width of each adapter; None uses the paper's ratio ``bottleneck_ratio``, 0.25
        of the channels the adapter sees (see `AdapterConfig.bottleneck_for`).
      mlp_scale: the factor on the adapter beside the MLP.
      activation: see :class:`BottleneckAdapter`.
    """

    summary: ClassVar[str] = "AIM: adapter after attention plus scaled adapter beside the MLP"
    default_placement: ClassVar[str] = "aim"
    size_option: ClassVar[str | None] = "bottleneck"

    bottleneck: int | None = None
    bottleneck_ratio: float = 192 / VIT_B_WIDTH
    mlp_scale: float = 0.5
    activation: str = "gelu"

    @classmethod
    def placements(cls) -> tuple[str, ...]:
        return ("aim", "parallel", "sequential", "block", "stage")

    def plan(self, placement: str) -> list[tuple[str, str, float]]:
        if placement == "aim":
            return [("attn", "sequential", self.scale), ("mlp", "parallel", self.mlp_scale)]
        return super().plan(placement)

    def build(self, dim: int, layout: TokenLayout) -> nn.Module:
        return BottleneckAdapter(dim, layout, self.bottleneck_for(dim), self.activation)
