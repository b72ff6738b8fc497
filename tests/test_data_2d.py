"""BUSI and ISIC presets and the 2D transforms."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from fixtures_data import (
    bundle_transforms,
    make_busi,
    make_isic2018,
    make_isic2019,
    write_png,
)
from PIL import Image

from medadapt.data.errors import DatasetError
from medadapt.datasets.busi import BUSI_CLASSES, busi_datalist, merge_masks
from medadapt.datasets.isic import (
    ISIC2019_CLASSES,
    isic2018_datalist,
    isic2019_datalist,
)


def _tree_digest(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha1(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------------- BUSI
def test_busi_classification(tmp_path):
    make_busi(tmp_path, per_class=4)
    for root in (tmp_path, tmp_path / "Dataset_BUSI_with_GT"):  # parent or the official folder
        datalist = busi_datalist(root)
        assert len(datalist) == 12
        for entry in datalist:
            folder = Path(entry["image"]).parent.name
            assert entry["label"] == entry["class"] == BUSI_CLASSES.index(folder)
            assert entry["class_name"] == folder and "_mask" not in entry["image"]
        assert len({e["group"] for e in datalist}) == len(datalist)  # each image its own group
    assert list(BUSI_CLASSES) == sorted(BUSI_CLASSES)  # documented: alphabetical order


def test_busi_natural_order(tmp_path):
    make_busi(tmp_path, per_class=11)
    cases = [e["case"] for e in busi_datalist(tmp_path) if e["class_name"] == "benign"]
    assert cases == [f"benign ({n})" for n in range(1, 12)]


def test_busi_extra_masks_merged_by_transform_and_cache(tmp_path):
    data = tmp_path / "data"
    make_busi(data, per_class=3, extra_masks={"benign (2)": 2})
    before = _tree_digest(data)
    datalist = busi_datalist(data, task="segmentation")
    entry = next(e for e in datalist if e["case"] == "benign (2)")
    assert isinstance(entry["label"], list) and len(entry["label"]) == 3
    expected = np.zeros((20, 30), bool)
    for path in entry["label"]:
        expected |= np.asarray(Image.open(path)) > 0

    out = bundle_transforms("dka_busi_seg", image_size=32, **{"validate#transforms#resize": None})(entry)
    assert out["label"].shape == (1, 20, 30)
    assert np.array_equal(out["label"][0].numpy() > 0, expected)  # logical OR of all three

    cached = busi_datalist(data, task="segmentation", mask_cache=tmp_path / "cache")
    cached_entry = next(e for e in cached if e["case"] == "benign (2)")
    assert Path(cached_entry["label"]).is_relative_to(tmp_path / "cache")
    assert np.array_equal(np.asarray(Image.open(cached_entry["label"])) > 0, expected)
    assert np.array_equal(merge_masks(entry["label"]) > 0, expected)
    assert _tree_digest(data) == before  # the dataset folder is never modified
    with pytest.raises(ValueError, match="inside the BUSI folder"):
        busi_datalist(data, task="segmentation", mask_cache=data / "Dataset_BUSI_with_GT" / "cache")


def test_busi_image_without_mask_and_orphan_mask(tmp_path):
    top = make_busi(tmp_path, per_class=2)
    os.remove(top / "malignant" / "malignant (2)_mask.png")
    write_png(top / "normal" / "normal (9)_mask.png", np.zeros((20, 30), np.uint8))
    with pytest.raises(DatasetError) as error:
        busi_datalist(tmp_path)
    assert "malignant (2)" in str(error.value) and "normal (9)" in str(error.value)


def test_busi_missing_class_folder(tmp_path):
    top = make_busi(tmp_path, per_class=1)
    for path in (top / "normal").iterdir():
        path.unlink()
    (top / "normal").rmdir()
    with pytest.raises(DatasetError, match="normal"):
        busi_datalist(tmp_path)


# ---------------------------------------------------------------------------- ISIC
def test_isic2018(tmp_path):
    ids = make_isic2018(tmp_path, n=4)
    datalist = isic2018_datalist(tmp_path)
    assert [e["case"] for e in datalist] == ids  # LICENSE.txt beside the images is skipped
    for entry in datalist:
        assert entry["label"].endswith(f"{entry['case']}_segmentation.png") and os.path.isfile(entry["label"])
    os.remove(Path(datalist[2]["label"]))
    with pytest.raises(DatasetError, match=ids[2]):
        isic2018_datalist(tmp_path)


def test_isic2019_labels_and_lesion_groups(tmp_path):
    classes = [0, 1, 1, 2, 7, 5]
    lesions = ["HAM_1", "HAM_2", "HAM_2", "", "BCN_9", ""]
    ids = make_isic2019(tmp_path, classes, lesions)
    datalist = isic2019_datalist(tmp_path)
    assert [e["case"] for e in datalist] == ids
    assert [e["label"] for e in datalist] == classes
    assert [e["class_name"] for e in datalist] == [ISIC2019_CLASSES[c] for c in classes]
    groups = [e["group"] for e in datalist]
    assert groups[1] == groups[2]  # two photos of lesion HAM_2
    assert len(set(groups)) == 5 and groups[3] == ids[3] and groups[5] == ids[5]  # no id: own group


def test_isic2019_bad_rows_named(tmp_path):
    ids = make_isic2019(tmp_path, [0, 1, 2], ["a", "b", "c"])
    csv_path = tmp_path / "ISIC_2019_Training_GroundTruth.csv"
    lines = csv_path.read_text(encoding="utf-8").splitlines()
    lines[2] = lines[2].replace("0.0", "1.0", 1)  # two classes for the second image
    csv_path.write_text("\n".join(lines) + "\n")
    os.remove(tmp_path / "ISIC_2019_Training_Input" / f"{ids[2]}.jpg")
    with pytest.raises(DatasetError) as error:
        isic2019_datalist(tmp_path)
    assert ids[1] in str(error.value) and ids[2] in str(error.value) and ids[0] not in str(error.value)


def test_isic2019_requires_metadata_for_grouping(tmp_path):
    make_isic2019(tmp_path, [0, 1], ["a", "b"])
    os.remove(tmp_path / "ISIC_2019_Training_Metadata.csv")
    with pytest.raises(FileNotFoundError, match="Metadata"):
        isic2019_datalist(tmp_path)
    assert len(isic2019_datalist(tmp_path, require_metadata=False)) == 2


# ---------------------------------------------------------------------------- transforms
def _grey_and_mask(tmp_path: Path) -> dict:
    """A non-square grey image (H 20, W 30) whose mask marks its bright top-left block."""
    image = np.full((20, 30), 40, np.uint8)
    image[:6, :9] = 220
    mask = np.zeros((20, 30), np.uint8)
    mask[:6, :9] = 255
    return {
        "image": str(write_png(tmp_path / "img.png", image)),  # grey PNG: must become RGB
        "label": str(write_png(tmp_path / "img_mask.png", np.stack([mask] * 3, -1))),  # RGB mask
    }


def test_2d_transforms_keep_geometry_and_channels(tmp_path):
    entry = _grey_and_mask(tmp_path)
    out = bundle_transforms("dka_busi_seg", image_size=12)(entry)
    assert out["image"].shape == (3, 12, 12) and out["label"].shape == (1, 12, 12)
    assert out["image"].dtype == torch.float32 and out["label"].dtype == torch.float32
    assert set(torch.unique(out["label"]).tolist()) == {0.0, 1.0}
    # The mask still covers the bright block: rows first, columns second, nothing transposed.
    bright, lesion = out["image"][0] > 0.5, out["label"][0] > 0
    assert float((bright & lesion).sum() / (bright | lesion).sum()) > 0.7
    assert lesion[:3, :2].all() and not lesion[6:].any() and not lesion[:, 7:].any()
    assert float(out["image"].min()) == 0.0 and float(out["image"].max()) == 1.0
    same = bundle_transforms("dka_busi_seg", image_size=32, **{"validate#transforms#resize": None})(entry)
    assert torch.equal(same["image"][0] > 0.5, same["label"][0] > 0)


def test_2d_training_transforms_classification_and_segmentation(tmp_path):
    make_busi(tmp_path / "busi", per_class=2, extra_masks={"benign (1)": 1})
    make_isic2018(tmp_path / "isic", n=2)
    torch.manual_seed(0)
    for entry in busi_datalist(tmp_path / "busi"):
        out = bundle_transforms("dka_busi_cls", "train", image_size=32)(entry)
        assert out["image"].shape == (3, 32, 32) and out["label"] == entry["class"]
    for entry in busi_datalist(tmp_path / "busi", task="segmentation"):
        out = bundle_transforms("dka_busi_seg", "train", image_size=24)(entry)
        assert out["image"].shape == (3, 24, 24) and out["label"].shape == (1, 24, 24)
        assert set(torch.unique(out["label"]).tolist()) <= {0.0, 1.0}
    for entry in isic2018_datalist(tmp_path / "isic"):
        out = bundle_transforms("dka_isic2018_seg", "train", image_size=32)(entry)
        assert out["image"].shape == (3, 32, 32) and out["label"].shape == (1, 32, 32)
        assert out["label"].sum() > 0


def test_isic_quarter_turns_come_before_the_resize(tmp_path):
    make_isic2018(tmp_path / "isic", n=1)
    entry = isic2018_datalist(tmp_path / "isic")[0]
    transform = bundle_transforms("dka_isic2018_seg", "train", image_size=32)
    turned = 0
    for seed in range(16):   # each seed has a 1/3 chance of an odd quarter turn
        transform.set_random_state(seed)
        out = transform(dict(entry))
        assert out["image"].shape == (3, 32, 32) and out["label"].shape == (1, 32, 32)
        resize = next(op for op in out["image"].applied_operations if op["class"] == "Resize")
        turned += tuple(resize["orig_size"]) == (30, 20)   # the 20 x 30 image was turned
    assert 0 < turned < 16
