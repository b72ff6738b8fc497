"""Post-processing transforms that turn model outputs into files a viewer or clinician reads."""

from __future__ import annotations

import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform

from medadapt.data.brats_labels import RELEASES, canonical_release


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
