"""``medadapt bench protocol``: the papers' table of methods x data fractions x folds.

::

    from medadapt.protocol import run_protocol
    rows = run_protocol("busi", task="classification", root="data/Dataset_BUSI_with_GT",
                        methods=["dka", "adapter", "linear"], fractions=[0.0063, 0.0125, 1.0],
                        folds=3, epochs=50, backbone="litemedsam", out="results/busi")
    print(rows.markdown)          # also results/busi/protocol.md and protocol.csv

Every cell runs the dataset's bundle (``train.json`` with overrides, then ``evaluate.json``);
the datasets are `medadapt.data`'s presets (``mni152_tissue`` and ``mni152_tissue_3d``: real
MNI152 MRI from nilearn, offline).

Modules: `runner` (``run_protocol``, one cell, iso-parameter sizing), `distributed` (cells as
Ray tasks), `report` (the table), `cli` (``medadapt bench``).

Names are resolved lazily so that importing the package does not import torch or MONAI.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "run_protocol": "medadapt.protocol.runner",
    "ProtocolTable": "medadapt.protocol.runner",
    "iso_size": "medadapt.protocol.runner",
    "run_cell": "medadapt.protocol.runner",
    "find_bundle": "medadapt.protocol.runner",
    "DEFAULT_METHODS": "medadapt.protocol.runner",
    "DEFAULT_FRACTIONS": "medadapt.protocol.runner",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'medadapt.protocol' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def __dir__():
    return __all__
