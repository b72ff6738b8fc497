"""AIM (Yang et al., 2023) for images: an adapter after attention and a scaled one beside the MLP.

AIM's temporal adapter has no counterpart for single images; in 3D (slice stacks) the
spatial variants of other methods carry the through-slice context instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch.nn as nn

from medadapt.adapters.base import BlockAdapterConfig, BottleneckAdapter, TokenLayout

# AIM's bottleneck ratio: the adapter's width is a quarter of the tokens' (192 in ViT-B).
BOTTLENECK_RATIO = 0.25


@dataclass
class AIMConfig(BlockAdapterConfig):
    """AIM options: bottleneck ``BOTTLENECK_RATIO`` (0.25) of the tokens' width unless given,
    MLP scale 0.5, GELU.

    Arguments:
      bottleneck: width of each adapter; None uses the paper's ratio, 0.25 of the channels
        the adapter sees (192 on a ViT-B's 768).
      mlp_scale: the factor on the adapter beside the MLP.
      activation: see :class:`BottleneckAdapter`.
    """

    summary: ClassVar[str] = "AIM: adapter after attention plus scaled adapter beside the MLP"
    default_placement: ClassVar[str] = "aim"
    size_option: ClassVar[str | None] = "bottleneck"

    bottleneck: int | None = None
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
        bottleneck = max(1, round(BOTTLENECK_RATIO * dim)) if self.bottleneck is None else self.bottleneck
        return BottleneckAdapter(dim, layout, bottleneck, self.activation)
