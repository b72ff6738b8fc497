"""``decathlon``: your own segmentation data in one of the two standard layouts, read from its
``dataset.json`` (reader here, demo in `demo`).

- **Medical Segmentation Decathlon** (a ``TaskNN_Name`` folder): ``dataset.json`` with
  ``modality`` ({"0": "FLAIR", ...}: the channels), ``labels`` ({"0": "background", "1": ...}),
  ``training`` ([{"image": "./imagesTr/x.nii.gz", "label": "./labelsTr/x.nii.gz"}, ...]) and
  ``test`` (image paths); a multi-channel image is one 4D NIfTI, channels last.
- **nnU-Net v2 raw** (a ``DatasetNNN_Name`` folder): ``dataset.json`` with ``channel_names``
  ({"0": "T2", "1": "ADC"}), ``labels`` ({"background": 0, "PZ": 1, ...}), ``numTraining`` and
  ``file_ending`` (".nii.gz" for 3D, ".png" for 2D); ``imagesTr/<case>_<XXXX><ending>``, one
  file per channel (a 2D RGB PNG may hold three), ``labelsTr/<case><ending>``, ``imagesTs/``.

The class names and the number of channels come from the ``dataset.json``, never from code: the
generic segmentation bundles (``dka_mni152_tissue`` in 2D, ``dka_mni152_tissue_3d`` in 3D) take
``class_names``, ``num_classes`` and their input channels from `Decathlon.bundle_settings`, so
``--dataset_name decathlon --dataset_dir DIR`` is all they need. Labels are one class per pixel
(softmax, background included): values 0..K-1. nnU-Net's region-based labels and its ``ignore``
label are refused with an error saying so. Every case is its own group for splitting.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from medadapt.data.dataset import Dataset
from medadapt.data.errors import DatasetError, MissingFileError, format_problems, raise_problems
from medadapt.data.layout import natural_key, require_dir, visible_entries
from medadapt.tasks import get_task

DESCRIPTION = "dataset.json"
# The image files each spatial dimension is read from (PIL for PNG, nibabel for NIfTI).
FILE_ENDINGS = {".png": 2, ".nii.gz": 3, ".nii": 3}
_CHANNEL_FILE = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")


@dataclass(frozen=True)
class Description:
    """What a ``dataset.json`` says, checked: its layout ("msd" or "nnunet"), channel and label
    names in order (label k is value k), the file ending and the spatial dimensions."""

    root: Path
    layout: str
    channels: tuple[str, ...]
    labels: tuple[str, ...]
    file_ending: str
    spatial_dims: int
    raw: dict

    @property
    def file(self) -> Path:
        return self.root / DESCRIPTION


# ---------------------------------------------------------------------------- dataset.json
def find_root(root: str | os.PathLike) -> Path:
    """The folder holding ``dataset.json``: ``root``, or its only subfolder that holds one."""
    top = require_dir(root, "Decathlon / nnU-Net dataset")
    if (top / DESCRIPTION).is_file():
        return top
    below = [p for p in visible_entries(top) if p.is_dir() and (p / DESCRIPTION).is_file()]
    if len(below) == 1:
        return below[0]
    found = f"; its subfolders {[p.name for p in below]} each hold one: give one of them" if below else ""
    raise MissingFileError(f"{top} holds no {DESCRIPTION} (a Medical Segmentation Decathlon task folder or an "
                           f"nnU-Net raw dataset folder has one at its top){found}")


def read_description(root: str | os.PathLike) -> Description:
    """The checked ``dataset.json`` of the dataset folder ``root``; a `DatasetError` naming the
    file and the field at fault otherwise."""
    folder = find_root(root)
    file = folder / DESCRIPTION
    try:
        raw = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise DatasetError(f"{file} is not a readable JSON file: {error}") from None
    if not isinstance(raw, dict):
        raise DatasetError(f"{file} must hold a JSON object, not a {type(raw).__name__}")
    if "channel_names" in raw:
        return _nnunet_description(folder, raw)
    if "modality" in raw:
        return _msd_description(folder, raw)
    raise DatasetError(f"{file} is neither a Medical Segmentation Decathlon dataset.json (with 'modality', 'labels', "
                       f"'training') nor an nnU-Net v2 one (with 'channel_names', 'labels', 'file_ending'); it has "
                       f"{sorted(raw)}")


def _numbered_names(value, field: str, file: Path) -> tuple[str, ...]:
    """{"0": name, "1": name, ...} as names in order; an error unless the keys are 0..N-1."""
    if not isinstance(value, dict) or not value:
        raise DatasetError(f"{file}: '{field}' must be a non-empty object {{\"0\": name, ...}}, got {value!r:.80}")
    try:
        numbered = {int(k): str(v) for k, v in value.items()}
    except ValueError:
        raise DatasetError(f"{file}: the keys of '{field}' must be numbers 0, 1, ..., got {sorted(value)}") from None
    if sorted(numbered) != list(range(len(numbered))):
        raise DatasetError(f"{file}: the keys of '{field}' must be 0..{len(numbered) - 1} without gaps, "
                           f"got {sorted(numbered)}")
    return tuple(numbered[k] for k in range(len(numbered)))


def _check_labels(labels: tuple[str, ...], file: Path) -> tuple[str, ...]:
    if len(labels) < 2:
        raise DatasetError(f"{file}: 'labels' must name the background (0) and at least one class, got {list(labels)}")
    return labels


def _msd_description(folder: Path, raw: dict) -> Description:
    file = folder / DESCRIPTION
    channels = _numbered_names(raw.get("modality"), "modality", file)
    labels = _check_labels(_numbered_names(raw.get("labels"), "labels", file), file)
    training = raw.get("training")
    if not isinstance(training, list) or not training:
        raise DatasetError(f"{file}: 'training' must be a non-empty list of {{\"image\", \"label\"}} pairs")
    ending = _ending(str(training[0].get("image", "")) if isinstance(training[0], dict) else "")
    if FILE_ENDINGS.get(ending) != 3:
        raise DatasetError(f"{file}: the Decathlon's images are NIfTI volumes (.nii.gz); its first training image is "
                           f"{training[0]!r:.120}")
    return Description(folder, "msd", channels, labels, ending, 3, raw)


def _nnunet_description(folder: Path, raw: dict) -> Description:
    file = folder / DESCRIPTION
    channels = _numbered_names(raw.get("channel_names"), "channel_names", file)
    labels = raw.get("labels")
    if not isinstance(labels, dict) or not labels:
        raise DatasetError(f"{file}: 'labels' must be an object {{\"background\": 0, \"name\": 1, ...}}, got {labels!r:.80}")
    regions = sorted(name for name, value in labels.items() if isinstance(value, (list, tuple)))
    if regions or "regions_class_order" in raw:
        raise DatasetError(f"{file}: region-based labels ({regions or 'regions_class_order'}) are not supported: "
                           "medadapt trains one class per pixel; give each label a single value")
    if "ignore" in labels:
        raise DatasetError(f"{file}: the 'ignore' label is not supported: relabel those pixels or leave them out")
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in labels.values()):
        raise DatasetError(f"{file}: every label value must be a whole number, got {labels}")
    by_value = {v: str(name) for name, v in labels.items()}
    if sorted(by_value) != list(range(len(labels))) or len(by_value) != len(labels):
        raise DatasetError(f"{file}: the label values must be 0..{len(labels) - 1}, each once (0 the background), "
                           f"got {labels}")
    ending = raw.get("file_ending")
    if ending not in FILE_ENDINGS:
        raise DatasetError(f"{file}: 'file_ending' {ending!r} is not supported: medadapt reads "
                           f"{sorted(FILE_ENDINGS)} (PNG for 2D, NIfTI for 3D)")
    names = _check_labels(tuple(by_value[v] for v in range(len(by_value))), file)
    return Description(folder, "nnunet", channels, names, ending, FILE_ENDINGS[ending], raw)


def _ending(path: str) -> str:
    name = path.lower()
    return next((e for e in sorted(FILE_ENDINGS, key=len, reverse=True) if name.endswith(e)), Path(name).suffix)


# ---------------------------------------------------------------------------- datalists
def decathlon_datalist(root: str | os.PathLike, require_labels: bool = True) -> list[dict]:
    """Entries {"image" (a path, or one path per channel file), "label", "case", "group"} of the
    dataset under ``root``; without ``require_labels``, its test images (``imagesTs``, the MSD
    ``test`` list) when it has any, else its training images, without labels."""
    description = read_description(root)
    entries = _msd_entries(description) if description.layout == "msd" else _nnunet_entries(description)
    if require_labels:
        return entries
    test = _msd_test(description) if description.layout == "msd" else _nnunet_cases(description, "imagesTs")
    return test or [{k: v for k, v in e.items() if k != "label"} for e in entries]


def _msd_entries(description: Description) -> list[dict]:
    root, problems, entries = description.root, [], []
    for index, pair in enumerate(description.raw["training"]):
        if not isinstance(pair, dict) or not {"image", "label"} <= set(pair):
            problems.append(f"training[{index}] is not an {{\"image\", \"label\"}} pair: {pair!r:.80}")
            continue
        image, label = (str((root / str(pair[k])).resolve()) for k in ("image", "label"))
        case = _case_of(image, description.file_ending)
        entries.append({"image": image, "label": label, "case": case, "group": case})
    raise_problems(problems, str(description.file))
    return entries


def _msd_test(description: Description) -> list[dict]:
    cases = []
    for path in description.raw.get("test") or []:
        image = str((description.root / str(path.get("image", "") if isinstance(path, dict) else path)).resolve())
        cases.append({"image": image, "case": _case_of(image, description.file_ending),
                      "group": _case_of(image, description.file_ending)})
    return cases


def _case_of(path: str, ending: str) -> str:
    name = Path(path).name
    return name[: -len(ending)] if name.lower().endswith(ending) else Path(name).stem


def channel_files(folder: Path, ending: str) -> dict[str, list[Path]]:
    """nnU-Net's image files of ``folder`` by case: ``<case>_<XXXX><ending>``, in channel order."""
    cases: dict[str, list[tuple[int, Path]]] = {}
    for path in visible_entries(folder) if folder.is_dir() else []:
        if not (path.is_file() and path.name.lower().endswith(ending)):
            continue
        match = _CHANNEL_FILE.match(path.name[: -len(ending)])
        if match:
            cases.setdefault(match["case"], []).append((int(match["channel"]), path))
    return {case: [p for _, p in sorted(files)] for case, files in sorted(cases.items(), key=lambda kv: natural_key(kv[0]))}


