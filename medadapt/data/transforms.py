"""MONAI dictionary transforms for the dataset presets (keys "image" and "label").

Each chain is written once, as a MONAI config (``brats_transform_config``,
``image2d_transform_config``): the bundles embed that config, so a user reads and overrides
every step (``--train#preprocessing#transforms#3#prob 0.2``), and the Python functions
(`brats_transforms`, `image2d_transforms`, `busi_transforms`, `isic_transforms`) instantiate
the same config. A config refers to the bundle's settings by reference (``@image_size``,
``@roi_size``, ``@pixdim``, ``@release``); the Python functions supply them as values.

- BraTS (3D): four MR sequences stacked as channels (t1, t1ce, t2, flair; four files on
  different grids are resampled onto the first's, `SequenceGridReader`), labels converted
  to TC / WT / ET for the release, RAS orientation, resampling, per-channel z-score over
  brain voxels, random crops and flips for training.
- 2D PNG/JPG: read as RGB, masks merged and binarised, resized, scaled to [0, 1] (the model
  applies its backbone's own normalisation).

Stages: "train" (labels, random augmentation), "validate" (labels, deterministic) and
"infer" (no labels). Every stage refuses non-finite voxels, naming the file.

2D arrays are channel-first in numpy order, (C, H, W): row index first, as torchvision and
timm expect and as matplotlib shows them.
"""

from __future__ import annotations

import logging
from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import NibabelReader
from monai.transforms import Compose, MapTransform

from medadapt.data.brats import MODALITIES, MSD_TO_STANDARD
from medadapt.data.brats_labels import canonical_release, release_from_name
from medadapt.data.errors import DatasetError

logger = logging.getLogger("medadapt")

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


class SequenceGridReader(NibabelReader):
    """MONAI's NIfTI reader for the separate sequence files of one case, stacked as channels:
    every file after the first must lie on the first's grid (shape and voxel-to-world affine,
    within ``atol`` mm), and one that does not is resampled onto it, with a warning in the log
    naming both files and grids. (MONAI's own reader refuses different affines with an error
    that names neither file, and stacks what it can.) A single file is read as it is.

    Arguments:
      names: what the files are, in order (e.g. t1, t1ce, t2, flair), for the log.
      order: spline order of the resampling (1: linear).
      atol: largest difference of affine entries, in mm, still counted as the same grid.
      kwargs: passed to `NibabelReader`.
    """

    def __init__(self, names: Sequence[str] = (), order: int = 1, atol: float = 1e-3, **kwargs) -> None:
        super().__init__(**kwargs)
        self.names, self.order, self.atol = list(names), int(order), float(atol)

    def get_data(self, img):
        images = list(img) if isinstance(img, (list, tuple)) else [img]
        if len(images) > 1:
            images = [images[0], *(self._on_grid_of_first(images, n) for n in range(1, len(images)))]
        return super().get_data(images if len(images) > 1 else images[0])

    def _on_grid_of_first(self, images: list, n: int):
        import nibabel as nib
        from nibabel.processing import resample_from_to

        first, image = images[0], images[n]
        same_shape = first.shape[:3] == image.shape[:3] and len(image.shape) == len(first.shape)
        if same_shape and np.allclose(image.affine, first.affine, atol=self.atol, rtol=0):
            # The same grid up to header rounding: carry the first's affine, as MONAI's stacking expects.
            return nib.Nifti1Image(np.asanyarray(image.dataobj), first.affine, image.header)
        if len(image.shape) != 3 or len(first.shape) != 3:
            raise DatasetError(f"{self._name(n)} ({image.get_filename()}) of shape {image.shape} cannot be put on the "
                               f"grid of {self._name(0)} ({first.get_filename()}, shape {first.shape}): separate "
                               "sequence files must be 3D volumes")
        resampled = resample_from_to(image, first, order=self.order, cval=0.0)
        if np.count_nonzero(np.asanyarray(image.dataobj)) and not np.count_nonzero(resampled.dataobj):
            raise DatasetError(f"{self._name(n)} ({image.get_filename()}) does not overlap the grid of "
                               f"{self._name(0)} ({first.get_filename()}): check both files' orientation headers")
        logger.warning("%s (%s): shape %s, spacing %s mm differs from %s (%s): shape %s, spacing %s mm; resampled "
                       "onto %s's grid (spline order %d)", self._name(n), image.get_filename(), image.shape,
                       _spacing(image), self._name(0), first.get_filename(), first.shape, _spacing(first),
                       self._name(0), self.order)
        return resampled

    def _name(self, n: int) -> str:
        return self.names[n] if n < len(self.names) else f"file {n + 1}"


def _spacing(image) -> list[float]:
    import nibabel as nib

    return [round(float(v), 3) for v in nib.affines.voxel_sizes(image.affine)]


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



