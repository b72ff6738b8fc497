"""MONAI dictionary transforms that several datasets' bundles use (keys "image" and "label").

The chains themselves are each bundle's (``train#transforms``, ``validate#transforms``,
``transforms`` in inference.json), where users read and edit them; a dataset's own transforms
live in its folder (``medadapt/datasets/<name>/``). 2D arrays are channel-first in numpy order,
(C, H, W): row index first, as torchvision and timm expect and as matplotlib shows them.
"""

from __future__ import annotations

import logging
from collections.abc import Hashable, Mapping, Sequence

import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform

from medadapt.data.errors import DatasetError

logger = logging.getLogger("medadapt")

# ---------------------------------------------------------------------------- small transforms
class SelectChannelsd(MapTransform):
    """Keep and reorder channels: ``out[i] = in[channels[i]]`` (e.g. MSD's FLAIR-first order).

    Arguments:
        keys: keys of channel-first arrays.
        channels: input channel index for each output channel.
        allow_missing_keys: skip absent keys.
    """

    def __init__(self, keys: KeysCollection, channels: Sequence[int], allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.channels = list(channels)

    def __call__(self, data: Mapping[Hashable, object]) -> dict[Hashable, object]:
        d = dict(data)
        for key in self.key_iterator(d):
            image = d[key]
            if image.shape[0] <= max(self.channels):
                raise ValueError(
                    f"{key!r} of case {d.get('case', '?')} has {image.shape[0]} channels, "
                    f"cannot select {self.channels}"
                )
            d[key] = image[self.channels]
        return d


class MergeMasksd(MapTransform):
    """Merge the channels of a mask by logical OR into one binary channel (float 0 / 1).

    Several mask files given as a list to `LoadImaged` arrive stacked as channels (BUSI's
    ``_mask`` / ``_mask_1`` files); any non-zero pixel counts as foreground.

    Arguments:
        keys: mask keys (usually "label").
        allow_missing_keys: skip absent keys.
    """

    def __call__(self, data: Mapping[Hashable, object]) -> dict[Hashable, object]:
        d = dict(data)
        for key in self.key_iterator(d):
            mask = d[key]
            d[key] = (mask > 0).any(dim=0, keepdim=True).to(torch.float32)
        return d


class CheckFinited(MapTransform):
    """Refuse images holding NaN or infinite values, naming the file: a model given them
    returns an all-background answer that looks like a result.

    Arguments:
        keys: image keys (loaded by `LoadImaged`, so they carry their file name).
        allow_missing_keys: skip absent keys.
    """

    def __call__(self, data: Mapping[Hashable, object]) -> dict[Hashable, object]:
        d = dict(data)
        for key in self.key_iterator(d):
            value = torch.as_tensor(d[key])
            if value.is_floating_point() and not torch.isfinite(value).all():
                bad = int((~torch.isfinite(value)).sum())
                meta = getattr(d[key], "meta", {}) or {}
                source = meta.get("filename_or_obj") or d.get("case") or key
                raise DatasetError(f"{source}: {bad} voxel(s) of {key!r} are NaN or infinite; "
                                   "fix or mask them before running the model")
        return d


def pil_to_rgb(image):
    """PIL converter: three channels whatever the file holds (grey, palette, RGBA)."""
    return image.convert("RGB")


def pil_to_gray(image):
    """PIL converter: one channel, for masks saved as grey, RGB or palette PNGs."""
    return image.convert("L")