def _nnunet_cases(description: Description, folder: str) -> list[dict]:
    entries = []
    for case, files in channel_files(description.root / folder, description.file_ending).items():
        image = [str(f) for f in files]
        entries.append({"image": image if len(image) > 1 else image[0], "case": case, "group": case})
    return entries


def _nnunet_entries(description: Description) -> list[dict]:
    root, ending = description.root, description.file_ending
    labels_dir = root / "labelsTr"
    if not labels_dir.is_dir():
        raise MissingFileError(f"{root}: an nnU-Net raw dataset has a labelsTr/ folder beside {DESCRIPTION}; none found")
    labels = {_case_of(str(p), ending): p for p in visible_entries(labels_dir)
              if p.is_file() and p.name.lower().endswith(ending)}
    images = {e["case"]: e for e in _nnunet_cases(description, "imagesTr")}
    problems = [f"case {case}: label {labels[case]} has no image imagesTr/{case}_0000{ending}"
                for case in sorted(set(labels) - set(images))]
    problems += [f"case {case}: imagesTr/{case}_0000{ending} has no label labelsTr/{case}{ending}"
                 for case in sorted(set(images) - set(labels))]
    expected = description.raw.get("numTraining")
    if isinstance(expected, int) and expected != len(labels):
        problems.append(f"{description.file} says numTraining {expected}, but labelsTr/ holds {len(labels)} {ending} "
                        "label(s)")
    raise_problems(problems, f"nnU-Net dataset {root}")
    if not labels:
        raise DatasetError(f"nnU-Net dataset {root}: labelsTr/ holds no {ending} label")
    return [{**images[case], "label": str(labels[case])} for case in sorted(labels, key=natural_key)]


