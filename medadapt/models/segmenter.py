"""Prompt-free 2D segmentation: an adapted encoder and a light pyramid decoder.

MedSAM needs a box for every structure; this head segments without prompts, using the same
(adapted) encoder, so a model can be run over whole datasets and served automatically.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from medadapt.backbones import Backbone
from medadapt.models.classifier import backbone_input
from medadapt.models.decoder import PyramidDecoder
from medadapt.models.export import ExportableModel
from medadapt.models.stem import InputMapping, make_stem


class Segmenter(ExportableModel, nn.Module):
    """Logits (B, K, H, W) at the input's resolution.

    Arguments:
      backbone: a :class:`~medadapt.backbones.Backbone`.
      num_classes: output channels: classes including background for softmax, or one per
        (possibly overlapping) region for sigmoid (``multilabel=True``, e.g. TC/WT/ET).
      in_channels, input_mapping: see ``ChannelMapping``.
      decoder_channels: width of the decoder.
      multilabel: record that outputs are independent sigmoids (used by post-processing).
      preprocess: apply the backbone's normalisation preset to [0, 1] input.
    """

    def __init__(self, backbone: Backbone, num_classes: int, in_channels: int | None = None,
                 input_mapping: InputMapping = None, decoder_channels: int = 64, multilabel: bool = False,
                 preprocess: bool = True):
        super().__init__()
        self.backbone = backbone
        self.stem = make_stem(in_channels or backbone.in_channels, backbone.in_channels, input_mapping)
        self.decoder = PyramidDecoder(2, backbone.feature_channels, num_classes, decoder_channels)
        self.multilabel = multilabel
        self.preprocess = preprocess

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        x = backbone_input(x, self.stem, self.backbone, self.preprocess)
        logits = self.decoder(self.backbone.forward_features(x))
        return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
