"""Image classification on a (usually adapted) backbone: pooled features -> linear head."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from medadapt.backbones import Backbone
from medadapt.backbones.base import POOLS
from medadapt.models.export import ExportableModel
from medadapt.models.stem import InputMapping, make_stem


def fit_to_backbone(x: torch.Tensor, backbone: Backbone) -> torch.Tensor:
    """Resize to the square input a fixed-size encoder (SAM, LiteMedSAM) requires."""
    size = backbone.img_size
    if size is None or tuple(x.shape[-2:]) == (size, size):
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)


def backbone_input(x: torch.Tensor, stem: nn.Module, backbone: Backbone, preprocess: bool) -> torch.Tensor:
    """A task model's path from a [0, 1] image to its backbone: channel mapping, resize, preset."""
    x = fit_to_backbone(stem(x), backbone)
    return backbone.preprocess(x) if preprocess else x


class Classifier(ExportableModel, nn.Module):
    """Backbone features, pooled (class token, or mean over the grid), into a linear head.

    With CLAdapter injected, the pooled tokens are CLAdapter's output, which makes this the
    paper's LayerNorm -> FR-ResBlocks -> LayerNorm -> mean pool -> linear head (on a ViT,
    CLAdapter's output class token is that mean, so either pooling reads it).

    Arguments:
      backbone: a :class:`~medadapt.backbones.Backbone`.
      num_classes: number of classes.
      in_channels: channels of the input image (default: the backbone's).
      input_mapping: how extra/fewer channels reach the backbone (see ``ChannelMapping``).
      dropout: dropout before the head.
      preprocess: apply the backbone's normalisation preset to [0, 1] input.
      pool: "cls" (the encoder's class token, timm ViTs) or "mean" (the mean of the last
        feature map: a ViT's patch tokens, a CNN's grid); None takes the backbone's default,
        its class token where it has one (and the model pools it), else the mean.
    """

    def __init__(self, backbone: Backbone, num_classes: int, in_channels: int | None = None,
                 input_mapping: InputMapping = None, dropout: float = 0.0, preprocess: bool = True,
                 pool: str | None = None):
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if pool is not None and pool not in POOLS:
            raise ValueError(f"pool must be one of {POOLS} or None, got {pool!r}")
        if pool == "cls" and not backbone.has_class_token:
            raise ValueError(f"pool='cls' needs a class token, and {backbone.name} has none; use pool='mean'")
        self.backbone = backbone
        self.stem = make_stem(in_channels or backbone.in_channels, backbone.in_channels, input_mapping)
        self.preprocess = preprocess
        self.pool = pool or backbone.default_pool
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(backbone.out_channels, num_classes))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """What the head pools: the backbone's class token (B, C) with pool="cls", else its
        last feature map (B, C, h, w)."""
        x = backbone_input(x, self.stem, self.backbone, self.preprocess)
        return self.backbone.class_token(x) if self.pool == "cls" else self.backbone(x)

    def pooled(self, features: torch.Tensor) -> torch.Tensor:
        """(B, C) head input from :meth:`features`' output."""
        return features if features.ndim == 2 else features.flatten(2).mean(dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pooled(self.features(x)))
