"""Real anatomy for the demos: the MNI ICBM152 2009 template shipped inside nilearn (offline).

The volumes are exactly what ``nilearn.datasets.load_mni152_template(resolution=1)`` and its
grey / white matter and brain-mask siblings return (the file scaled to a maximum of 1; the
mask is T1 > 0.2). The files are read straight from nilearn's package data because importing
``nilearn.datasets`` pulls in scikit-learn and costs seconds; the public loaders are the
fallback if nilearn ever moves its files.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import nibabel as nib
import numpy as np

_FILES = {
    "t1": "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
    "gm": "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
    "wm": "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz",
}
# nilearn's load_mni152_brain_mask threshold on the [0, 1] T1 template.
MASK_THRESHOLD = 0.2


@dataclass(frozen=True)
class Atlas:
    """MNI152 volumes on the template's 1 mm grid (197 x 233 x 189, RAS).

    Arguments:
        t1: skull-stripped T1 in [0, 1].
        gm: grey-matter probability in [0, 1].
        wm: white-matter probability in [0, 1].
        mask: brain mask (bool).
        affine: voxel-to-world (mm) matrix.
    """

    t1: np.ndarray
    gm: np.ndarray
    wm: np.ndarray
    mask: np.ndarray
    affine: np.ndarray


@lru_cache(maxsize=1)
def mni152() -> Atlas:
    """Load the 1 mm template once per process (the demos resample it to their own grid)."""
    spec = importlib.util.find_spec("nilearn")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("the demo datasets need nilearn (pip install 'medadapt[demo]')")
    data_dir = Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data"
    if all((data_dir / name).is_file() for name in _FILES.values()):
        images = {key: nib.load(data_dir / name) for key, name in _FILES.items()}
        volumes = {}
        for key, image in images.items():
            data = np.asarray(image.dataobj, dtype=np.float32)
            volumes[key] = data / data.max()
        affine = images["t1"].affine
    else:  # pragma: no cover - only if nilearn reorganises its package data
        from nilearn.datasets import (
            load_mni152_gm_template,
            load_mni152_template,
            load_mni152_wm_template,
        )

        loaded = {"t1": load_mni152_template(1), "gm": load_mni152_gm_template(1), "wm": load_mni152_wm_template(1)}
        volumes = {key: np.asarray(img.get_fdata(), dtype=np.float32) for key, img in loaded.items()}
        affine = loaded["t1"].affine
    return Atlas(
        t1=volumes["t1"], gm=volumes["gm"], wm=volumes["wm"],
        mask=volumes["t1"] > MASK_THRESHOLD, affine=np.asarray(affine, dtype=np.float64),
    )
