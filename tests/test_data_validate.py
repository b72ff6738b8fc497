"""validate_datalist: every bad input stops with an error naming the case or file."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from fixtures_data import (
    label_map,
    make_brats2021,
    make_busi,
    make_isic2018,
    make_msd,
    write_nifti,
    write_png,
)

from medadapt.data.errors import DatasetError, MissingFileError
from medadapt.data.validate import validate_datalist
from medadapt.datasets.brats import BRATS, brats_datalist
from medadapt.datasets.busi import busi_datalist
from medadapt.datasets.isic import isic2018_datalist


@pytest.fixture
def brats(tmp_path):
    make_brats2021(tmp_path, cases=3)
    return brats_datalist(tmp_path)


def test_valid_datasets_pass(tmp_path, brats):
    BRATS.validate(brats, "segmentation3d", release="2021")
    make_msd(tmp_path / "msd", cases=2)
    BRATS.validate(brats_datalist(tmp_path / "msd"), "segmentation3d", release="msd")
    make_busi(tmp_path / "busi", per_class=2, extra_masks={"benign (1)": 1})
    validate_datalist(busi_datalist(tmp_path / "busi"), "classification", num_classes=3)
    validate_datalist(busi_datalist(tmp_path / "busi", task="segmentation"), "segmentation")
    make_isic2018(tmp_path / "isic", n=3)
    validate_datalist(isic2018_datalist(tmp_path / "isic"), "segmentation")


def test_empty_datalist():
    with pytest.raises(DatasetError, match="empty"):
        validate_datalist([], "segmentation")


def test_missing_modality_file(brats):
    os.remove(brats[1]["image"][2])
    with pytest.raises(MissingFileError) as error:
        BRATS.validate(brats, "segmentation3d")
    assert brats[1]["case"] in str(error.value) and os.path.basename(brats[1]["image"][2]) in str(error.value)


def test_incomplete_modality_set(brats):
    brats[0]["image"] = brats[0]["image"][:3]
    with pytest.raises(DatasetError, match=f"{brats[0]['case']}.*3 image file"):
        BRATS.validate(brats, "segmentation3d")


def test_modalities_of_different_shape(brats):
    write_nifti(Path(brats[2]["image"][3]), np.ones((12, 14, 11), np.float32))
    with pytest.raises(DatasetError, match=f"{brats[2]['case']}.*differ in shape"):
        BRATS.validate(brats, "segmentation3d")


def test_mask_shape_mismatch_3d_and_2d(tmp_path, brats):
    write_nifti(Path(brats[0]["label"]), label_map((1, 2, 4), shape=(12, 14, 9)))
    with pytest.raises(DatasetError) as error:
        BRATS.validate(brats, "segmentation3d")
    assert brats[0]["case"] in str(error.value) and os.path.basename(brats[0]["label"]) in str(error.value)

    make_isic2018(tmp_path / "isic", n=2)
    datalist = isic2018_datalist(tmp_path / "isic")
    write_png(Path(datalist[1]["label"]), np.zeros((30, 20), np.uint8))  # transposed
    with pytest.raises(DatasetError) as error:
        validate_datalist(datalist, "segmentation")
    assert datalist[1]["case"] in str(error.value) and "(30, 20)" in str(error.value)


def test_truncated_nifti(brats):
    path = brats[1]["image"][0]
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])
    with pytest.raises(DatasetError) as error:
        BRATS.validate(brats, "segmentation3d")
    assert brats[1]["case"] in str(error.value) and os.path.basename(path) in str(error.value)
    assert "cannot be read" in str(error.value)


def test_truncated_png(tmp_path):
    make_busi(tmp_path, per_class=2)
    datalist = busi_datalist(tmp_path)
    path = datalist[3]["image"]
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])
    with pytest.raises(DatasetError) as error:
        validate_datalist(datalist, "classification", num_classes=3)
    assert datalist[3]["case"] in str(error.value) and "cannot be read" in str(error.value)
    validate_datalist(datalist, "classification", read_data=False)  # headers alone look fine


def test_nan_voxels(brats):
    path = brats[0]["image"][1]
    image = nib.load(path)
    data = image.get_fdata().astype(np.float32)
    data[3, 3, 3] = np.nan
    nib.save(nib.Nifti1Image(data, image.affine), path)
    with pytest.raises(DatasetError) as error:
        BRATS.validate(brats, "segmentation3d")
    assert brats[0]["case"] in str(error.value) and "NaN" in str(error.value) and os.path.basename(path) in str(error.value)


def test_label_values_checked_for_release(brats):
    write_nifti(Path(brats[2]["label"]), label_map((1, 2, 3)))
    BRATS.validate(brats, "segmentation3d")  # no release given: values not checked
    with pytest.raises(DatasetError) as error:
        BRATS.validate(brats, "segmentation3d", release="2021")
    assert brats[2]["case"] in str(error.value) and "[3]" in str(error.value)


def test_classification_label_range(tmp_path):
    make_busi(tmp_path, per_class=1)
    datalist = busi_datalist(tmp_path)
    datalist[0]["label"] = 5
    with pytest.raises(DatasetError, match=datalist[0]["case"].replace("(", r"\(").replace(")", r"\)")):
        validate_datalist(datalist, "classification", num_classes=3)


def test_all_problems_reported_at_once(brats):
    os.remove(brats[0]["image"][0])
    with gzip.open(brats[2]["label"], "wb") as handle:
        handle.write(b"not a nifti")
    with pytest.raises(DatasetError) as error:
        BRATS.validate(brats, "segmentation3d")
    assert brats[0]["case"] in str(error.value) and brats[2]["case"] in str(error.value)
    assert "2 problem(s)" in str(error.value)


def test_entries_without_labels(brats):
    del brats[1]["label"]
    with pytest.raises(DatasetError, match=f"{brats[1]['case']}.*no 'label'"):
        BRATS.validate(brats, "segmentation3d")
    BRATS.validate(brats, "segmentation3d", require_labels=False)


def test_unknown_task(brats):
    with pytest.raises(ValueError, match="task"):
        validate_datalist(brats, "detection")


@pytest.mark.parametrize("values", [(0, 7), (0, 128), (0, 1, 255)])
def test_binary_masks_hold_0_1_or_0_255(tmp_path, values):
    """Values a binary mask cannot hold (7, 128, or both conventions mixed) stop the run naming
    the mask; the transforms would otherwise count every non-zero pixel as lesion."""
    from medadapt.data import get_dataset

    make_busi(tmp_path, per_class=2)
    datalist = busi_datalist(tmp_path, task="segmentation")
    mask = np.zeros((20, 30), np.uint8)
    for n, value in enumerate(values):
        mask[2 + 4 * n: 6 + 4 * n, 3:9] = value
    bad = Path(datalist[1]["label"][0] if isinstance(datalist[1]["label"], list) else datalist[1]["label"])
    write_png(bad, mask)
    with pytest.raises(DatasetError) as error:
        get_dataset("busi").validate(datalist, "segmentation")
    assert bad.name in str(error.value) and str(sorted(values)) in str(error.value) and "0/255" in str(error.value)
    write_png(bad, (mask > 0).astype(np.uint8))  # 0/1 is fine, as is 0/255
    get_dataset("busi").validate(datalist, "segmentation")


@pytest.mark.parametrize("affine, problem", [(np.zeros((4, 4)), "all zero"), (np.ones((4, 4)), "singular"),
                                             (np.full((4, 4), np.nan), "NaN")])
def test_volumes_whose_affine_cannot_place_them_are_named(brats, affine, problem):
    path = brats[2]["image"][3]
    image = nib.load(path)
    header = image.header.copy()
    header.set_sform(affine, code=1)
    header.set_qform(None, code=0)
    nib.save(nib.Nifti1Image(np.asarray(image.dataobj), None, header), path)
    with pytest.raises(DatasetError) as error:
        BRATS.validate(brats, "segmentation3d")
    assert os.path.basename(path) in str(error.value) and problem in str(error.value), str(error.value)