# ---------------------------------------------------------------------------- checks
def image_header(path: str) -> tuple[tuple[int, ...], int]:
    """(spatial shape, channels) of one image file, from its header: a PNG's rows, columns and
    bands; a NIfTI's first three axes and its fourth (1 for a 3D volume)."""
    if path.lower().endswith(".png"):
        from PIL import Image

        with Image.open(path) as image:
            return (image.size[1], image.size[0]), len(image.getbands())
    import nibabel as nib

    shape = tuple(int(n) for n in nib.load(path).shape)
    return shape[:3], shape[3] if len(shape) == 4 else 1


def channel_problems(entries: Sequence[dict], description: Description) -> list[str]:
    """Cases whose image files do not hold the channels ``dataset.json`` names (a 2D RGB PNG
    counts three), or whose channel files differ in size."""
    wanted, problems = len(description.channels), []
    for entry in entries:
        files = entry["image"] if isinstance(entry["image"], (list, tuple)) else [entry["image"]]
        try:
            headers = [image_header(str(f)) for f in files]
        except Exception:  # noqa: BLE001 (missing and unreadable files are the shared validation's to name)
            continue
        found = sum(channels for _, channels in headers)
        if found != wanted:
            problems.append(f"case {entry['case']}: {len(files)} image file(s) ({os.path.basename(files[0])}...) hold "
                            f"{found} channel(s); {description.file} names {wanted}: {list(description.channels)}")
        elif len({shape for shape, _ in headers}) > 1:
            problems.append(f"case {entry['case']}: its channel files differ in size {sorted({s for s, _ in headers})}")
    return problems


def label_checker(description: Description):
    """``check_labels`` for `validate_datalist`: label values must be labels ``dataset.json`` defines."""
    allowed = set(range(len(description.labels)))

    def check(values: list, path: str, case: str) -> None:
        bad = sorted(v for v in values if v not in allowed)
        if bad:
            named = ", ".join(f"{i}: {name}" for i, name in enumerate(description.labels))
            raise DatasetError(f"label file {path!r} holds value(s) {bad[:8]} that {description.file} does not define "
                               f"(its labels: {named})")

    return check


