"""Tiny dataset trees in each official layout, for the medadapt.data tests.

Every image gets its own random content (so content hashes differ unless a test copies a
file on purpose); label maps hold the values a test asks for.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
from PIL import Image

SHAPE3D = (12, 14, 10)


def write_nifti(path: Path, data: np.ndarray, spacing: float = 1.0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, np.diag([spacing, spacing, spacing, 1.0])), path)
    return path


def label_map(values, shape=SHAPE3D, seed: int = 0) -> np.ndarray:
    """A label map holding background and every value of ``values`` in nested boxes."""
    seg = np.zeros(shape, dtype=np.uint8)
    for k, value in enumerate(values):
        lo = 1 + k
        seg[lo : shape[0] - lo, lo : shape[1] - lo, lo : shape[2] - lo] = value
    return seg


def _volume(rng, shape=SHAPE3D) -> np.ndarray:
    data = rng.random(shape).astype(np.float32) + 0.5
    data[0] = 0  # some background, as in skull-stripped BraTS
    return data


def make_brats2021(root: Path, cases: int = 3, values=(1, 2, 4), spacing: float = 1.0) -> list[str]:
    ids = []
    for i in range(cases):
        case = f"BraTS2021_{i:05d}"
        rng = np.random.default_rng(i)
        for mod in ("t1", "t1ce", "t2", "flair"):
            write_nifti(root / case / f"{case}_{mod}.nii.gz", _volume(rng), spacing)
        write_nifti(root / case / f"{case}_seg.nii.gz", label_map(values), spacing)
        ids.append(case)
    return ids


def make_brats2023(root: Path, cases: int = 3, values=(1, 2, 3)) -> list[str]:
    ids = []
    for i in range(cases):
        case = f"BraTS-GLI-{i:05d}-000"
        rng = np.random.default_rng(100 + i)
        for mod in ("t1n", "t1c", "t2w", "t2f"):
            write_nifti(root / case / f"{case}-{mod}.nii.gz", _volume(rng))
        write_nifti(root / case / f"{case}-seg.nii.gz", label_map(values))
        ids.append(case)
    return ids


def make_msd(root: Path, cases: int = 3, values=(1, 2, 3), channel_slabs: bool = False) -> list[str]:
    """MSD Task01 layout. With ``channel_slabs`` channel c is non-zero only in x-slab c."""
    training, ids = [], []
    for i in range(1, cases + 1):
        case = f"BRATS_{i:03d}"
        rng = np.random.default_rng(200 + i)
        image = np.stack([_volume(rng) for _ in range(4)], axis=-1)
        if channel_slabs:
            image[:] = 0
            for c in range(4):
                image[3 * c : 3 * c + 3, :, :, c] = 1.0 + rng.random((3,) + SHAPE3D[1:])
        write_nifti(root / "imagesTr" / f"{case}.nii.gz", image)
        write_nifti(root / "labelsTr" / f"{case}.nii.gz", label_map(values))
        training.append({"image": f"./imagesTr/{case}.nii.gz", "label": f"./labelsTr/{case}.nii.gz"})
        ids.append(case)
    spec = {
        "name": "BRATS",
        "modality": {"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"},
        "labels": {"0": "background", "1": "edema", "2": "non-enhancing tumor", "3": "enhancing tumour"},
        "training": training,
    }
    (root / "dataset.json").write_text(json.dumps(spec))
    return ids


def write_png(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def make_busi(root: Path, per_class: int = 5, size=(20, 30), extra_masks: dict | None = None) -> Path:
    """BUSI layout under root/Dataset_BUSI_with_GT; ``extra_masks`` maps "benign (1)" -> count."""
    extra_masks = extra_masks or {}
    top = root / "Dataset_BUSI_with_GT"
    for ci, name in enumerate(("benign", "malignant", "normal")):
        for n in range(1, per_class + 1):
            rng = np.random.default_rng([ci, n])
            stem = f"{name} ({n})"
            write_png(top / name / f"{stem}.png", rng.integers(0, 255, size + (3,), dtype=np.uint8))
            mask = np.zeros(size, np.uint8)
            if name != "normal":
                mask[2:6, 3:9] = 255
            write_png(top / name / f"{stem}_mask.png", mask)
            for k in range(1, extra_masks.get(stem, 0) + 1):
                extra = np.zeros(size, np.uint8)
                extra[8 + k : 10 + k, 12:16] = 255
                write_png(top / name / f"{stem}_mask_{k}.png", extra)
    return top


def make_isic2018(root: Path, n: int = 6, size=(20, 30)) -> list[str]:
    ids = []
    for i in range(n):
        case = f"ISIC_{i:07d}"
        rng = np.random.default_rng(300 + i)
        path = root / "ISIC2018_Task1-2_Training_Input" / f"{case}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, size + (3,), dtype=np.uint8)).save(path)
        mask = np.zeros(size, np.uint8)
        mask[4:12, 5:20] = 255
        write_png(root / "ISIC2018_Task1_Training_GroundTruth" / f"{case}_segmentation.png", mask)
        ids.append(case)
    (root / "ISIC2018_Task1-2_Training_Input" / "LICENSE.txt").write_text("license")
    return ids


ISIC2019_COLUMNS = ("MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC", "UNK")


def make_isic2019(root: Path, classes: list[int], lesions: list[str], size=(20, 30)) -> list[str]:
    """One image per element of ``classes`` (column index) with the matching ``lesions`` id."""
    ids = []
    (root / "ISIC_2019_Training_Input").mkdir(parents=True, exist_ok=True)
    with open(root / "ISIC_2019_Training_GroundTruth.csv", "w", newline="") as truth, \
            open(root / "ISIC_2019_Training_Metadata.csv", "w", newline="") as meta:
        tw, mw = csv.writer(truth), csv.writer(meta)
        tw.writerow(("image",) + ISIC2019_COLUMNS)
        mw.writerow(("image", "age_approx", "anatom_site_general", "lesion_id", "sex"))
        for i, (cls, lesion) in enumerate(zip(classes, lesions)):
            case = f"ISIC_{i:07d}"
            rng = np.random.default_rng(400 + i)
            Image.fromarray(rng.integers(0, 255, size + (3,), dtype=np.uint8)).save(
                root / "ISIC_2019_Training_Input" / f"{case}.jpg"
            )
            tw.writerow([case] + ["1.0" if k == cls else "0.0" for k in range(len(ISIC2019_COLUMNS))])
            mw.writerow([case, "50.0", "anterior torso", lesion, "female"])
            ids.append(case)
    return ids


def tiny_files_datalist(root: Path, classes: list[int], groups: list[str] | None = None) -> list[dict]:
    """A classification datalist over distinct tiny files (for split tests, no image decoding)."""
    root.mkdir(parents=True, exist_ok=True)
    datalist = []
    for i, cls in enumerate(classes):
        path = root / f"img_{i:04d}.bin"
        path.write_bytes(f"image {i}".encode())
        entry = {"image": str(path), "label": cls, "class": cls, "case": f"c{i}"}
        entry["group"] = groups[i] if groups else f"c{i}"
        datalist.append(entry)
    return datalist


def bundle_transforms(bundle: str, stage: str = "validate", **settings):
    """The transform chain of one of the repository's bundles, as the bundle builds it:
    ``stage`` "train" or "validate" (train.json's chains) or "infer" (inference.json's),
    with bundle ``settings`` (``image_size``, ``release``, ``train#transforms#crop#num_samples``...)."""
    from medadapt.engine.bundle import parsed

    repo = Path(__file__).resolve().parents[1]
    config, key = ("inference.json", "preprocessing") if stage == "infer" else ("train.json", f"{stage}#preprocessing")
    return parsed(repo / "bundles" / bundle / config, key, **settings)
