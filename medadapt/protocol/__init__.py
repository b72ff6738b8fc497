"""``medadapt bench protocol``: the papers' table of methods x data fractions x folds.

::

    from medadapt.protocol import run_protocol
    rows = run_protocol("busi", task="classification", root="data/Dataset_BUSI_with_GT",
                        methods=["dka", "adapter", "linear"], fractions=[0.0063, 0.0125, 1.0],
                        folds=3, epochs=50, backbone="litemedsam", out="results/busi")
    print(rows.markdown)          # also results/busi/protocol.md and protocol.csv

Modules: `runner` (``run_protocol``, training and evaluation of one cell, iso-parameter
sizing), `presets` (the datasets it runs on), `mni152` (real MNI152 MRI slices and
4-slice stacks with grey / white matter labels, from nilearn, offline), `report` (the table), `cli` (``medadapt bench``).

Names are resolved lazily so that importing the package does not import torch or MONAI.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "run_protocol": "medadapt.protocol.runner",
    "ProtocolTable": "medadapt.protocol.runner",
    "iso_size": "medadapt.protocol.runner",
    "train_cell": "medadapt.protocol.runner",
    "evaluate": "medadapt.protocol.runner",
    "DEFAULT_METHODS": "medadapt.protocol.runner",
    "DEFAULT_FRACTIONS": "medadapt.protocol.runner",
    "get_preset": "medadapt.protocol.presets",
    "PRESET_NAMES": "medadapt.protocol.presets",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'medadapt.protocol' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def __dir__():
    return __all__
