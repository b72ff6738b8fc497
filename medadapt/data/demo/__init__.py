"""Small demo datasets in the official layouts, built deterministically on this machine.

Real anatomy or real photographs where available (MNI152 from nilearn, scikit-image's
bundled fundus photograph), with SYNTHETIC lesions; each folder carries a README.txt saying
so. The bundles use them when no dataset folder is given. Every generator is idempotent
(a second call with the same arguments returns at once) and returns the folder that the
matching preset reads (`medadapt.data.presets.load_datalist(name, folder)`).
"""

from __future__ import annotations

import os

from medadapt.data.demo.brats import make_demo_brats
from medadapt.data.demo.busi import make_demo_busi
from medadapt.data.demo.isic import make_demo_isic2018, make_demo_isic2019

# preset name -> generator
DEMOS = {
    "brats": make_demo_brats,
    "busi": make_demo_busi,
    "isic2018": make_demo_isic2018,
    "isic2019": make_demo_isic2019,
}


def make_demo(name: str, root: str | os.PathLike, **options) -> str:
    """Build the demo of dataset ``name`` ("brats", "busi", "isic2018", "isic2019") in ``root``."""
    if name not in DEMOS:
        raise ValueError(f"no demo for dataset {name!r}; known: {sorted(DEMOS)}")
    return DEMOS[name](root, **options)


__all__ = ["DEMOS", "make_demo", "make_demo_brats", "make_demo_busi", "make_demo_isic2018", "make_demo_isic2019"]
