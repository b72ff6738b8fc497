"""BraTS's own transforms: the sequences' order and grid, and predicted regions back to label values."""

from __future__ import annotations

import logging
from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import NibabelReader
from monai.transforms import MapTransform

from medadapt.data.errors import DatasetError
from medadapt.data.transforms import SelectChannelsd
from medadapt.datasets.brats import MSD_TO_STANDARD
from medadapt.datasets.brats.labels import (
    RELEASES,
    canonical_release,
    release_from_name,
)

logger = logging.getLogger("medadapt")


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


def regions_to_labels(regions: torch.Tensor, release: str = "2021") -> torch.Tensor:
    """(3, ...) binary TC/WT/ET channels -> (1, ...) label map in ``release``'s values.

    The regions are nested by construction: core only inside the whole tumour, enhancing only
    inside the core. A voxel's label is its innermost region, so the file's whole tumour is
    exactly the WT channel (the most reliable of the three) and a core or enhancing voxel the
    model put outside it, where a label map could only show it by growing the whole tumour,
    is dropped.
    """
    spec = RELEASES[canonical_release(release)]
    (edema,) = set(spec.wt) - set(spec.tc)
    (core,) = set(spec.tc) - set(spec.et)
    (enhancing,) = spec.et
    wt = regions[1] > 0.5
    tc = (regions[0] > 0.5) & wt
    et = (regions[2] > 0.5) & tc
    out = torch.zeros_like(regions[:1], dtype=torch.uint8)
    out[0][wt] = edema
    out[0][tc] = core
    out[0][et] = enhancing
    return out


class RegionsToLabelsd(MapTransform):
    """Dictionary form of :func:`regions_to_labels`; keeps MONAI metadata on the result."""

    def __init__(self, keys: KeysCollection, release: str = "2021", allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.release = canonical_release(release)

    def __call__(self, data):
        d = dict(data)
        for key in self.key_iterator(d):
            value = d[key]
            labels = regions_to_labels(torch.as_tensor(value), self.release)
            if hasattr(value, "copy_meta_from"):
                from monai.data import MetaTensor

                labels = MetaTensor(labels, meta=value.meta, applied_operations=value.applied_operations)
            d[key] = labels
        return d
