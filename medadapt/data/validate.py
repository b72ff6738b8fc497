"""Check a datalist before training: every problem is reported with the case and file at fault.

A corrupt file found at epoch 3 of a long run costs hours; reading everything once up front
costs seconds to minutes and names every bad file in one error.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import nibabel as nib
import numpy as np
from PIL import Image

from medadapt.data.errors import DatasetError, MissingFileError, format_problems

KINDS = ("segmentation", "classification")
_NIFTI = (".nii", ".nii.gz")
# The two ways binary masks are stored; any other value (7, 128) is more likely a label map
# or a damaged file than a lesion, and the transforms would count it as lesion all the same.
BINARY_MASK_VALUES = ({0, 1}, {0, 255})


def affine_problem(affine) -> str | None:
    """Why a volume's voxel-to-world matrix cannot place its voxels, or None: NaN or infinite
    entries, or a singular matrix (an all-zero one included), which resampling and
    reorientation divide by."""
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4) or not np.isfinite(affine).all():
        return "its affine (voxel-to-world matrix) holds NaN or infinite values"
    rank = int(np.linalg.matrix_rank(affine[:3, :3]))
    if rank < 3:
        return (f"its affine (voxel-to-world matrix) is singular (rank {rank} of 3"
                f"{': all zero' if not affine[:3, :3].any() else ''}); fix the header's sform/qform or pixdim")
    return None


def mask_values_problem(values) -> str | None:
    """Why the distinct ``values`` of a binary mask are not 0/1 or 0/255, or None."""
    found = {int(v) if float(v).is_integer() else float(v) for v in values}
    if any(found <= allowed for allowed in BINARY_MASK_VALUES):
        return None
    shown = sorted(found)[:8]
    return (f"holds values {shown}{' ...' if len(found) > 8 else ''}; a binary mask must hold 0/1 or 0/255 "
            "(threshold or relabel it first)")


def validate_datalist(
    datalist: Sequence[dict],
    task: str,
    num_classes: int | None = None,
    read_data: bool = True,
    max_errors: int = 20,
    require_labels: bool = True,
    binary_masks: bool = False,
    sequences: int | None = None,
    check_labels: Callable[[list, str, str], None] | None = None,
) -> None:
    """Raise a `DatasetError` listing every unusable entry of ``datalist``.

    Checked: the list is not empty; each entry has its keys; every file exists and opens
    (NIfTI with nibabel, PNG / JPG with PIL); image and mask shapes agree; multi-sequence
    entries have every sequence, with equal shapes; with ``read_data`` every voxel is read,
    which finds truncated files and NaN / infinite values, and label values are checked.

    Arguments:
        datalist: entries with "image" (a path or list of paths) and "label" (a mask path,
            list of mask paths, or a class index for classification); "case" names the entry.
        task: "segmentation" (2D or 3D image and mask) or "classification" (image and class index).
        num_classes: for "classification", labels must lie in ``range(num_classes)``.
        read_data: read all pixel data (slower) rather than headers only.
        max_errors: how many problems to list in the error.
        require_labels: False for inference data; entries without "label" are then checked
            for their images only.
        binary_masks: "segmentation" masks are binary (lesion / background): with
            ``read_data``, each must hold only 0/1 or only 0/255.
        sequences: volumes of that many sequences: each entry's image is that many 3D files of
            one shape, or one 4D file with that many channels last (BraTS: 4).
        check_labels: with ``read_data``, called with each label map's values, its file and
            case; raises `DatasetError` for values the dataset does not allow (BraTS checks
            them against the release's convention).
    """
    if task not in KINDS:
        raise ValueError(f"task must be one of {KINDS}, got {task!r}")
    if not datalist:
        raise DatasetError(f"{task} datalist is empty: no cases were found, so there is nothing to train on")
    problems: list[str] = []
    missing = 0
    for index, entry in enumerate(datalist):
        case = entry.get("case", f"entry {index}")
        found = _check_entry(entry, case, task, num_classes, read_data, require_labels, binary_masks, sequences,
                             check_labels)
        missing += sum("does not exist" in p for p in found)
        problems += found
    if problems:
        message = format_problems(problems, f"{task} datalist ({len(datalist)} entries)", max_errors)
        # Only absent files: a FileNotFoundError as well, which callers may treat apart.
        raise (MissingFileError if missing == len(problems) else DatasetError)(message)


def _check_entry(
    entry: dict, case: str, task: str, num_classes: int | None, read: bool, require_labels: bool,
    binary_masks: bool = False, sequences: int | None = None, check_labels: Callable | None = None,
) -> list[str]:
    if "image" not in entry:
        return [f"case {case}: no 'image' key (keys: {sorted(entry)})"]
    if "label" not in entry and require_labels:
        return [f"case {case}: no 'label' key (keys: {sorted(entry)})"]
    images = _as_list(entry["image"])
    if sequences and len(images) not in (1, sequences):
        return [f"case {case}: {len(images)} image file(s) given; it needs {sequences} sequences ({sequences} files "
                "or one 4D file)"]
    problems, shapes = [], []
    for path in images:
        shape, error = _open(path, read)
        if error:
            problems.append(f"case {case}: {error}")
        shapes.append(shape)
    if problems:
        return problems
    spatial = [s[:3] if _is_nifti(p) else s for s, p in zip(shapes, images)]
    if sequences:
        if len(images) == 1 and (len(shapes[0]) != 4 or shapes[0][3] != sequences):
            problems.append(f"case {case}: 4D image {images[0]!r} has shape {shapes[0]}; expected (H, W, D, {sequences})")
        # A 2D slice (or a 4D series) where a volume is expected would fail deep in the model.
        flat = [(p, s) for p, s in zip(images, shapes) if len(images) == sequences and len(s) != 3]
        if flat:
            problems.append(f"case {case}: {os.path.basename(flat[0][0])!r} has shape {tuple(flat[0][1])}; "
                            "expected a 3D volume (H, W, D)")
        if len(set(map(tuple, spatial))) > 1:
            sizes = {os.path.basename(p): tuple(s) for p, s in zip(images, spatial)}
            problems.append(f"case {case}: modalities differ in shape {sizes}")
    if "label" not in entry:
        return problems
    if task == "classification":
        label = entry["label"]
        if not isinstance(label, (int, np.integer)) or isinstance(label, bool):
            problems.append(f"case {case}: label {label!r} is not a class index")
        elif label < 0 or (num_classes is not None and label >= num_classes):
            problems.append(f"case {case}: label {label} is outside 0..{(num_classes or 1) - 1}")
        return problems
    for mask in _as_list(entry["label"]):
        shape, error = _open(mask, read, check_labels=check_labels, case=case,
                             binary=binary_masks and task == "segmentation")
        if error:
            problems.append(f"case {case}: {error}")
            continue
        if (shape[:3] if _is_nifti(mask) else shape) != spatial[0]:
            problems.append(
                f"case {case}: mask {mask!r} has shape {tuple(shape)} but image {images[0]!r} has {tuple(spatial[0])}"
            )
    return problems


def _as_list(value) -> list[str]:
    return [str(v) for v in value] if isinstance(value, (list, tuple)) else [str(value)]


def _is_nifti(path: str) -> bool:
    return path.lower().endswith(_NIFTI)


def _open(path: str, read: bool, check_labels: Callable | None = None, case: str | None = None,
          binary: bool = False) -> tuple[tuple, str | None]:
    """Shape of the image at ``path`` (numpy order) and an error text if it cannot be used;
    ``binary``: a binary mask, whose values are checked when ``read``."""
    if not os.path.isfile(path):
        return (), f"file {path!r} does not exist"
    try:
        if _is_nifti(path):
            image = nib.load(path)
            shape = tuple(int(s) for s in image.shape)
            placement = affine_problem(image.affine)
            if placement:
                return shape, f"file {path!r}: {placement}"
            if read:
                data = np.asanyarray(image.dataobj)
                if np.issubdtype(data.dtype, np.floating) and not np.isfinite(data).all():
                    bad = int(np.size(data) - np.isfinite(data).sum())
                    return shape, f"file {path!r} holds {bad} NaN or infinite voxel(s)"
                if check_labels:
                    check_labels(np.unique(data).tolist(), path, case)
                values = mask_values_problem(np.unique(data)) if binary else None
                if values:
                    return shape, f"mask {path!r} {values}"
            return shape, None
        with Image.open(path) as image:
            size = image.size
            if read:
                image.load()  # decodes every pixel: a truncated file fails here, not at open
                if check_labels:
                    check_labels(np.unique(np.asarray(image)).tolist(), path, case)
                values = mask_values_problem(np.unique(np.asarray(image))) if binary else None
                if values:
                    return (size[1], size[0]), f"mask {path!r} {values}"
        return (size[1], size[0]), None
    except DatasetError as error:
        return (), str(error)
    except Exception as error:  # nibabel, gzip, zlib and PIL raise many types for bad files
        return (), f"file {path!r} cannot be read ({type(error).__name__}: {error})"
