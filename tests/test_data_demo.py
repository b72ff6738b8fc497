"""Embedded demo datasets: official layouts the presets read, valid data, determinism."""

from __future__ import annotations

import hashlib
import time
from collections import Counter
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from fixtures_data import bundle_transforms
from PIL import Image

from medadapt.data.dataset import get_dataset
from medadapt.data.splits import make_splits
from medadapt.data.validate import validate_datalist
from medadapt.datasets.brats import brats_datalist, detect_release
from medadapt.datasets.brats.demo import make_demo_brats
from medadapt.datasets.busi import busi_datalist, merge_masks
from medadapt.datasets.busi.demo import make_demo_busi
from medadapt.datasets.isic import isic2018_datalist, isic2019_datalist
from medadapt.datasets.isic.demo import make_demo_isic2018, make_demo_isic2019


def _digest(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha1(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def _readme_says_synthetic(root: Path) -> None:
    text = (root / "README.txt").read_text(encoding="utf-8")
    assert "SYNTHETIC" in text


# ---------------------------------------------------------------------------- BraTS
def test_demo_brats_default_is_valid_and_fast(tmp_path):
    start = time.perf_counter()
    root = Path(make_demo_brats(tmp_path / "brats"))
    elapsed = time.perf_counter() - start
    assert elapsed < 30  # about 3 s on 2 idle CPU cores; generous for a loaded CI machine
    _readme_says_synthetic(root)
    assert "MNI152" in (root / "README.txt").read_text(encoding="utf-8")
    assert detect_release(root) == "2021"
    datalist = brats_datalist(root)
    assert len(datalist) == 6
    get_dataset("brats").validate(datalist, "segmentation3d", release="2021")
    for entry in datalist:
        seg = np.asarray(nib.load(entry["label"]).dataobj)
        t1 = np.asarray(nib.load(entry["image"][0]).dataobj)
        assert seg.shape == t1.shape and max(seg.shape) <= 64
        assert set(np.unique(seg)) <= {0, 1, 2, 4} and {2, 4} <= set(np.unique(seg))
        assert (t1[seg > 0] > 0).all()  # tumours lie inside the (skull-stripped) brain
        flair = np.asarray(nib.load(entry["image"][3]).dataobj).astype(float)
        t1ce = np.asarray(nib.load(entry["image"][1]).dataobj).astype(float)
        brain = (t1 > 0) & (seg == 0)
        assert flair[seg == 2].mean() > flair[brain].mean()  # edema bright on FLAIR
        assert t1ce[seg == 4].mean() > t1ce[brain].mean()  # enhancing rim bright on T1ce
    out = bundle_transforms("dka_brats", release="2021", pixdim=None)(datalist[0])
    assert out["image"].shape == (4, 64, 64, 64) and out["label"].shape == (3, 64, 64, 64)
    assert out["label"][2].sum() > 0  # ET channel not empty
    crops = bundle_transforms("dka_brats", "train", roi_size=[32, 32, 32], pixdim=None,
                              **{"train#transforms#crop#num_samples": 2})(datalist[1])
    assert [c["image"].shape for c in crops] == [(4, 32, 32, 32)] * 2


def test_demo_brats_cases_differ_and_anatomy_is_mni(tmp_path):
    root = Path(make_demo_brats(tmp_path, num_cases=3, size=32))
    t1 = [np.asarray(nib.load(e["image"][0]).dataobj).astype(float) for e in brats_datalist(root)]
    assert not np.array_equal(t1[0], t1[1])  # per-case deformation and intensity changes
    # Still the same brain: strongly correlated after small per-case deformations.
    assert np.corrcoef(t1[0].ravel(), t1[1].ravel())[0, 1] > 0.6


def test_demo_idempotent_deterministic_and_rebuilt_on_new_parameters(tmp_path):
    a = Path(make_demo_brats(tmp_path / "a", num_cases=3, size=24, seed=1))
    first = _digest(a)
    mtimes = {p: p.stat().st_mtime_ns for p in a.rglob("*.nii.gz")}
    assert make_demo_brats(a, num_cases=3, size=24, seed=1) == str(a)
    assert {p: p.stat().st_mtime_ns for p in a.rglob("*.nii.gz")} == mtimes  # nothing rewritten
    b = Path(make_demo_brats(tmp_path / "b", num_cases=3, size=24, seed=1))
    assert _digest(b) == first  # same seed, same bytes
    c = Path(make_demo_brats(tmp_path / "c", num_cases=3, size=24, seed=2))
    assert _digest(c) != first
    make_demo_brats(a, num_cases=2, size=24, seed=1)  # fewer cases: stale ones removed
    assert sorted(p.name for p in a.iterdir() if p.is_dir()) == ["BraTS2021_00000", "BraTS2021_00001"]


# ---------------------------------------------------------------------------- BUSI
def _bbox_aspect(mask: np.ndarray) -> float:
    rows, cols = np.nonzero(mask)
    return (rows.max() - rows.min() + 1) / (cols.max() - cols.min() + 1)


def test_demo_busi(tmp_path):
    root = Path(make_demo_busi(tmp_path, per_class=4))
    _readme_says_synthetic(root)
    cls = busi_datalist(root)
    assert Counter(e["class_name"] for e in cls) == {"benign": 4, "malignant": 4, "normal": 4}
    validate_datalist(cls, "classification", num_classes=3)
    seg = busi_datalist(root, task="segmentation")
    validate_datalist(seg, "segmentation")
    assert any(isinstance(e["label"], list) for e in seg)  # some images have _mask_1 files
    aspects = {"benign": [], "malignant": []}
    for entry in seg:
        mask = merge_masks(entry["label"]) > 0
        image = np.asarray(Image.open(entry["image"]).convert("L"), dtype=float)
        assert Image.open(entry["image"]).mode == "RGB" and image.shape == (96, 128)
        if entry["class_name"] == "normal":
            assert not mask.any()
            continue
        assert mask.any() and image[mask].mean() < image[~mask].mean()  # hypoechoic lesions
        first = np.asarray(Image.open(entry["label"][0] if isinstance(entry["label"], list) else entry["label"])) > 0
        aspects[entry["class_name"]].append(_bbox_aspect(first))
    # The class cue a classifier can learn: benign wider than tall, malignant taller than wide.
    assert max(aspects["benign"]) < 1.0 < np.mean(aspects["malignant"])
    out = bundle_transforms("dka_busi_seg", "train", image_size=64)(seg[0])
    assert out["image"].shape == (3, 64, 64) and out["label"].shape == (1, 64, 64)
    out = bundle_transforms("dka_busi_cls", image_size=64)(cls[5])
    assert out["image"].shape == (3, 64, 64) and out["label"] == cls[5]["class"]


# ---------------------------------------------------------------------------- ISIC
def test_demo_isic2018(tmp_path):
    root = Path(make_demo_isic2018(tmp_path, n=6))
    _readme_says_synthetic(root)
    datalist = isic2018_datalist(root)
    assert len(datalist) == 6
    validate_datalist(datalist, "segmentation")
    for entry in datalist:
        assert entry["image"].endswith(".jpg")
        mask = np.asarray(Image.open(entry["label"])) > 0
        image = np.asarray(Image.open(entry["image"]).convert("L"), dtype=float)
        assert mask.any() and not mask.all()
        assert image[mask].mean() < image[~mask].mean()  # pigmented lesions darker than skin
    out = bundle_transforms("dka_isic2018_seg", "train", image_size=48)(datalist[0])
    assert out["image"].shape == (3, 48, 48) and out["label"].shape == (1, 48, 48)


def test_demo_isic2019(tmp_path):
    root = Path(make_demo_isic2019(tmp_path, n=32))
    _readme_says_synthetic(root)
    datalist = isic2019_datalist(root)
    validate_datalist(datalist, "classification", num_classes=8)
    assert set(e["label"] for e in datalist) == set(range(8))  # every diagnostic class, no UNK
    per_lesion = Counter(e["lesion_id"] for e in datalist if e["lesion_id"])
    assert max(per_lesion.values()) == 2  # repeat photographs share a lesion id
    assert any(not e["lesion_id"] for e in datalist)  # and some images have none
    for lesion, count in per_lesion.items():
        if count == 2:
            pair = [e for e in datalist if e["lesion_id"] == lesion]
            assert pair[0]["label"] == pair[1]["label"] and pair[0]["group"] == pair[1]["group"]
    preset = get_dataset("isic2019")
    splits = make_splits(datalist, [0.1, 1.0], folds=2, seed=0, label_key=preset.stratify_key, root=root)
    test_groups = {e["group"] for e in splits["test"]}
    for record in splits["fractions"]:
        for fold in record["folds"]:
            assert not {e["group"] for e in fold["train"]} & test_groups
            assert len({e["label"] for e in fold["train"]}) == 8
    out = bundle_transforms("dka_isic2019_cls", image_size=32)(datalist[0])
    assert out["image"].shape == (3, 32, 32) and 0.0 <= float(out["image"].min()) < float(out["image"].max()) <= 1.0


def test_demo_classes_differ_in_colour(tmp_path):
    # Class-dependent appearance: the mean lesion-area colour separates e.g. MEL from VASC.
    root = Path(make_demo_isic2019(tmp_path, n=16, size=(64, 64)))
    colour = {}
    for entry in isic2019_datalist(root):
        image = np.asarray(Image.open(entry["image"]), dtype=float)[24:40, 24:40]
        colour.setdefault(entry["class_name"], []).append(image.reshape(-1, 3).mean(0))
    mel, vasc = np.mean(colour["MEL"], 0), np.mean(colour["VASC"], 0)
    assert mel.sum() < vasc.sum()  # melanoma darker overall
    assert vasc[0] - vasc[1] > mel[0] - mel[1]  # vascular lesions redder


def test_every_dataset_builds_its_demo_and_reads_it(tmp_path):
    # Found in medadapt/datasets/, not listed: each builds its small demo in its own layout.
    from medadapt.data.dataset import datasets

    assert {"brats", "busi", "isic2018", "isic2019", "mni152_tissue", "mni152_tissue_3d", "covid"} <= set(datasets())
    for name, dataset in datasets().items():
        root = dataset.make_demo(tmp_path / name, **dataset.small_demo)
        task = dataset.check_task(None)
        entries = dataset.datalist(root, task=task.name)
        dataset.validate(entries, task, root=root)
        assert entries and dataset.demo_note, name
    with pytest.raises(ValueError, match="unknown dataset 'chestxray'"):
        get_dataset("chestxray")
    with pytest.raises(ValueError):
        make_demo_brats(tmp_path / "x", num_cases=0)
