"""A light feature-pyramid decoder for prompt-free segmentation, in 2D and 3D.

Each backbone map is projected to ``channels``, merged top-down, refined by one 3x3 conv block
and classified; the caller upsamples the logits to the input size. For single-scale encoders
(ViT, SAM) it reduces to projection, refinement and classification; for 3D the maps are
stacks of slice features (B, C, D, h, w) and only the in-plane axes are upsampled between
levels.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.networks.blocks import Convolution


class PyramidDecoder(nn.Module):
    """
    Arguments:
      spatial_dims: 2, or 3 for slice stacks.
      in_channels: channels of each input map, ascending stride.
      num_classes: output channels.
      channels: decoder width.
    """

    def __init__(self, spatial_dims: int, in_channels: Sequence[int], num_classes: int, channels: int = 64):
        super().__init__()
        conv = nn.Conv2d if spatial_dims == 2 else nn.Conv3d
        self.spatial_dims = spatial_dims
        self.lateral = nn.ModuleList(conv(c, channels, kernel_size=1) for c in in_channels)
        self.refine = Convolution(spatial_dims, channels, channels, kernel_size=3, act="RELU",
                                  norm=("GROUP", {"num_groups": min(8, channels)}))
        self.classify = conv(channels, num_classes, kernel_size=1)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        x = self.lateral[-1](features[-1])
        for lateral, feature in zip(reversed(self.lateral[:-1]), reversed(features[:-1])):
            x = F.interpolate(x, size=feature.shape[2:], mode="nearest") + lateral(feature)
        return self.classify(self.refine(x))
