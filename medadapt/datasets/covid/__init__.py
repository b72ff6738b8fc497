"""COVID-19 chest X-rays: the COVID-19 Radiography Database (Chowdhury et al., 2020; Rahman et
al., 2021), the LKA paper's Covid set, in its official layout (reader here, demo in `demo`).

Layout, as distributed on Kaggle: one folder per class, ``COVID/``, ``Normal/`` and
``Viral Pneumonia/``, each holding PNG images named after it (``COVID-1.png``,
``Viral Pneumonia-17.png``), directly or, from its fourth release on, in an ``images/``
subfolder beside ``masks/`` (lung masks, not read here). The fourth release also holds
``Lung_Opacity/``, which the papers' three-class task leaves out (so does this reader, saying so).

Class labels are the three classes in the papers' order: COVID = 0, Normal = 1,
Viral Pneumonia = 2. Every image is its own group for splitting (the database publishes no
patient ids).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from medadapt.data.dataset import Dataset
from medadapt.data.errors import DatasetError
from medadapt.data.layout import natural_key, require_dir, visible_entries

logger = logging.getLogger("medadapt")

CLASSES = ("COVID", "Normal", "Viral Pneumonia")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def _class_folder(root: Path, name: str) -> Path | None:
    """The folder of class ``name`` under ``root``, however its spaces and case are written."""
    wanted = name.lower().replace(" ", "_")
    for child in visible_entries(root):
        if child.is_dir() and child.name.lower().replace(" ", "_") == wanted:
            return child / "images" if (child / "images").is_dir() else child
    return None


def covid_datalist(root: str | os.PathLike) -> list[dict]:
    """Entries {"image", "label" (class index), "class", "class_name", "case", "group"} of the
    database under ``root`` (the folder holding the class folders, or one above it)."""
    top = require_dir(root, "COVID-19 Radiography Database")
    candidates = [top, *(p for p in visible_entries(top) if p.is_dir())]
    data_dir = next((c for c in candidates if all(_class_folder(c, n) for n in CLASSES)), None)
    if data_dir is None:
        raise DatasetError(f"COVID-19 Radiography Database {str(top)!r}: expected the class folders {list(CLASSES)} "
                           f"(in it or one level down); found {[p.name for p in visible_entries(top)]}")
    others = sorted(p.name for p in visible_entries(data_dir)
                    if p.is_dir() and p.name.lower().replace(" ", "_") not in {n.lower().replace(" ", "_") for n in CLASSES})
    if others:
        logger.info("COVID-19 Radiography Database: reading the classes %s; leaving out %s (not part of the papers' "
                    "three-class task)", list(CLASSES), others)
    datalist = []
    for index, name in enumerate(CLASSES):
        folder = _class_folder(data_dir, name)
        images = sorted((p for p in visible_entries(folder) if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES),
                        key=lambda p: natural_key(p.name))
        if not images:
            raise DatasetError(f"COVID-19 Radiography Database: class folder {str(folder)!r} holds no PNG/JPG image")
        datalist += [{"image": str(p), "label": index, "class": index, "class_name": name, "case": p.stem,
                      "group": p.stem} for p in images]
    return datalist


class Covid(Dataset):
    """COVID-19 Radiography Database: COVID / Normal / Viral Pneumonia chest X-rays."""

    name = "covid"
    tasks = ("classification",)
    classes = CLASSES
    stratify_key = "class"
    demo_note = "SYNTHETIC chest-radiograph-like images with SYNTHETIC lung patterns"
    small_demo = {"per_class": 4}

    def datalist(self, root, task="classification", require_labels=True, **_):
        return covid_datalist(root)

    def make_demo(self, folder, **options):
        from medadapt.datasets.covid.demo import make_demo_covid

        return make_demo_covid(folder, **options)


DATASETS = (Covid(),)
