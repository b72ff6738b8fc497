"""BraTS: the brain tumour segmentation challenges' data, in their official folder layouts.

This folder is the dataset: the reader and its validation (here), the label conventions of
each release (`labels`), its own transforms (`transforms`: the sequences' order and grid,
regions back to label values) and the embedded demo (`demo`).

Layouts read exactly as distributed:

- 2021 (and 2018-2020): ``BraTS2021_00000/BraTS2021_00000_{t1,t1ce,t2,flair,seg}.nii.gz``
- 2023 GLI (and MEN, MET, PED, SSA):
  ``BraTS-GLI-00000-000/BraTS-GLI-00000-000-{t1n,t1c,t2w,t2f,seg}.nii.gz``
- MSD Task01_BrainTumour: ``imagesTr/BRATS_001.nii.gz`` (4D, channels FLAIR, T1w, t1gd, T2w),
  ``labelsTr/BRATS_001.nii.gz`` and ``dataset.json``.

Each entry is ``{"image": [t1, t1ce, t2, flair] (or the MSD 4D file), "label": seg,
"case": id, "group": id}``. The modality order is always t1, t1ce, t2, flair; the MSD 4D file
keeps its own order and `medadapt.datasets.brats.transforms.BraTSChannelOrderd` reorders its channels.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from medadapt.data.errors import DatasetError, raise_problems
from medadapt.data.layout import require_dir, visible_entries
from medadapt.datasets.brats.labels import canonical_release, release_from_name

# Fixed modality order of every BraTS datalist entry.
MODALITIES = ("t1", "t1ce", "t2", "flair")

# Per release: the separator between case id and suffix, and the file suffix of each modality.
FILE_SUFFIXES = {
    "2021": ("_", {"t1": "t1", "t1ce": "t1ce", "t2": "t2", "flair": "flair", "seg": "seg"}),
    "2023": ("-", {"t1": "t1n", "t1ce": "t1c", "t2": "t2w", "flair": "t2f", "seg": "seg"}),
}

# MSD stores the four sequences in one 4D file in this order (dataset.json "modality").
MSD_MODALITIES = ("FLAIR", "T1w", "t1gd", "T2w")
# Channel of the MSD 4D image holding each of MODALITIES (t1, t1ce, t2, flair).
MSD_TO_STANDARD = (1, 2, 3, 0)

_NIFTI_EXTENSIONS = (".nii.gz", ".nii")


def detect_release(root: str | os.PathLike) -> str:
    """Tell the BraTS release from the folder and file names under ``root``.

    Arguments:
        root: the dataset folder (or the folder holding it).

    Returns "2021", "2023" or "msd"; raises `DatasetError` naming what was found if the
    layout matches none of them or mixes releases.
    """
    return _locate(require_dir(root, "BraTS"))[1]


def brats_datalist(
    root: str | os.PathLike, release: str = "auto", require_labels: bool = True
) -> list[dict]:
    """Build the datalist of a BraTS dataset in its official layout.

    Arguments:
        root: the dataset folder (the one holding the case folders, or for MSD the one
            holding ``imagesTr``), or a folder holding exactly that folder.
        release: "2021", "2023", "msd" or "auto" (detected from the names). A release that
            contradicts the names raises.
        require_labels: raise when a case has no segmentation; False for validation or test
            releases, whose entries then carry no "label".

    Returns entries sorted by case id.
    """
    data_dir, detected = _locate(require_dir(root, "BraTS"))
    if release != "auto":
        release = canonical_release(release)
        if release != detected:
            raise DatasetError(
                f"BraTS folder {str(data_dir)!r} follows the {detected!r} layout but release "
                f"{release!r} was requested; use release='auto' or {detected!r}"
            )
    if detected == "msd":
        return _msd_datalist(data_dir, require_labels)
    return _case_folder_datalist(data_dir, detected, require_labels)


def _locate(root: Path) -> tuple[Path, str]:
    """Find the folder holding the cases and the release its names follow."""
    candidates = [root] + [p for p in visible_entries(root) if p.is_dir()]
    for folder in candidates:
        if (folder / "imagesTr").is_dir() and (folder / "dataset.json").is_file():
            return folder, "msd"
    for folder in candidates:
        releases = {release_from_name(p.name) for p in visible_entries(folder) if p.is_dir()}
        releases.discard(None)
        releases.discard("msd")
        if len(releases) > 1:
            raise DatasetError(
                f"BraTS folder {str(folder)!r} mixes case folders of releases {sorted(releases)}; "
                "keep one release per folder"
            )
        if releases:
            return folder, releases.pop()
    seen = [p.name for p in visible_entries(root)][:10]
    raise DatasetError(
        f"BraTS folder {str(root)!r}: no BraTS layout found (expected case folders such as "
        "'BraTS2021_00000' or 'BraTS-GLI-00000-000', or MSD 'imagesTr' + 'dataset.json'); "
        f"found {seen}"
    )


def _find_nifti(folder: Path, stem: str) -> Path | None:
    for ext in _NIFTI_EXTENSIONS:
        path = folder / f"{stem}{ext}"
        if path.is_file():
            return path
    return None


def _case_folder_datalist(data_dir: Path, release: str, require_labels: bool) -> list[dict]:
    sep, suffixes = FILE_SUFFIXES[release]
    datalist, problems = [], []
    for folder in visible_entries(data_dir):
        if not folder.is_dir():
            continue  # e.g. the name-mapping CSV shipped beside the 2021 cases
        case = folder.name
        if release_from_name(case) != release:
            problems.append(
                f"case folder {str(folder)!r}: name does not follow the BraTS {release} naming "
                f"({'BraTS2021_00000' if release == '2021' else 'BraTS-GLI-00000-000'})"
            )
            continue
        files = {key: _find_nifti(folder, f"{case}{sep}{suffix}") for key, suffix in suffixes.items()}
        missing = [key for key in MODALITIES if files[key] is None]
        if require_labels and files["seg"] is None:
            missing.append("seg")
        if missing:
            expected = [f"{case}{sep}{suffixes[key]}.nii.gz" for key in missing]
            present = sorted(p.name for p in folder.iterdir())
            problems.append(f"case {case}: missing {missing} (expected {expected}); folder holds {present}")
            continue
        entry = {"image": [str(files[key]) for key in MODALITIES], "case": case, "group": case}
        if files["seg"] is not None:
            entry["label"] = str(files["seg"])
        datalist.append(entry)
    raise_problems(problems, f"BraTS {release} dataset {str(data_dir)!r}")
    if not datalist:
        raise DatasetError(f"BraTS {release} dataset {str(data_dir)!r}: no cases found")
    return datalist


def _msd_datalist(data_dir: Path, require_labels: bool) -> list[dict]:
    """MSD Task01 datalist; the training cases come from dataset.json as MSD intends."""
    spec_path = data_dir / "dataset.json"
    try:
        spec = json.loads(spec_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise DatasetError(f"MSD dataset.json {str(spec_path)!r} cannot be read: {error}") from error
    modality = spec.get("modality")
    if isinstance(modality, dict):
        order = tuple(modality[k] for k in sorted(modality, key=int))
        if order != MSD_MODALITIES:
            raise DatasetError(
                f"MSD dataset.json {str(spec_path)!r}: modality order {order} differs from "
                f"Task01's {MSD_MODALITIES}; the channel reordering would be wrong"
            )
    training = spec.get("training")
    if not isinstance(training, list):
        # Fall back to listing imagesTr when dataset.json has no training list.
        training = [
            {"image": f"./imagesTr/{p.name}", "label": f"./labelsTr/{p.name}"}
            for p in visible_entries(data_dir / "imagesTr")
            if p.name.endswith(_NIFTI_EXTENSIONS)
        ]
    datalist, problems = [], []
    for item in training:
        image = (data_dir / item["image"]).resolve()
        label = (data_dir / item["label"]).resolve() if item.get("label") else None
        case = image.name.split(".")[0]
        if not image.is_file():
            problems.append(f"case {case}: image file {str(image)!r} listed in dataset.json is missing")
            continue
        if label is None or not label.is_file():
            if require_labels:
                problems.append(f"case {case}: label file {str(label)!r} is missing")
                continue
            label = None
        entry = {"image": str(image), "case": case, "group": case}
        if label is not None:
            entry["label"] = str(label)
        datalist.append(entry)
    raise_problems(problems, f"MSD Task01 dataset {str(data_dir)!r}")
    if not datalist:
        raise DatasetError(f"MSD Task01 dataset {str(data_dir)!r}: no cases found")
    return datalist


# ---------------------------------------------------------------------------- the dataset
from medadapt.data.dataset import Dataset  # noqa: E402  (the dataset builds on the readers above)


class BraTS(Dataset):
    """BraTS 2018-2021, 2023 GLI and MSD Task01: four MR sequences, TC / WT / ET regions."""

    name = "brats"
    tasks = ("segmentation3d",)
    spatial_dims = 3
    unit = "cases"
    demo_note = "real MNI152 anatomy (nilearn) with SYNTHETIC tumour lesions"
    sequences = MODALITIES
    label_settings = ("release",)
    small_demo = {"num_cases": 4, "size": 32}
    regions = ("tumour core (TC)", "whole tumour (WT)", "enhancing tumour (ET)")

    def datalist(self, root, task="segmentation3d", require_labels=True, release="auto", **_):
        return brats_datalist(root, release=release, require_labels=require_labels)

    def validate(self, datalist, task, root=None, require_labels=True, read_data=True, release="auto", **_):
        # The label values are checked against the release before training starts: read
        # with the wrong convention, a release silently loses its enhancing tumour.
        from medadapt.data.validate import validate_datalist
        from medadapt.datasets.brats.labels import check_label_values

        if release == "auto" and root is not None:
            release = detect_release(root)
        release = None if release == "auto" else canonical_release(release)
        check = (lambda values, path, case: check_label_values(values, release, case, path)) if release else None
        validate_datalist(datalist, "segmentation", sequences=len(MODALITIES), check_labels=check,
                          read_data=read_data, require_labels=require_labels)

    def plain_datalist(self, path):
        """One case folder holding the four sequences as separate files (any release's
        names), or 4D NIfTI files with the sequences as channels (t1, t1ce, t2, flair)."""
        folder = Path(path)
        if folder.is_dir():
            for separator, names in FILE_SUFFIXES.values():
                files = {m: [f for f in visible_entries(folder) if f.name.lower().endswith(
                    tuple(f"{separator}{names[m]}{e}" for e in _NIFTI_EXTENSIONS))] for m in MODALITIES}
                if all(len(found) == 1 for found in files.values()):
                    return [{"image": [str(files[m][0]) for m in MODALITIES], "case": folder.name}]
        return super().plain_datalist(path)

    def make_demo(self, folder, **options):
        from medadapt.datasets.brats.demo import make_demo_brats

        return make_demo_brats(folder, **options)

    def output_names(self, task):
        return list(self.regions)

    def label_values(self, task, release="auto", **_):
        # Written maps hold the release's own values ("auto": BraTS 2021's), named as it names them.
        from medadapt.datasets.brats.labels import RELEASES

        spec = RELEASES[canonical_release("2021" if release == "auto" else release)]
        return {spec.meaning[value]: value for value in sorted(spec.meaning)}


BRATS = BraTS()
DATASETS = (BRATS,)
