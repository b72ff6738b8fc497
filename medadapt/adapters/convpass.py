"""Convpass: convolutional bypasses beside attention and MLP (Jie and Deng, 2022)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from medadapt.adapters.base import (
    VIT_B_WIDTH,
    BlockAdapterConfig,
    BottleneckAdapter,
    TokenLayout,
)


class ConvBypass(BottleneckAdapter):
    """Down -> QuickGELU -> 3x3 (3x3x3 in 3D) full convolution -> QuickGELU -> Up.

    Patch tokens are convolved on their grid. Each prefix token (CLS, registers) goes through
    the same convolution as an image of one pixel, as the original code convolves the class
    token: with zero padding only the kernel's centre tap and the bias reach it.
    """

    def __init__(self, dim: int, layout: TokenLayout, bottleneck: int = 8, dropout: float = 0.1):
        super().__init__(dim, layout, bottleneck, "quickgelu", dropout, activate_before_mix=True)
        conv = nn.Conv2d if layout.spatial_dims == 2 else nn.Conv3d
        self.conv = conv(bottleneck, bottleneck, 3, padding=1)
        # Identity-like start so the bypass begins as a plain adapter (as Convpass initialises).
        with torch.no_grad():
            self.conv.weight.zero_()
            centre = (slice(None), slice(None)) + (1,) * layout.spatial_dims
            self.conv.weight[centre] += torch.eye(bottleneck)
            self.conv.bias.zero_()

    def mix(self, h: torch.Tensor) -> torch.Tensor:
        out = self.layout.map_spatial(h, self.conv)
        prefix = self.layout.num_prefix
        if prefix:
            centre = self.conv.weight[(slice(None), slice(None)) + tuple(k // 2 for k in self.conv.kernel_size)]
            out = torch.cat([F.linear(h[:, :prefix], centre, self.conv.bias), out[:, prefix:]], dim=1)
        return self.act(out)


@dataclass
class ConvpassConfig(BlockAdapterConfig):
    """Convpass options: bottleneck 8 on ViT-B (``bottleneck`` None: ``bottleneck_ratio`` of each
    block's width), parallel to attention and MLP, scale 1."""

    summary: ClassVar[str] = "Convpass: 3x3 convolutional bypass beside attention and MLP"
    has_spatial_part: ClassVar[bool] = True
    size_option: ClassVar[str | None] = "bottleneck"

    bottleneck: int | None = None
    bottleneck_ratio: float = 8 / VIT_B_WIDTH
    dropout: float = 0.1

    def build(self, dim: int, layout: TokenLayout) -> nn.Module:
        return ConvBypass(dim, layout, self.bottleneck_for(dim), self.dropout)