# ---------------------------------------------------------------------------- configs
STAGES = ("train", "validate", "infer")


def _step(target: str, **args) -> dict:
    """One MONAI config item."""
    return {"_target_": target, **args}


def _callable(target: str) -> dict:
    """A config item that is the function itself, not its result."""
    return {"_target_": target, "_mode_": "callable"}


def _is_reference(value) -> bool:
    return isinstance(value, str) and value.startswith("@")


def _unless_none(value) -> bool | str:
    """``_disabled_`` of an optional step: decided now for a value, when the bundle is parsed
    for a reference."""
    return f"${value} is None" if _is_reference(value) else value is None


def _check_stage(stage: str) -> None:
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")


def _normalization_steps(name: str, keys: str = "image") -> list[dict]:
    # Input scaled to [0, 1] for "minmax" (MedSAM; the models then apply their backbone's
    # own normalisation); the others reproduce backbone presets in the data for users who
    # build models without it.
    steps = {
        "minmax": [_step("ScaleIntensityd", keys=keys, minv=0.0, maxv=1.0)],
        "imagenet": [
            _step("ScaleIntensityRanged", keys=keys, a_min=0.0, a_max=255.0, b_min=0.0, b_max=1.0, clip=True),
            _step("NormalizeIntensityd", keys=keys, subtrahend=list(IMAGENET_MEAN), divisor=list(IMAGENET_STD),
                  channel_wise=True),
        ],
        # EfficientNet-Lite's own preprocessing: (x - 127) / 128 on 0-255 pixels.
        "efficientnet_lite": [_step("NormalizeIntensityd", keys=keys, subtrahend=127.0, divisor=128.0)],
    }
    if name not in steps:
        raise ValueError(f"normalization must be one of {sorted(steps)}, got {name!r}")
    return steps[name]


NORMALIZATIONS = ("minmax", "imagenet", "efficientnet_lite")


def instantiate(config: dict, **settings):
    """Build the transform ``config`` with ``settings`` as the values its references name."""
    from monai.bundle import ConfigParser

    parser = ConfigParser({**settings, "transform": config})
    return parser.get_parsed_content("transform")


# ---------------------------------------------------------------------------- 3D BraTS
def brats_transform_config(
    stage: str,
    release="@release",
    roi_size="@roi_size",
    pixdim="@pixdim",
    crop: str = "posneg",
    num_samples: int = 1,
) -> dict:
    """The MONAI config of the BraTS chain for ``stage`` (see `brats_transforms`).

    ``release``, ``roi_size`` and ``pixdim`` are values or references to bundle settings.
    """
    _check_stage(stage)
    if crop not in ("posneg", "random"):
        raise ValueError(f"crop must be 'posneg' or 'random', got {crop!r}")
    if not _is_reference(release):
        release = "auto" if str(release).lower() == "auto" else canonical_release(release)
    keys = ["image"] if stage == "infer" else ["image", "label"]
    steps = [
        # Separate sequence files arrive as a list in MODALITIES order; the reader checks their grids.
        _step("LoadImaged", keys=keys, image_only=True,
              reader=_step("medadapt.data.transforms.SequenceGridReader", names=list(MODALITIES))),
        _step("EnsureChannelFirstd", keys=keys),
        _step("medadapt.data.transforms.CheckFinited", keys="image"),
        _step("medadapt.data.transforms.BraTSChannelOrderd", keys="image", release=release),
    ]
    if stage != "infer":
        steps.append(_step("medadapt.data.brats_labels.ConvertBraTSLabelsd", keys="label", release=release))
    # Labels spelled out: MONAI 1.6 warns that its default is changing to the image's "space".
    steps.append(_step("Orientationd", keys=keys, axcodes="RAS", labels=[["L", "R"], ["P", "A"], ["I", "S"]]))
    steps.append(_step("Spacingd", keys=keys, pixdim=pixdim, mode=["bilinear", "nearest"][: len(keys)],
                       _disabled_=_unless_none(pixdim)))
    # z-score over brain voxels only: the zero background would otherwise dominate the statistics.
    steps.append(_step("NormalizeIntensityd", keys="image", nonzero=True, channel_wise=True))
    if stage == "train":
        steps.append(_step("SpatialPadd", keys=keys, spatial_size=roi_size))
        if crop == "posneg":
            steps.append(_step("RandCropByPosNegLabeld", keys=keys, label_key="label", spatial_size=roi_size, pos=1,
                               neg=1, num_samples=num_samples, image_key="image", image_threshold=0))
        else:
            steps.append(_step("RandSpatialCropd", keys=keys, roi_size=roi_size, random_size=False))
        steps += [_step("RandFlipd", keys=keys, prob=0.5, spatial_axis=axis) for axis in range(3)]
        steps += [
            _step("RandScaleIntensityd", keys="image", factors=0.1, prob=1.0),
            _step("RandShiftIntensityd", keys="image", offsets=0.1, prob=1.0),
        ]
    steps.append(_step("EnsureTyped", keys=keys, dtype="$torch.float32"))
    return _step("Compose", transforms=steps)


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
    if train and not with_label:
        raise ValueError("training transforms need labels (with_label=True)")
    stage = "train" if train else ("validate" if with_label else "infer")
    config = brats_transform_config(stage, crop=crop, num_samples=num_samples)
    return instantiate(config, release=release, roi_size=list(roi_size), pixdim=None if pixdim is None else list(pixdim))


