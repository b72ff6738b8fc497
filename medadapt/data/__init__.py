"""Datasets: presets reading the official layouts, validation, data-fraction splits, demos.

::

    from medadapt import data
    datalist = data.load_datalist("busi", "/data/Dataset_BUSI_with_GT")   # or brats_datalist(...)
    data.validate_datalist(datalist, "classification", num_classes=3)
    splits = data.make_splits(datalist, [0.0063, 1.0], folds=5, seed=0, label_key="class")
    train = data.load_split(splits, 0.0063, fold=0, part="train")
    transform = data.busi_transforms(train=True, task="classification", normalization="imagenet")

Modules: `brats`, `busi`, `isic`, `mni152` (one per dataset: its reader and its preset),
`preset` (`DatasetPreset`, what a dataset owns), `presets` (the registry), `brats_labels`
(label conventions per BraTS release), `transforms` (MONAI dictionary transforms, written as
configs), `validate`, `splits`, `demo` (embedded demo datasets), `cli` (``medadapt split``).

Names are resolved lazily so that importing the package does not import MONAI.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "DatasetError": "medadapt.data.errors",
    "MissingFileError": "medadapt.data.errors",
    # presets
    "PRESETS": "medadapt.data.presets",
    "DatasetPreset": "medadapt.data.preset",
    "get_preset": "medadapt.data.presets",
    "load_datalist": "medadapt.data.presets",
    "dataset_or_demo": "medadapt.data.presets",
    "brats_datalist": "medadapt.data.brats",
    "detect_release": "medadapt.data.brats",
    "busi_datalist": "medadapt.data.busi",
    "write_merged_masks": "medadapt.data.busi",
    "BUSI_CLASSES": "medadapt.data.busi",
    "isic2018_datalist": "medadapt.data.isic",
    "isic2019_datalist": "medadapt.data.isic",
    "ISIC2019_CLASSES": "medadapt.data.isic",
    # BraTS labels
    "RELEASES": "medadapt.data.brats_labels",
    "ConvertBraTSLabels": "medadapt.data.brats_labels",
    "ConvertBraTSLabelsd": "medadapt.data.brats_labels",
    # transforms
    "brats_transforms": "medadapt.data.transforms",
    "image2d_transforms": "medadapt.data.transforms",
    "busi_transforms": "medadapt.data.transforms",
    "isic_transforms": "medadapt.data.transforms",
    "MergeMasksd": "medadapt.data.transforms",
    "SelectChannelsd": "medadapt.data.transforms",
    "BraTSChannelOrderd": "medadapt.data.transforms",
    "NORMALIZATIONS": "medadapt.data.transforms",
    "brats_transform_config": "medadapt.data.transforms",
    "image2d_transform_config": "medadapt.data.transforms",
    # checks and splits
    "validate_datalist": "medadapt.data.validate",
    "make_splits": "medadapt.data.splits",
    "save_splits": "medadapt.data.splits",
    "load_split": "medadapt.data.splits",
    "check_no_leakage": "medadapt.data.splits",
    "content_hash": "medadapt.data.splits",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in ("demo", "cli"):
        return importlib.import_module(f"medadapt.data.{name}")
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'medadapt.data' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def __dir__():
    return __all__ + ["demo"]
