"""ISIC: ISIC 2018 Task 1 (lesion segmentation) and ISIC 2019 (classification); readers here, demos in `demo`.

ISIC 2018 Task 1 layout::

    ISIC2018_Task1-2_Training_Input/ISIC_0000000.jpg
    ISIC2018_Task1_Training_GroundTruth/ISIC_0000000_segmentation.png

(the Validation and Test parts use the same names with "Validation" / "Test").

ISIC 2019 layout::

    ISIC_2019_Training_Input/ISIC_0000000.jpg
    ISIC_2019_Training_GroundTruth.csv   image,MEL,NV,BCC,AK,BKL,DF,VASC,SCC,UNK (one-hot floats)
    ISIC_2019_Training_Metadata.csv      image,age_approx,anatom_site_general,lesion_id,sex

ISIC 2019 class labels are the column index in `ISIC2019_CLASSES` (MEL = 0 ... SCC = 7,
UNK = 8; UNK has no training image, so an 8-output head covers the training data). Images of
one lesion share a group (``lesion_id``) so a split never puts a lesion on both sides; images
without a lesion id are their own group.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

from medadapt.data.errors import DatasetError, MissingFileError, raise_problems
from medadapt.data.layout import natural_key, require_dir, visible_entries

ISIC2019_CLASSES = ("MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC", "UNK")
ISIC2019_METADATA_COLUMNS = ("image", "age_approx", "anatom_site_general", "lesion_id", "sex")
ISIC2018_PARTS = ("Training", "Validation", "Test")


def isic2018_datalist(root: str | os.PathLike, part: str = "Training", require_labels: bool = True) -> list[dict]:
    """Build the ISIC 2018 Task 1 segmentation datalist.

    Arguments:
        root: the folder holding ``ISIC2018_Task1-2_<part>_Input`` and
            ``ISIC2018_Task1_<part>_GroundTruth``.
        part: "Training", "Validation" or "Test".
        require_labels: raise when an image has no ground-truth mask; False lists such
            images without a "label".

    Entries: {"image", "label" (mask path), "case" (image id), "group" (image id)}.
    """
    if part not in ISIC2018_PARTS:
        raise ValueError(f"ISIC 2018 part must be one of {ISIC2018_PARTS}, got {part!r}")
    top = require_dir(root, "ISIC 2018")
    input_dir = top / f"ISIC2018_Task1-2_{part}_Input"
    truth_dir = top / f"ISIC2018_Task1_{part}_GroundTruth"
    if not input_dir.is_dir():
        raise MissingFileError(
            f"ISIC 2018 folder {str(top)!r}: {input_dir.name!r} missing; found "
            f"{[p.name for p in visible_entries(top)][:10]}"
        )
    if require_labels and not truth_dir.is_dir():
        raise MissingFileError(f"ISIC 2018 folder {str(top)!r}: {truth_dir.name!r} missing")
    images = [p for p in visible_entries(input_dir) if p.suffix.lower() in (".jpg", ".jpeg", ".png")]
    datalist, problems = [], []
    for image in images:
        case = image.stem
        mask = truth_dir / f"{case}_segmentation.png"
        entry = {"image": str(image), "case": case, "group": case}
        if mask.is_file():
            entry["label"] = str(mask)
        elif require_labels:
            problems.append(f"case {case}: image {str(image)!r} has no mask {str(mask)!r}")
            continue
        datalist.append(entry)
    if truth_dir.is_dir():
        known = {p.stem for p in images}
        for mask in visible_entries(truth_dir):
            if mask.name.endswith("_segmentation.png") and mask.name[: -len("_segmentation.png")] not in known:
                problems.append(f"mask {str(mask)!r} has no image in {input_dir.name!r}")
    raise_problems(problems, f"ISIC 2018 Task 1 {part} dataset {str(top)!r}")
    if not datalist:
        raise DatasetError(f"ISIC 2018 Task 1 {part} dataset {str(top)!r}: no images found in {input_dir.name!r}")
    return datalist


def isic2019_datalist(root: str | os.PathLike, require_metadata: bool = True) -> list[dict]:
    """Build the ISIC 2019 classification datalist.

    Arguments:
        root: the folder holding ``ISIC_2019_Training_Input`` and the two CSV files.
        require_metadata: raise if the metadata CSV is absent. Without it lesions cannot be
            grouped and images of one lesion could end up in both train and test.

    Entries: {"image", "label" (class index), "class", "class_name", "case", "group",
    "lesion_id", "age_approx", "anatom_site_general", "sex"}.
    """
    top = require_dir(root, "ISIC 2019")
    input_dir = top / "ISIC_2019_Training_Input"
    truth_csv = top / "ISIC_2019_Training_GroundTruth.csv"
    meta_csv = top / "ISIC_2019_Training_Metadata.csv"
    for path in (input_dir, truth_csv) + ((meta_csv,) if require_metadata else ()):
        if not path.exists():
            raise MissingFileError(
                f"ISIC 2019 folder {str(top)!r}: {path.name!r} missing; found "
                f"{[p.name for p in visible_entries(top)][:10]}"
            )
    truth = _read_csv(truth_csv, ("image",) + ISIC2019_CLASSES)
    metadata = {row["image"]: row for row in _read_csv(meta_csv, ISIC2019_METADATA_COLUMNS)} if meta_csv.exists() else {}
    files = {p.stem: p for p in visible_entries(input_dir) if p.suffix.lower() in (".jpg", ".jpeg", ".png")}
    datalist, problems = [], []
    for line, row in enumerate(truth, start=2):
        case = row["image"]
        try:
            scores = [float(row[name]) for name in ISIC2019_CLASSES]
        except ValueError:
            problems.append(f"{truth_csv.name} line {line} ({case}): non-numeric class column")
            continue
        positives = [i for i, s in enumerate(scores) if s == 1.0]
        if len(positives) != 1 or sum(scores) != 1.0:
            problems.append(f"{truth_csv.name} line {line} ({case}): expected exactly one class = 1.0, got {scores}")
            continue
        if case not in files:
            problems.append(f"case {case}: listed in {truth_csv.name} but {case}.jpg is missing from {input_dir.name}")
            continue
        meta = metadata.get(case)
        if meta is None and metadata:
            problems.append(f"case {case}: missing from {meta_csv.name}")
            continue
        meta = meta or {}
        lesion = (meta.get("lesion_id") or "").strip()
        index = positives[0]
        datalist.append({
            "image": str(files[case]),
            "label": index,
            "class": index,
            "class_name": ISIC2019_CLASSES[index],
            "case": case,
            "group": lesion or case,
            "lesion_id": lesion,
            "age_approx": meta.get("age_approx", ""),
            "anatom_site_general": meta.get("anatom_site_general", ""),
            "sex": meta.get("sex", ""),
        })
    listed = {row["image"] for row in truth}
    for stem in sorted(set(files) - listed, key=natural_key):
        problems.append(f"image {str(files[stem])!r} is not listed in {truth_csv.name}")
    raise_problems(problems, f"ISIC 2019 dataset {str(top)!r}")
    if not datalist:
        raise DatasetError(f"ISIC 2019 dataset {str(top)!r}: {truth_csv.name} lists no images")
    return datalist


def _read_csv(path: Path, columns: tuple[str, ...]) -> list[dict]:
    """Rows of a CSV file, after checking its header holds all ``columns``."""
    with open(path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        header = list(reader.fieldnames or ())
        missing = [c for c in columns if c not in header]
        if missing:
            raise DatasetError(
                f"{str(path)!r}: column(s) {missing} missing; header is {header}, expected {list(columns)}"
            )
        return list(reader)


# ---------------------------------------------------------------------------- the datasets
from medadapt.data.dataset import Dataset  # noqa: E402  (the datasets build on the readers above)


class ISIC2018(Dataset):
    """ISIC 2018 Task 1: dermoscopic lesion segmentation."""

    name = "isic2018"
    tasks = ("segmentation",)
    demo_note = "real images with SYNTHETIC dermoscopy-style lesions"
    small_demo = {"n": 6}

    def datalist(self, root, task="segmentation", require_labels=True, **_):
        return isic2018_datalist(root, require_labels=require_labels)

    def make_demo(self, folder, **options):
        from medadapt.datasets.isic.demo import make_demo_isic2018

        return make_demo_isic2018(folder, **options)


class ISIC2019(Dataset):
    """ISIC 2019: eight diagnostic classes (UNK has no training image, so it has no output)."""

    name = "isic2019"
    tasks = ("classification",)
    classes = ISIC2019_CLASSES[:-1]
    stratify_key = "class"
    demo_note = "real images with SYNTHETIC dermoscopy-style lesions"
    small_demo = {"n": 24}

    def datalist(self, root, task="classification", require_labels=True, **_):
        return isic2019_datalist(root)

    def make_demo(self, folder, **options):
        from medadapt.datasets.isic.demo import make_demo_isic2019

        return make_demo_isic2019(folder, **options)


DATASETS = (ISIC2018(), ISIC2019())
