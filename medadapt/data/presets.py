"""Registry of dataset presets: name -> how to list it, split it, check it and transform it.

Adding a dataset = one module with its datalist function plus one entry here.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

from medadapt.data.brats import brats_datalist
from medadapt.data.busi import BUSI_CLASSES, busi_datalist
from medadapt.data.isic import ISIC2019_CLASSES, isic2018_datalist, isic2019_datalist


@dataclass(frozen=True)
class DatasetPreset:
    """What the tools need to know about one dataset.

    Arguments:
        name: registry name (``--dataset``).
        tasks: tasks the dataset supports; the first is the default.
        spatial_dims: 2 or 3.
        datalist: ``datalist(root, task, **options) -> list[dict]``.
        stratify_key: entry key holding the class to stratify splits by (None: no classes).
        classes: class names in label order, if any.
        demo: name of the `medadapt.data.demo` function building a demo copy.
    """

    name: str
    tasks: tuple[str, ...]
    spatial_dims: int
    datalist: Callable[..., list[dict]]
    stratify_key: str | None
    classes: tuple[str, ...] | None
    demo: str

    def validation_task(self, task: str) -> str:
        """The `validate_datalist` task for ``task`` of this dataset."""
        return "brats" if self.name == "brats" else task


def _brats(root, task="segmentation", release="auto", require_labels=True, **_):
    return brats_datalist(root, release=release, require_labels=require_labels)


def _busi(root, task="classification", mask_cache=None, **_):
    return busi_datalist(root, task=task, mask_cache=mask_cache)


def _isic2018(root, task="segmentation", require_labels=True, **_):
    return isic2018_datalist(root, require_labels=require_labels)


def _isic2019(root, task="classification", **_):
    return isic2019_datalist(root)


PRESETS: dict[str, DatasetPreset] = {
    "brats": DatasetPreset("brats", ("segmentation",), 3, _brats, None, None, "make_demo_brats"),
    "busi": DatasetPreset("busi", ("classification", "segmentation"), 2, _busi, "class", BUSI_CLASSES, "make_demo_busi"),
    "isic2018": DatasetPreset("isic2018", ("segmentation",), 2, _isic2018, None, None, "make_demo_isic2018"),
    "isic2019": DatasetPreset("isic2019", ("classification",), 2, _isic2019, "class", ISIC2019_CLASSES[:-1], "make_demo_isic2019"),
}


def get_preset(name: str) -> DatasetPreset:
    """The preset called ``name``; raises naming the known ones."""
    if name not in PRESETS:
        raise ValueError(f"unknown dataset {name!r}; known: {sorted(PRESETS)}")
    return PRESETS[name]


def load_datalist(name: str, root: str | os.PathLike, task: str | None = None, **options) -> list[dict]:
    """Datalist of dataset ``name`` under ``root``.

    Arguments:
        name: preset name ("brats", "busi", "isic2018", "isic2019").
        root: dataset folder in the official layout.
        task: one of the preset's tasks (default: its first).
        options: preset options, e.g. ``release`` for BraTS or ``mask_cache`` for BUSI.
    """
    preset = get_preset(name)
    task = task or preset.tasks[0]
    if task not in preset.tasks:
        raise ValueError(f"dataset {name!r} supports task(s) {list(preset.tasks)}, not {task!r}")
    return preset.datalist(root, task=task, **options)



def dataset_or_demo(name: str, dataset_dir: str | os.PathLike | None, demo_dir: str | os.PathLike, **demo_options) -> str:
    """``dataset_dir`` if one is given, else the demo of ``name`` built (once) in ``demo_dir``.

    Lets a bundle run out of the box: ``"dataset_dir": "$medadapt.data.presets.dataset_or_demo(
    'busi', None, 'demo_data/busi')"`` and a user overrides ``dataset_dir`` with the real folder.

    Arguments:
        name: preset name.
        dataset_dir: the real dataset folder, or None / "" to use the demo.
        demo_dir: where to build the demo.
        demo_options: passed to the demo generator (e.g. ``num_cases``).
    """
    get_preset(name)
    if dataset_dir:
        return str(dataset_dir)
    from medadapt.data.demo import make_demo

    return make_demo(name, demo_dir, **demo_options)
