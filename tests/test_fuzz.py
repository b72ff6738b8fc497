"""Fuzzing the loaders and transforms: whatever users feed in either loads into the shapes the
models expect or stops with a clear error that names the file. Nothing else may escape."""

from __future__ import annotations

import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from fixtures_data import bundle_transforms
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from medadapt import data
from medadapt.data.errors import DatasetError
from medadapt.datasets.brats import BRATS, brats_datalist

FUZZ = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _write_png(path: Path, kind: str, height: int, width: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    if kind == "corrupt":
        path.write_bytes(rng.bytes(int(rng.integers(0, 200))))
    elif kind == "truncated":
        Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).save(path, format="PNG")
        path.write_bytes(path.read_bytes()[: max(8, path.stat().st_size // 2)])
    elif kind == "I;16":
        Image.fromarray(rng.integers(0, 65535, (height, width), dtype=np.uint16)).save(path, format="PNG")
    else:
        channels = {"L": 1, "RGB": 3, "RGBA": 4}[kind]
        array = rng.integers(0, 255, (height, width, channels), dtype=np.uint8)
        Image.fromarray(array[..., 0] if channels == 1 else array, mode=kind).save(path, format="PNG")


@FUZZ
@given(
    image_kind=st.sampled_from(["L", "RGB", "RGBA", "I;16", "corrupt", "truncated"]),
    mask_kind=st.sampled_from(["L", "RGB", "corrupt"]),
    height=st.integers(1, 48), width=st.integers(1, 48),
    mask_same_shape=st.booleans(), seed=st.integers(0, 10_000),
)
def test_2d_segmentation_inputs_load_or_fail_clearly(image_kind, mask_kind, height, width, mask_same_shape, seed):
    with tempfile.TemporaryDirectory() as tmp:
        image, mask = Path(tmp) / "case.png", Path(tmp) / "case_mask.png"
        _write_png(image, image_kind, height, width, seed)
        mh, mw = (height, width) if mask_same_shape else (height + 1, width)
        _write_png(mask, mask_kind, mh, mw, seed + 1)
        entry = [{"image": str(image), "label": str(mask), "case": "case"}]
        try:
            data.validate_datalist(entry, "segmentation")
        except DatasetError as error:
            assert "case" in str(error)
            return
        sample = bundle_transforms("dka_busi_seg", "train", image_size=32)(entry[0])
        assert tuple(sample["image"].shape) == (3, 32, 32) and tuple(sample["label"].shape) == (1, 32, 32)
        assert np.isfinite(np.asarray(sample["image"])).all()
        assert set(np.unique(np.asarray(sample["label"]))) <= {0.0, 1.0}


def _affine(rng: np.random.Generator) -> np.ndarray:
    axes = rng.permutation(3)
    affine = np.zeros((4, 4))
    for row, axis in enumerate(axes):
        affine[row, axis] = rng.choice([-1.0, 1.0]) * rng.uniform(0.5, 3.0)
    affine[:3, 3] = rng.uniform(-50, 50, 3)
    affine[3, 3] = 1.0
    return affine


@FUZZ
@given(
    shape=st.lists(st.integers(2, 12), min_size=2, max_size=4),
    dtype=st.sampled_from(["int16", "uint8", "float32", "float64"]),
    poison=st.sampled_from([None, "nan", "inf"]),
    label_values=st.lists(st.sampled_from([0, 1, 2, 3, 4, 7]), min_size=1, max_size=4),
    modality_shape_differs=st.booleans(), seed=st.integers(0, 10_000),
)
def test_brats_cases_load_or_fail_clearly(shape, dtype, poison, label_values, modality_shape_differs, seed):
    rng = np.random.default_rng(seed)
    affine = _affine(rng)
    with tempfile.TemporaryDirectory() as tmp:
        case = "BraTS2021_00007"
        folder = Path(tmp) / case
        folder.mkdir()
        for i, modality in enumerate(("t1", "t1ce", "t2", "flair")):
            this_shape = list(shape)
            if modality_shape_differs and i == 3:
                this_shape[0] += 1
            values = (rng.random(this_shape) * 100).astype(dtype)
            if poison and i == 1 and values.dtype.kind == "f":
                values.flat[0] = np.nan if poison == "nan" else np.inf
            nib.save(nib.Nifti1Image(values, affine), str(folder / f"{case}_{modality}.nii.gz"))
        label = rng.choice(label_values, size=shape).astype(np.uint8)
        nib.save(nib.Nifti1Image(label, affine), str(folder / f"{case}_seg.nii.gz"))
        try:
            datalist = brats_datalist(tmp, release="2021")
            BRATS.validate(datalist, "segmentation3d", release="2021")
        except DatasetError as error:
            assert case in str(error)
            return
        assert len(shape) == 3 and set(label_values) <= {0, 1, 2, 4}
        sample = bundle_transforms("dka_brats", release="2021", pixdim=None)(datalist[0])
        assert sample["image"].shape[0] == 4 and sample["label"].shape[0] == 3
        assert tuple(sample["image"].shape[1:]) == tuple(sample["label"].shape[1:])
        assert np.isfinite(np.asarray(sample["image"])).all()


@pytest.mark.parametrize("value", ["abc", "nan", "0", "1.5", "-0.1"])
def test_fraction_of_the_wrong_type_or_range_is_named(value):
    from medadapt.engine.data import check_fraction

    with pytest.raises(ValueError, match="'fraction'"):
        check_fraction(value)
