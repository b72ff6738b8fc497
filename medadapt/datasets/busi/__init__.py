"""BUSI: Breast Ultrasound Images (Al-Dhabyani et al., 2020) in the official layout (reader here, demo in `demo`).

Layout: ``Dataset_BUSI_with_GT/{benign,malignant,normal}/benign (1).png`` with its mask
``benign (1)_mask.png`` and, for images with several lesions, extra masks
``benign (1)_mask_1.png``, ``benign (1)_mask_2.png``... The masks of one image are merged by
logical OR. Normal images come with an all-black mask.

Class labels are the folder names in alphabetical order: benign = 0, malignant = 1,
normal = 2 (`BUSI_CLASSES`).

Every image is its own group for splitting (BUSI publishes no patient ids).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
from PIL import Image

from medadapt.data.errors import DatasetError, raise_problems
from medadapt.data.layout import find_child, natural_key, require_dir, visible_entries

BUSI_CLASSES = ("benign", "malignant", "normal")
BUSI_FOLDER = "Dataset_BUSI_with_GT"

_MASK = re.compile(r"^(?P<stem>.+?)_mask(?:_(?P<index>\d+))?\.png$", re.IGNORECASE)


def busi_datalist(
    root: str | os.PathLike,
    task: str = "classification",
    mask_cache: str | os.PathLike | None = None,
) -> list[dict]:
    """Build the BUSI datalist.

    Arguments:
        root: ``Dataset_BUSI_with_GT`` or the folder holding it.
        task: "classification" ("label" is the class index) or "segmentation" ("label" is
            the mask path, or the list of mask paths when an image has several masks; use
            `medadapt.data.transforms.MergeMasksd` or ``mask_cache`` to merge them).
        mask_cache: for segmentation, a folder to write merged single-file masks into
            (``<cache>/<class>/<image>_mask.png``); "label" then points there. The dataset
            folder itself is never modified.

    Every entry also holds "class" (index), "class_name", "case" and "group".
    """
    from medadapt.tasks import get_task

    if get_task(task).name not in BUSI.tasks:
        raise ValueError(f"BUSI task must be one of {BUSI.tasks}, got {task!r}")
    top = require_dir(root, "BUSI")
    data_dir = find_child(top, BUSI_FOLDER) or top
    class_dirs = {name: data_dir / name for name in BUSI_CLASSES}
    absent = [name for name, path in class_dirs.items() if not path.is_dir()]
    if absent:
        raise DatasetError(
            f"BUSI folder {str(data_dir)!r}: class folder(s) {absent} missing; expected "
            f"{list(BUSI_CLASSES)}, found {[p.name for p in visible_entries(data_dir)]}"
        )
    datalist, problems = [], []
    for index, name in enumerate(BUSI_CLASSES):
        entries, class_problems = _class_entries(class_dirs[name], name, index)
        datalist += entries
        problems += class_problems
    raise_problems(problems, f"BUSI dataset {str(data_dir)!r}")
    if not datalist:
        raise DatasetError(f"BUSI dataset {str(data_dir)!r}: no images found in {list(BUSI_CLASSES)}")
    if get_task(task).label_kind == "class":
        for entry in datalist:
            del entry["masks"]
            entry["label"] = entry["class"]
        return datalist
    for entry in datalist:
        masks = entry.pop("masks")
        entry["label"] = masks[0] if len(masks) == 1 else masks
    if mask_cache is not None:
        cache = Path(mask_cache).expanduser().resolve()
        if cache == data_dir or data_dir in cache.parents:
            raise ValueError(f"mask_cache {str(cache)!r} is inside the BUSI folder; choose a folder outside the dataset")
        datalist = write_merged_masks(datalist, cache)
    return datalist


def _class_entries(folder: Path, name: str, index: int) -> tuple[list[dict], list[str]]:
    """Pair the images of one class folder with their masks."""
    images, masks, problems = {}, {}, []
    for path in visible_entries(folder):
        if path.is_dir():
            continue
        match = _MASK.match(path.name)
        if match:
            masks.setdefault(match["stem"], []).append((int(match["index"] or 0), path))
        elif path.suffix.lower() == ".png":
            images[path.stem] = path
        else:
            problems.append(f"{str(path)!r}: unexpected file in a BUSI class folder (expected PNG images and masks)")
    for stem in sorted(set(masks) - set(images), key=natural_key):
        problems.append(f"{name}/{stem}: mask(s) {[p.name for _, p in masks[stem]]} have no image {stem}.png")
    entries = []
    for stem in sorted(images, key=natural_key):
        found = sorted(masks.get(stem, []))
        if not found:
            problems.append(f"{name}/{stem}: image {str(images[stem])!r} has no mask (expected {stem}_mask.png)")
            continue
        if found[0][0] != 0:
            problems.append(f"{name}/{stem}: has {[p.name for _, p in found]} but no {stem}_mask.png")
            continue
        entries.append({
            "image": str(images[stem]),
            "masks": [str(p) for _, p in found],
            "class": index,
            "class_name": name,
            "case": stem,
            "group": f"{name}/{stem}",
        })
    return entries, problems


def merge_masks(paths: list[str] | str) -> np.ndarray:
    """Logical OR of the masks of one image, as a uint8 array of 0 and 255.

    Arguments:
        paths: one mask path or several; colour masks are read as grey and any non-zero
            pixel counts as lesion.
    """
    paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    merged = None
    for path in paths:
        with Image.open(path) as image:
            mask = np.asarray(image.convert("L")) > 0
        if merged is not None and mask.shape != merged.shape:
            raise DatasetError(
                f"mask {str(path)!r} has size {mask.shape[::-1]} but {str(paths[0])!r} has "
                f"{merged.shape[::-1]}; masks of one image must have the same size"
            )
        merged = mask if merged is None else merged | mask
    return merged.astype(np.uint8) * 255


def write_merged_masks(datalist: list[dict], cache_dir: str | os.PathLike) -> list[dict]:
    """Write each entry's merged mask to ``cache_dir`` and point "label" at it.

    Files already in the cache and newer than all their source masks are kept, so calling
    this again is cheap.

    Arguments:
        datalist: BUSI segmentation entries ("label" a path or list of paths).
        cache_dir: folder to write into (created if needed); never the dataset folder.
    """
    cache = Path(cache_dir).expanduser().resolve()
    out = []
    for entry in datalist:
        sources = entry["label"] if isinstance(entry["label"], list) else [entry["label"]]
        if cache in Path(sources[0]).resolve().parents and len(sources) == 1:
            out.append(dict(entry))  # already a cached mask
            continue
        target = cache / entry.get("class_name", "") / f"{Path(entry['image']).stem}_mask.png"
        newest = max(os.path.getmtime(p) for p in sources)
        if not target.is_file() or os.path.getmtime(target) < newest:
            target.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(merge_masks(sources)).save(target)
        out.append({**entry, "label": str(target)})
    return out


# ---------------------------------------------------------------------------- the dataset
from medadapt.data.dataset import Dataset  # noqa: E402  (the dataset builds on the reader above)


class BUSI(Dataset):
    """BUSI: benign / malignant / normal breast ultrasound, with lesion masks."""

    name = "busi"
    tasks = ("classification", "segmentation")
    classes = BUSI_CLASSES
    stratify_key = "class"
    demo_note = "real anatomy images with SYNTHETIC breast-ultrasound-style lesions"
    small_demo = {"per_class": 3}

    def datalist(self, root, task="classification", require_labels=True, mask_cache=None, **_):
        return busi_datalist(root, task=task, mask_cache=mask_cache)

    def make_demo(self, folder, **options):
        from medadapt.datasets.busi.demo import make_demo_busi

        return make_demo_busi(folder, **options)


DATASETS = (BUSI(),)
