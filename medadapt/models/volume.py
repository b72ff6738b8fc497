"""3D segmentation from a 2D foundation encoder.

A volume patch is cut into slices along ``slice_axis`` and encoded slice by slice. The 3D
adapter variants inside the encoder (injected with ``spatial_dims=3`` and ``num_slices``)
mix each slice's tokens with its neighbours', and a 3D pyramid decoder returns logits for the
whole patch. Patches always hold ``num_slices`` slices, which MONAI's SlidingWindowInferer
guarantees by padding its windows to the ROI size.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from medadapt.backbones import Backbone
from medadapt.models.decoder import PyramidDecoder
from medadapt.models.export import ExportableModel
from medadapt.models.stem import InputMapping, make_stem


class VolumeSegmenter(ExportableModel, nn.Module):
    """Logits (B, K, *spatial) for volumes (B, C, *spatial).

    Arguments:
      backbone: a 2D :class:`~medadapt.backbones.Backbone`.
      num_classes: output channels (e.g. 3 sigmoid channels TC/WT/ET for BraTS).
      num_slices: slices per patch along ``slice_axis`` (the ROI size on that axis).
      in_channels, input_mapping: see ``ChannelMapping`` (BraTS: 4 sequences -> 3).
      decoder_channels: width of the decoder.
      multilabel: record that outputs are independent sigmoids.
      slice_axis: spatial axis (0, 1 or 2) across which slices are taken; 2 is the last
        spatial axis, the axial direction of MONAI's RAS-oriented (C, X, Y, Z) volumes.
      preprocess: apply the backbone's normalisation preset per volume to [0, 1] input.
    """

    def __init__(self, backbone: Backbone, num_classes: int, num_slices: int, in_channels: int | None = None,
                 input_mapping: InputMapping = None, decoder_channels: int = 32, multilabel: bool = False,
                 slice_axis: int = 2, preprocess: bool = True):
        super().__init__()
        if slice_axis not in (0, 1, 2):
            raise ValueError(f"slice_axis must be 0, 1 or 2 (a spatial axis), got {slice_axis}")
        self.backbone = backbone
        self.num_slices = int(num_slices)
        self.slice_axis = slice_axis
        self.stem = make_stem(in_channels or backbone.in_channels, backbone.in_channels, input_mapping)
        self.decoder = PyramidDecoder(3, backbone.feature_channels, num_classes, decoder_channels)
        self.multilabel = multilabel
        self.preprocess = preprocess

    def slice_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The encoder's maps for every slice of ``x``, stacked as (B, C, S, h, w) per level."""
        if x.ndim != 5:
            raise ValueError(f"VolumeSegmenter expects (B, C, X, Y, Z) volumes, got shape {tuple(x.shape)}")
        axis = 2 + self.slice_axis
        if x.shape[axis] != self.num_slices:
            raise ValueError(f"patch has {x.shape[axis]} slices on axis {self.slice_axis}; the model was "
                             f"built for num_slices={self.num_slices} (use it as the ROI size on that axis)")
        # (B, C, S, h, w) with the slice axis first among the spatial ones, slices volume-major.
        stack = x.movedim(axis, 2)
        b, c, s, h, w = stack.shape
        slices = self.stem(stack.transpose(1, 2).reshape(b * s, c, h, w))
        size = self.backbone.img_size
        if size is not None and (h, w) != (size, size):
            slices = F.interpolate(slices, size=(size, size), mode="bilinear", align_corners=False)
        if self.preprocess:
            # Per volume: min-max presets see the whole volume, not each slice alone.
            volume = slices.reshape(b, s, *slices.shape[1:]).transpose(1, 2)
            slices = self.backbone.preprocess(volume).transpose(1, 2).reshape(slices.shape)
        return [f.reshape(b, s, *f.shape[1:]).transpose(1, 2) for f in self.backbone.forward_features(slices)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.decoder(self.slice_features(x))
        stack_shape = x.movedim(2 + self.slice_axis, 2).shape[2:]
        logits = F.interpolate(logits, size=tuple(stack_shape), mode="trilinear", align_corners=False)
        return logits.movedim(2, 2 + self.slice_axis)
