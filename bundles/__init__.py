"""medadapt's MONAI bundles, one folder each (``medadapt.bundles`` in an installed package).

Each folder is a complete MONAI bundle whose configs sit at its top, so that
``python -m monai.bundle run --config_file bundles/dka_brats/train.json`` runs it from the
repository root; `medadapt.engine.bundle.export_bundle` (``medadapt bundle export NAME DIR``)
writes the same files in the MONAI model-zoo layout. This module only finds them.
"""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parent


def names() -> list[str]:
    """The bundles that ship with medadapt."""
    return sorted(p.name for p in ROOT.iterdir() if (p / "train.json").is_file() and (p / "metadata.json").is_file())


def path(name: str) -> Path:
    """The folder of bundle ``name``; an error naming the bundles there are otherwise."""
    folder = ROOT / name
    if name not in names():
        raise ValueError(f"no bundle {name!r}; medadapt's bundles are {names()}")
    return folder
