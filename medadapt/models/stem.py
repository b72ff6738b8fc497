"""Map any number of input channels (e.g. BraTS' four MRI sequences) onto a backbone's three."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

STEM_MODES = ("learned", "select", "repeat")


class ChannelMapping(nn.Module):
    """An explicit, recorded mapping from ``in_channels`` to the backbone's ``out_channels``.

    Arguments:
      in_channels: channels of the input image (4 for BraTS).
      out_channels: channels the backbone takes (3).
      mode: "learned": a trainable 1x1 convolution that starts as the mean of the inputs, so
        training begins from an image the backbone understands; "select": pick ``select``
        input channels (e.g. (1, 2, 3) for t1ce, t2, flair); "repeat": a single channel
        copied ``out_channels`` times (grey-scale ultrasound, one MRI sequence).
      select: input channel indices for mode "select".
    """

    def __init__(self, in_channels: int, out_channels: int = 3, mode: str = "learned",
                 select: Sequence[int] | None = None):
        super().__init__()
        if mode not in STEM_MODES:
            raise ValueError(f"input mapping mode must be one of {STEM_MODES}, got {mode!r}")
        self.in_channels, self.out_channels, self.mode = in_channels, out_channels, mode
        self.select = list(select) if select is not None else None
        self.proj = None
        if mode == "learned":
            self.proj = nn.Conv2d(in_channels, out_channels, kernel_size=1)
            with torch.no_grad():
                self.proj.weight.fill_(1.0 / in_channels)
                self.proj.bias.zero_()
        elif mode == "select":
            if not self.select or len(self.select) != out_channels or not all(0 <= i < in_channels for i in self.select):
                raise ValueError(f"select={select} must name {out_channels} input channels in [0, {in_channels})")
        elif in_channels != 1:
            raise ValueError(f"mode 'repeat' needs 1 input channel, got {in_channels}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] != self.in_channels:
            raise ValueError(f"expected {self.in_channels} input channels, got {x.shape[1]} (shape {tuple(x.shape)})")
        if self.mode == "learned":
            return self.proj(x)
        if self.mode == "select":
            return x[:, self.select]
        return x.expand(-1, self.out_channels, *x.shape[2:])

    def extra_repr(self) -> str:
        return f"{self.in_channels} -> {self.out_channels}, mode={self.mode}, select={self.select}"


InputMapping = str | Sequence[int] | None


def make_stem(in_channels: int, backbone_channels: int, mapping: InputMapping) -> nn.Module:
    """The stem for ``mapping``: "learned", "repeat", a list of input channel indices to
    select (e.g. [1, 2, 3]), or None for the identity when the channels already match (a
    learned mapping for several channels, repeat for one, otherwise).

    A learned stem sits before the frozen encoder, so training it backpropagates through the
    whole encoder, including layers without adapters; a selection has nothing to train.
    """
    if mapping is None:
        if in_channels == backbone_channels:
            return nn.Identity()
        mapping = "repeat" if in_channels == 1 else "learned"
    if isinstance(mapping, str):
        return ChannelMapping(in_channels, backbone_channels, mapping)
    return ChannelMapping(in_channels, backbone_channels, "select", select=[int(i) for i in mapping])