# ---------------------------------------------------------------------------- the dataset
class Decathlon(Dataset):
    """Segmentation data in the Medical Segmentation Decathlon or nnU-Net v2 raw layout."""

    name = "decathlon"
    tasks = ("segmentation3d", "segmentation")
    spatial_dims = 3
    unit = "cases"
    demo_note = ("a SYNTHETIC nnU-Net-layout dataset (an organ and a lesion drawn as blobs); for the pipeline only, "
                 "not a result")
    small_demo = {"cases": 6, "size": 16}

    def describe(self, root: str | os.PathLike | None = None, **demo_options) -> Description:
        """The ``dataset.json`` of ``root``, or of the demo ``demo_options`` would build."""
        if root:
            return read_description(root)
        from medadapt.datasets.decathlon.demo import demo_description

        return demo_description(**demo_options)

    def datalist(self, root, task="segmentation3d", require_labels=True, **_):
        description = read_description(root)
        wanted = get_task(task).spatial_dims
        if description.spatial_dims != wanted:
            dims = {2: "2D images (PNG)", 3: "3D volumes (NIfTI)"}
            bundle = {2: "dka_mni152_tissue", 3: "dka_mni152_tissue_3d"}[description.spatial_dims]
            raise DatasetError(f"{description.file} describes {dims[description.spatial_dims]}, and a bundle of task "
                               f"{get_task(task).name!r} trains on {dims[wanted]}: use a {description.spatial_dims}D "
                               f"segmentation bundle (e.g. {bundle})")
        return decathlon_datalist(root, require_labels=require_labels)

    def plain_datalist(self, path):
        """Images outside the layout: one file, or every image file under a folder, a case each;
        nnU-Net's ``<case>_<XXXX>`` channel files of one folder are one case."""
        path = Path(path)
        files = [path] if path.is_file() else sorted(
            (p for p in path.rglob("*") if p.is_file() and not p.name.startswith(".")), key=lambda p: natural_key(str(p)))
        cases: dict[tuple[Path, str], list[str]] = {}
        for file in (f for f in files if _ending(f.name) in FILE_ENDINGS):
            stem = _case_of(str(file), _ending(file.name))
            match = _CHANNEL_FILE.match(stem)
            cases.setdefault((file.parent, match["case"] if match else stem), []).append(str(file))
        return [{"image": images if len(images) > 1 else images[0], "case": case}
                for (_, case), images in cases.items()]

    def validate(self, datalist, task, root=None, require_labels=True, read_data=True, **options):
        from medadapt.data.validate import validate_datalist

        description = self._description_of(datalist, root)
        channels = len(description.channels) if description else 1
        # A multi-channel volume: one file per channel, or one 4D file (the shared check).
        sequences = channels if channels > 1 and get_task(task).spatial_dims == 3 else None
        what = f"{self.name} datalist ({len(datalist)} entries)"
        problems = channel_problems(datalist, description) if description else []
        try:
            validate_datalist(datalist, "segmentation", read_data=read_data, require_labels=require_labels,
                              sequences=sequences, check_labels=label_checker(description) if description else None)
        except DatasetError as error:
            if not problems:
                raise
            # One error lists everything to fix: the shared checks' problems and the channels'.
            raise type(error)(f"{error}\n{format_problems(problems, what)}") from None
        raise_problems(problems, what)

    @staticmethod
    def _description_of(datalist, root) -> Description | None:
        """The ``dataset.json`` the entries come from: ``root``'s, or the one two folders above
        the first image (``<root>/imagesTr/<file>``); None for images from elsewhere."""
        if root:
            return read_description(root)
        first = datalist[0]["image"] if datalist else None
        first = first[0] if isinstance(first, (list, tuple)) else first
        folder = Path(str(first)).parent.parent if first else None
        return read_description(folder) if folder and (folder / DESCRIPTION).is_file() else None

    def make_demo(self, folder, **options):
        from medadapt.datasets.decathlon.demo import make_demo_decathlon

        return make_demo_decathlon(folder, **options)

    def output_names(self, task, root=None, **demo_options):
        return list(self.describe(root, **demo_options).labels)

    def bundle_settings(self, task, root=None, demo_options=None):
        try:
            description = self.describe(root, **dict(demo_options or {}))
        except MissingFileError as error:
            raise MissingFileError(f"{error}. The class names and channels of a model trained on such a dataset come "
                                   "from its dataset.json: give that folder, or set the bundle's class_names and "
                                   "image_channels") from None
        return {"class_names": list(description.labels), "image_channels": len(description.channels)}

    def multilabel(self, task):
        return False   # one class per pixel: softmax over the labels, background included


DATASETS = (Decathlon(),)
