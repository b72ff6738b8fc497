"""Dataset presets of ``medadapt bench protocol``: how to get a datalist, its transforms and its task.

The 2D presets of :mod:`medadapt.data` (``busi``, ``isic2018``, ``isic2019``) read the official
layouts, or build the embedded demo when no root is given. ``mni152_tissue`` (see
:mod:`medadapt.protocol.mni152`) is real MRI from nilearn with a fixed, z-separated test set;
``mni152_tissue_3d`` is the same MRI as stacks of slices for the 3D slice-stack segmenter.
BraTS (whole volumes under a sliding window) is trained with ``bundles/dka_brats`` instead.

Adding a preset = one :class:`ProtocolPreset` entry in ``PRESETS``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class ProtocolPreset:
    """One dataset of the protocol runner.

    Arguments:
        name: ``--dataset`` name.
        tasks: supported tasks ("classification", "segmentation", "segmentation3d"); the first
            is the default.
        prepare: ``prepare(root, work_dir, task, demo_options) -> (root, datalist, is_demo)``.
        transforms: ``transforms(train, task, size) -> Compose`` giving "image" (3, H, W) in
            [0, 1] and "label" (a class index, or a (1, H, W) mask / class map); for
            "segmentation3d" (3, H, W, S) and (1, H, W, S), slices on the last axis.
        num_classes: ``num_classes(task)``: classes (classification), output channels
            (segmentation: 1 for a binary sigmoid mask).
        stratify_key: entry key to stratify splits by, for classification.
        default_size: input size when ``--image-size`` is not given (64 for demos).
        partition: ``partition(datalist) -> (pool, fixed test)`` for datasets whose test set
            is fixed by design; None lets ``make_splits`` draw the test set.
        pool_holdout: with ``partition``, the ``test_fraction`` passed to ``make_splits`` on
            the pool; what it holds out is kept as the (unused) "val" list of the splits.
        note: one line for the report.
        classes: class names, if any.
        unit: what one training sample is called in the table ("imgs", "slices").
        num_slices: slices per sample for "segmentation3d" (the slice-stack model's depth).
    """

    name: str
    tasks: tuple[str, ...]
    prepare: Callable
    transforms: Callable
    num_classes: Callable[[str], int]
    stratify_key: str | None = None
    default_size: int = 256
    partition: Callable | None = None
    pool_holdout: float = 0.05
    note: str = ""
    classes: tuple[str, ...] | None = field(default=None)
    unit: str = "imgs"
    num_slices: int | None = None

    def multilabel(self, task: str) -> bool:
        """Sigmoid outputs (binary masks) rather than softmax classes."""
        return task != "classification" and self.num_classes(task) == 1


def _data_preset(name: str) -> ProtocolPreset:
    from medadapt.data.presets import PRESETS as DATA_PRESETS

    data_preset = DATA_PRESETS[name]

    def prepare(root, work_dir, task, demo_options):
        from medadapt import data

        if root:
            if not Path(root).is_dir():
                raise FileNotFoundError(f"--root {root} does not exist or is not a folder")
            entries = data.load_datalist(name, root, task=task)
            classes = len(data_preset.classes) if task == "classification" and data_preset.classes else None
            data.validate_datalist(entries, data_preset.validation_task(task), num_classes=classes)
            return str(root), entries, False
        demo_root = data.demo.make_demo(name, Path(work_dir) / name, **(demo_options or {}))
        return demo_root, data.load_datalist(name, demo_root, task=task), True

    def transforms(train, task, size):
        from medadapt.data import transforms as t

        builder = {"busi": t.busi_transforms, "isic2018": t.isic_transforms, "isic2019": t.isic_transforms}[name]
        return builder(train=train, task=task, size=size, normalization="minmax")

    def num_classes(task):
        return len(data_preset.classes) if task == "classification" else 1

    return ProtocolPreset(
        name=name, tasks=data_preset.tasks, prepare=prepare, transforms=transforms, num_classes=num_classes,
        stratify_key=data_preset.stratify_key, classes=data_preset.classes,
        note=f"{name} in its official layout (medadapt.data preset), or its embedded demo without --root",
    )


def _mni152_preset(volumes: bool = False) -> ProtocolPreset:
    from medadapt.protocol import mni152

    name = mni152.NAME_3D if volumes else mni152.NAME

    def prepare(root, work_dir, task, demo_options):
        if demo_options:
            raise ValueError(f"--demo-option: dataset {name!r} has no demo options")
        # Both presets share one folder: the stacks are written beside the slices.
        folder = mni152.build_slices(root or Path(work_dir) / mni152.NAME)
        return folder, mni152.datalist(folder, volumes=volumes), False

    sample = (f"stacks of {mni152.STACK_SLICES} consecutive axial slices (NIfTI)" if volumes else "axial slices")
    return ProtocolPreset(
        name=name, tasks=("segmentation3d",) if volumes else ("segmentation",), prepare=prepare,
        transforms=lambda train, task, size: mni152.transforms(train, task, size),
        num_classes=lambda task: len(mni152.CLASSES), partition=mni152.partition,
        classes=mni152.CLASSES, unit="stacks" if volumes else "slices",
        num_slices=mni152.STACK_SLICES if volumes else None,
        note=(f"real MNI152 T1 (nilearn, 2 mm) {sample}, GM / WM labels from the template's tissue maps; "
              f"fixed test band of {mni152.TEST_SLICES} slices, {mni152.GAP_SLICES}-slice gaps to the training pool"),
    )


_BUILDERS: dict[str, Callable[[], ProtocolPreset]] = {
    "busi": lambda: _data_preset("busi"),
    "isic2018": lambda: _data_preset("isic2018"),
    "isic2019": lambda: _data_preset("isic2019"),
    "mni152_tissue": _mni152_preset,
    "mni152_tissue_3d": lambda: _mni152_preset(volumes=True),
}
PRESET_NAMES = tuple(_BUILDERS)


def get_preset(name: str) -> ProtocolPreset:
    """The protocol preset ``name``; raises naming ``--dataset`` and the known ones."""
    if name == "brats":
        raise ValueError("--dataset: 'brats' is whole volumes under a sliding window; bench protocol runs the presets "
                         f"{list(PRESET_NAMES)} (train BraTS with bundles/dka_brats)")
    if name not in _BUILDERS:
        raise ValueError(f"--dataset: unknown dataset {name!r}; choose one of {list(PRESET_NAMES)}")
    return _BUILDERS[name]()


def prepare_dataset(preset: ProtocolPreset, root: str | os.PathLike | None, work_dir: str | os.PathLike,
                    task: str, demo_options: dict | None = None) -> tuple[str, list[dict], bool]:
    """(dataset folder, datalist, whether it is the embedded demo)."""
    return preset.prepare(str(root) if root else None, work_dir, task, demo_options)