# ---------------------------------------------------------------------------- 2D images
def image2d_transform_config(
    stage: str,
    task: str = "segmentation",
    size="@image_size",
    normalization: str = "minmax",
    flip_axes: Sequence[int] = (1,),
    rotate90: bool = False,
    affine: bool = True,
) -> dict:
    """The MONAI config of the 2D chain for ``stage`` (see `image2d_transforms`).

    ``size`` is a value (int or (H, W)) or a reference to a bundle setting.
    """
    _check_stage(stage)
    if task not in ("segmentation", "classification"):
        raise ValueError(f"task must be 'segmentation' or 'classification', got {task!r}")
    if not _is_reference(size):
        size = [int(size), int(size)] if isinstance(size, int) else [int(s) for s in size]
    else:
        # A bundle's image_size is one number (a square) or (H, W).
        size = f"$[{size}, {size}] if isinstance({size}, int) else list({size})"
    normalize = _normalization_steps(normalization)
    seg = task == "segmentation" and stage != "infer"
    keys = ["image", "label"] if seg else ["image"]
    interpolation = ["bilinear", "nearest"][: len(keys)]
    steps = [
        _step("LoadImaged", keys="image", image_only=True, ensure_channel_first=True,
              reader=_step("PILReader", converter=_callable("medadapt.data.transforms.pil_to_rgb"),
                           reverse_indexing=False)),
    ]
    if seg:
        steps += [
            _step("LoadImaged", keys="label", image_only=True, ensure_channel_first=True,
                  reader=_step("PILReader", converter=_callable("medadapt.data.transforms.pil_to_gray"),
                               reverse_indexing=False)),
            _step("medadapt.data.transforms.MergeMasksd", keys="label"),
        ]
    train = stage == "train"
    if train and rotate90:
        # Before the resize: a quarter turn swaps height and width, and the output must
        # still be ``size`` when it is not square.
        steps.append(_step("RandRotate90d", keys=keys, prob=0.5, max_k=3))
    steps.append(_step("Resized", keys=keys, spatial_size=size, mode=interpolation))
    if train:
        steps += [_step("RandFlipd", keys=keys, prob=0.5, spatial_axis=axis) for axis in flip_axes]
        if affine:
            steps.append(_step("RandAffined", keys=keys, prob=0.5, rotate_range=[0.26], scale_range=[0.1, 0.1],
                               mode=interpolation, padding_mode="zeros"))
        steps.append(_step("RandAdjustContrastd", keys="image", prob=0.3, gamma=[0.7, 1.5]))
    steps += normalize
    steps.append(_step("EnsureTyped", keys=keys, dtype="$torch.float32"))
    return _step("Compose", transforms=steps)


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
    if train and not with_label and task == "segmentation":
        raise ValueError("training transforms need labels (with_label=True)")
    stage = "train" if train else ("validate" if with_label else "infer")
    return instantiate(image2d_transform_config(stage, task, size, normalization, flip_axes, rotate90, affine))


# Augmentations per dataset: ultrasound depth runs top to bottom, so BUSI is flipped left-right
# only; dermoscopy has no up or left, so ISIC is flipped both ways and turned by quarter turns.
BUSI_AUGMENTATION = {"flip_axes": (1,), "rotate90": False}
ISIC_AUGMENTATION = {"flip_axes": (0, 1), "rotate90": True}


def busi_transforms(
    train: bool,
    task: str = "classification",
    size: Sequence[int] | int = (256, 256),
    normalization: str = "minmax",
    with_label: bool = True,
) -> Compose:
    """BUSI preset of `image2d_transforms`: left-right flips only, since ultrasound depth
    runs top to bottom and flipping it would show impossible anatomy."""
    return image2d_transforms(train, task, size, normalization, with_label=with_label, **BUSI_AUGMENTATION)


def isic_transforms(
    train: bool,
    task: str = "segmentation",
    size: Sequence[int] | int = (256, 256),
    normalization: str = "minmax",
    with_label: bool = True,
) -> Compose:
    """ISIC preset of `image2d_transforms`: dermoscopy has no up or left, so flips on both
    axes and 90-degree rotations."""
    return image2d_transforms(train, task, size, normalization, with_label=with_label, **ISIC_AUGMENTATION)
