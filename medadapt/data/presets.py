"""Registry of dataset presets (see `medadapt.data.preset.DatasetPreset`): one line each."""

from __future__ import annotations

import os

from medadapt.data.brats import BRATS
from medadapt.data.busi import BUSI
from medadapt.data.isic import ISIC2018, ISIC2019
from medadapt.data.mni152 import MNI152_TISSUE, MNI152_TISSUE_3D
from medadapt.data.preset import DatasetPreset

PRESETS: dict[str, DatasetPreset] = {
    preset.name: preset for preset in (BRATS, BUSI, ISIC2018, ISIC2019, MNI152_TISSUE, MNI152_TISSUE_3D)
}


def get_preset(name: str) -> DatasetPreset:
    """The preset called ``name``; raises naming the known ones."""
    if name not in PRESETS:
        raise ValueError(f"unknown dataset {name!r}; known: {sorted(PRESETS)}")
    return PRESETS[name]


def load_datalist(name: str, root: str | os.PathLike, task: str | None = None, **options) -> list[dict]:
    """Datalist of dataset ``name`` under ``root``.

    Arguments:
        name: preset name (see `PRESETS`).
        root: dataset folder in the official layout.
        task: one of the preset's tasks (default: its first).
        options: preset options, e.g. ``release`` for BraTS or ``mask_cache`` for BUSI.
    """
    preset = get_preset(name)
    return preset.datalist(root, task=preset.check_task(task), **options)


def dataset_or_demo(name: str, dataset_dir: str | os.PathLike | None, demo_dir: str | os.PathLike, **demo_options) -> str:
    """``dataset_dir`` if one is given, else the demo of ``name`` built (once) in ``demo_dir``.

    Arguments:
        name: preset name.
        dataset_dir: the real dataset folder, or None / "" to use the demo.
        demo_dir: where to build the demo.
        demo_options: passed to the demo generator (e.g. ``num_cases``).
    """
    preset = get_preset(name)
    if dataset_dir:
        return str(dataset_dir)
    return preset.make_demo(demo_dir, **demo_options)
