"""What every dataset shares: the `Dataset` base and registry, validation, data-fraction splits.

::

    from medadapt import data
    dataset = data.get_dataset("busi")                       # medadapt/datasets/busi/
    datalist = data.load_datalist("busi", "/data/Dataset_BUSI_with_GT")
    data.validate_datalist(datalist, "classification", num_classes=3)
    splits = data.make_splits(datalist, [0.0063, 1.0], folds=5, seed=0, label_key="class")
    train = data.load_split(splits, 0.0063, fold=0, part="train")

Modules: `dataset` (`Dataset`, what a dataset owns, and the registry of the datasets in
``medadapt/datasets/``), `validate`, `splits`, `layout` (reading folder layouts), `transforms`
(MONAI transforms several datasets' bundles use), `demo` (what the embedded demos share),
`errors`, `cli` (``medadapt split``). Each dataset's own code is in ``medadapt/datasets/<name>/``;
the transform chains are each bundle's.

Names are resolved lazily so that importing the package does not import MONAI.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "DatasetError": "medadapt.data.errors",
    "MissingFileError": "medadapt.data.errors",
    # datasets
    "Dataset": "medadapt.data.dataset",
    "datasets": "medadapt.data.dataset",
    "get_dataset": "medadapt.data.dataset",
    "load_datalist": "medadapt.data.dataset",
    "dataset_or_demo": "medadapt.data.dataset",
    # transforms several bundles use
    "MergeMasksd": "medadapt.data.transforms",
    "SelectChannelsd": "medadapt.data.transforms",
    "CheckFinited": "medadapt.data.transforms",
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
