"""MONAI dictionary transforms for the dataset presets (keys "image" and "label").

- `brats_transforms`: 3D, four MR sequences stacked as channels (t1, t1ce, t2, flair), labels
  converted to TC / WT / ET for the release, RAS orientation, resampling, per-channel
  z-score over brain voxels, random crops and flips for training.
- `image2d_transforms` (and the `busi_transforms` / `isic_transforms` presets): 2D PNG/JPG
  read as RGB, masks merged and binarised, resized, normalised by a named scheme.

2D arrays are channel-first in numpy order, (C, H, W): row index first, as torchvision and
timm expect and as matplotlib shows them.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import torch
from monai.config import KeysCollection
from monai.data import PILReader
from monai.transforms import (
    Compose,
    EnsureChannelFirstd,
    EnsureTyped,
    LoadImaged,
    MapTransform,
    NormalizeIntensityd,
    Orientationd,
    RandAdjustContrastd,
    RandAffined,
    RandCropByPosNegLabeld,
    RandFlipd,
    RandRotate90d,
    RandScaleIntensityd,
    RandShiftIntensityd,
    RandSpatialCropd,
    Resized,
    ScaleIntensityd,
    ScaleIntensityRanged,
    Spacingd,
    SpatialPadd,
)

from medadapt.data.brats import MSD_TO_STANDARD
from medadapt.data.brats_labels import ConvertBraTSLabelsd, canonical_release, release_from_name

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


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


class BraTSChannelOrderd(MapTransform):
    """Put BraTS channels in the fixed order t1, t1ce, t2, flair.

    Four separate files arrive in that order already (the datalist fixes it). An MSD Task01
    4D file arrives as FLAIR, T1w, t1gd, T2w and is reordered; with release "auto" a file is
    recognised as MSD by its name (``BRATS_001.nii.gz``).

    Arguments:
        keys: image keys (channel-first, loaded by `LoadImaged` so they carry their file name).
        release: "2021", "2023", "msd" or "auto".
        allow_missing_keys: skip absent keys.
    """

    def __init__(self, keys: KeysCollection, release: str = "auto", allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.release = "auto" if str(release).lower() == "auto" else canonical_release(release)
        self.select = SelectChannelsd(keys, MSD_TO_STANDARD, allow_missing_keys)

    def __call__(self, data: Mapping[Hashable, object]) -> dict[Hashable, object]:
        d = dict(data)
        for key in self.key_iterator(d):
            meta = getattr(d[key], "meta", {}) or {}
            name = str(meta.get("filename_or_obj", ""))
            if self.release == "msd" or (self.release == "auto" and release_from_name(name) == "msd"):
                d[key] = self.select({**d, key: d[key]})[key]
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


def pil_to_rgb(image):
    """PIL converter: three channels whatever the file holds (grey, palette, RGBA)."""
    return image.convert("RGB")


def pil_to_gray(image):
    """PIL converter: one channel, for masks saved as grey, RGB or palette PNGs."""
    return image.convert("L")


# ---------------------------------------------------------------------------- normalisation
def _minmax(keys):
    # MedSAM: per-image min-max to [0, 1] (not SAM's ImageNet mean/std).
    return [ScaleIntensityd(keys=keys, minv=0.0, maxv=1.0)]


def _imagenet(keys):
    return [
        ScaleIntensityRanged(keys=keys, a_min=0.0, a_max=255.0, b_min=0.0, b_max=1.0, clip=True),
        NormalizeIntensityd(keys=keys, subtrahend=IMAGENET_MEAN, divisor=IMAGENET_STD, channel_wise=True),
    ]


def _efficientnet_lite(keys):
    # EfficientNet-Lite's own preprocessing: (x - 127) / 128 on 0-255 pixels.
    return [NormalizeIntensityd(keys=keys, subtrahend=127.0, divisor=128.0)]


# name -> builder of the transforms that normalise an RGB image holding 0-255 values.
NORMALIZATIONS = {
    "minmax": _minmax,
    "imagenet": _imagenet,
    "efficientnet_lite": _efficientnet_lite,
}


def normalization_transforms(name: str, keys: KeysCollection = "image") -> list:
    """The transforms of normalisation scheme ``name`` (see `NORMALIZATIONS`)."""
    if name not in NORMALIZATIONS:
        raise ValueError(f"normalization must be one of {sorted(NORMALIZATIONS)}, got {name!r}")
    return NORMALIZATIONS[name](keys)


# ---------------------------------------------------------------------------- 3D BraTS
def brats_transforms(
    train: bool,
    release: str = "2021",
    roi_size: Sequence[int] = (128, 128, 128),
    pixdim: Sequence[float] | None = (1.0, 1.0, 1.0),
    crop: str = "posneg",
    num_samples: int = 1,
    with_label: bool = True,
) -> Compose:
    """Transforms for BraTS datalist entries.

    Arguments:
        train: add random crops of ``roi_size`` and flips / intensity jitter; without it the
            whole volume is kept (for sliding-window inference).
        release: label convention, "2021", "2023", "msd" or "auto" (see `ConvertBraTSLabels`).
            MSD's 4D images get their channels reordered to t1, t1ce, t2, flair
            (`BraTSChannelOrderd`).
        roi_size: training crop size; smaller volumes are zero-padded up to it first.
        pixdim: voxel spacing to resample to in mm (BraTS is 1 mm already); None keeps the
            file's spacing.
        crop: "posneg" (half the crops centred on tumour, `RandCropByPosNegLabeld`) or
            "random" (`RandSpatialCropd`).
        num_samples: crops per volume for "posneg".
        with_label: False for inference on images without labels.

    Output: "image" float32 (4, H, W, D) z-scored per channel over non-zero voxels; "label"
    float32 (3, H, W, D) holding TC, WT, ET.
    """
    if crop not in ("posneg", "random"):
        raise ValueError(f"crop must be 'posneg' or 'random', got {crop!r}")
    release = "auto" if str(release).lower() == "auto" else canonical_release(release)
    keys = ["image", "label"] if with_label else ["image"]
    steps = [LoadImaged(keys=keys, image_only=True), EnsureChannelFirstd(keys=keys)]
    steps.append(BraTSChannelOrderd(keys="image", release=release))
    if with_label:
        steps.append(ConvertBraTSLabelsd(keys="label", release=release))
    # Labels spelled out: MONAI 1.6 warns that its default is changing to the image's "space".
    steps.append(Orientationd(keys=keys, axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S"))))
    if pixdim is not None:
        modes = ("bilinear", "nearest") if with_label else ("bilinear",)
        steps.append(Spacingd(keys=keys, pixdim=tuple(pixdim), mode=modes))
    # z-score over brain voxels only: the zero background would otherwise dominate the statistics.
    steps.append(NormalizeIntensityd(keys="image", nonzero=True, channel_wise=True))
    if train:
        steps.append(SpatialPadd(keys=keys, spatial_size=tuple(roi_size)))
        if crop == "posneg" and with_label:
            steps.append(RandCropByPosNegLabeld(
                keys=keys, label_key="label", spatial_size=tuple(roi_size), pos=1, neg=1,
                num_samples=num_samples, image_key="image", image_threshold=0,
            ))
        else:
            steps.append(RandSpatialCropd(keys=keys, roi_size=tuple(roi_size), random_size=False))
        steps += [RandFlipd(keys=keys, prob=0.5, spatial_axis=axis) for axis in range(3)]
        steps += [
            RandScaleIntensityd(keys="image", factors=0.1, prob=1.0),
            RandShiftIntensityd(keys="image", offsets=0.1, prob=1.0),
        ]
    steps.append(EnsureTyped(keys=keys, dtype=torch.float32))
    return Compose(steps)


# ---------------------------------------------------------------------------- 2D images
def image2d_transforms(
    train: bool,
    task: str = "segmentation",
    size: Sequence[int] | int = (256, 256),
    normalization: str = "minmax",
    flip_axes: Sequence[int] = (1,),
    rotate90: bool = False,
    affine: bool = True,
    with_label: bool = True,
) -> Compose:
    """Transforms for 2D RGB images (PNG / JPG) and, for segmentation, their masks.

    Arguments:
        train: add the augmentations (flips, optional 90-degree rotations, small rotation and
            scaling, contrast jitter).
        task: "segmentation" ("label" is a mask path or a list of mask paths, merged by OR
            and binarised to 0 / 1) or "classification" ("label" is passed through).
        size: output (H, W) (an int means square). Images are resized bilinearly, masks by
            nearest neighbour.
        normalization: "minmax" (per-image min-max to [0, 1], MedSAM), "imagenet" ([0, 1]
            then ImageNet mean / std) or "efficientnet_lite" ((x - 127) / 128).
        flip_axes: spatial axes to flip at random (0 = vertical, 1 = horizontal).
        rotate90: add random 90-degree rotations (for orientation-free images such as
            dermoscopy).
        affine: add a small random rotation (up to 15 degrees) and scaling (up to 10 %).
        with_label: False for segmentation inference on images without masks.

    Output: "image" float32 (3, H, W); for segmentation "label" float32 (1, H, W).
    """
    if task not in ("segmentation", "classification"):
        raise ValueError(f"task must be 'segmentation' or 'classification', got {task!r}")
    size = (size, size) if isinstance(size, int) else tuple(size)
    normalize = normalization_transforms(normalization, "image")
    seg = task == "segmentation" and with_label
    keys = ["image", "label"] if seg else ["image"]
    steps = [
        LoadImaged(keys="image", reader=PILReader(converter=pil_to_rgb, reverse_indexing=False),
                   image_only=True, ensure_channel_first=True),
    ]
    if seg:
        steps += [
            LoadImaged(keys="label", reader=PILReader(converter=pil_to_gray, reverse_indexing=False),
                       image_only=True, ensure_channel_first=True),
            MergeMasksd(keys="label"),
        ]
    if train and rotate90:
        # Before the resize: a quarter turn swaps height and width, and the output must
        # still be ``size`` when it is not square.
        steps.append(RandRotate90d(keys=keys, prob=0.5, max_k=3))
    steps.append(Resized(keys=keys, spatial_size=size, mode=("bilinear", "nearest")[: len(keys)]))
    if train:
        steps += [RandFlipd(keys=keys, prob=0.5, spatial_axis=axis) for axis in flip_axes]
        if affine:
            steps.append(RandAffined(
                keys=keys, prob=0.5, rotate_range=(0.26,), scale_range=(0.1, 0.1),
                mode=("bilinear", "nearest")[: len(keys)], padding_mode="zeros",
            ))
        steps.append(RandAdjustContrastd(keys="image", prob=0.3, gamma=(0.7, 1.5)))
    steps += normalize
    steps.append(EnsureTyped(keys=keys, dtype=torch.float32))
    return Compose(steps)


def busi_transforms(
    train: bool,
    task: str = "classification",
    size: Sequence[int] | int = (256, 256),
    normalization: str = "minmax",
    with_label: bool = True,
) -> Compose:
    """BUSI preset of `image2d_transforms`: left-right flips only, since ultrasound depth
    runs top to bottom and flipping it would show impossible anatomy."""
    return image2d_transforms(train, task, size, normalization, flip_axes=(1,), rotate90=False, with_label=with_label)


def isic_transforms(
    train: bool,
    task: str = "segmentation",
    size: Sequence[int] | int = (256, 256),
    normalization: str = "minmax",
    with_label: bool = True,
) -> Compose:
    """ISIC preset of `image2d_transforms`: dermoscopy has no up or left, so flips on both
    axes and 90-degree rotations."""
    return image2d_transforms(train, task, size, normalization, flip_axes=(0, 1), rotate90=True, with_label=with_label)
