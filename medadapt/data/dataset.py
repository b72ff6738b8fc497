"""`Dataset`: what one dataset knows, and the registry of the datasets medadapt ships.

A dataset knows how to read its official layout into a datalist, how to check it before any
training starts, how to build its embedded demo (and what is synthetic about it), and its class
or region names. Each lives in a folder of its own, ``medadapt/datasets/<name>/`` (reader,
transforms of its own, validation, demo), whose package lists its datasets in ``DATASETS``; the
registry finds them there, so adding a dataset touches no other file. The transform chains
that prepare a dataset for a model are the bundle's (``train#transforms``), where users edit them.

Bundles, the protocol runner, MONAI Label and the notebooks ask the dataset; none of them
branches on a dataset's name.
"""

from __future__ import annotations

import importlib
import os
import pkgutil
from collections.abc import Sequence
from pathlib import Path

from medadapt.tasks import Task, get_task

IMAGE_SUFFIXES = (".nii.gz", ".nii", ".png", ".jpg", ".jpeg")


def case_name(path: str | os.PathLike) -> str:
    """A file's name without its image suffix (``.nii.gz`` counts as one)."""
    name = Path(path).name
    for suffix in IMAGE_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem


class Dataset:
    """Base class; subclasses set the attributes and implement `datalist`.

    Attributes:
        name: registry name (``dataset_name`` in a bundle, ``--dataset`` on the command line).
        tasks: names of the tasks the dataset supports (`medadapt.tasks`); the first is the default.
        spatial_dims: 2 or 3.
        classes: class names in label order for classification, or None.
        stratify_key: entry key holding the class to stratify splits by, or None.
        unit: what one sample is called in reports ("images", "cases", "slices", "stacks").
        demo_note: what the embedded demo is, said wherever it is used; name anything
            SYNTHETIC as such.
        sequences: the names of its input channels when they are separate series of one
            study (BraTS: t1, t1ce, t2, flair), else empty.
        label_settings: bundle settings its `label_values` depend on (BraTS: the release).
        small_demo: demo options for a quick check (the tests' runs): a few small cases.
        image_channels: channels of an image as stored, where every image has the same (a
            grey PNG: 1); None where they vary (grey or colour photographs).
    """

    name: str = ""
    tasks: tuple[str, ...] = ()
    spatial_dims: int = 2
    classes: tuple[str, ...] | None = None
    stratify_key: str | None = None
    unit: str = "images"
    demo_note: str = "demo data"
    sequences: tuple[str, ...] = ()
    label_settings: tuple[str, ...] = ()
    small_demo: dict = {}
    image_channels: int | None = None

    # ------------------------------------------------------------------ data
    def datalist(self, root: str | os.PathLike, task: str, require_labels: bool = True, **options) -> list[dict]:
        """Entries of the dataset under ``root`` in its official layout ("image", "label",
        "case", "group", and for classification "class")."""
        raise NotImplementedError

    def plain_datalist(self, path: str | os.PathLike) -> list[dict]:
        """Entries for data outside the official layout, for prediction: one image or volume
        file, or every such file in a folder (sorted, recursively), each its own case."""
        from medadapt.data.layout import natural_key

        suffixes = (".nii.gz", ".nii") if self.spatial_dims == 3 else (".png", ".jpg", ".jpeg")
        path = Path(path)
        files = [path] if path.is_file() else sorted(
            (p for p in path.rglob("*") if p.is_file() and not p.name.startswith(".")), key=lambda p: natural_key(str(p)))
        files = [f for f in files if f.name.lower().endswith(suffixes)]
        return [{"image": str(f), "case": case_name(f)} for f in files]

    def check_task(self, task: str | Task | None) -> Task:
        """The task ``task`` (default: the dataset's first), or an error naming the supported ones."""
        task = get_task(task or self.tasks[0])
        if task.name not in self.tasks:
            raise ValueError(f"dataset {self.name!r} supports task(s) {list(self.tasks)}, not {task.name!r}")
        return task

    def validate(self, datalist: Sequence[dict], task: str | Task, root: str | os.PathLike | None = None,
                 require_labels: bool = True, read_data: bool = True, **options) -> None:
        """Raise a `DatasetError` naming every unusable entry (see `validate_datalist`);
        ``options`` are the reader options `datalist` was given."""
        from medadapt.data.validate import validate_datalist

        task = get_task(task)
        classes = self.output_names(task) if task.label_kind == "class" else None
        binary = task.dense and self.multilabel(task) and len(self.output_names(task)) == 1
        validate_datalist(datalist, "segmentation" if task.dense else "classification",
                          num_classes=len(classes) if classes else None, read_data=read_data,
                          require_labels=require_labels, binary_masks=binary)

    def make_demo(self, folder: str | os.PathLike, **options) -> str:
        """Build the embedded demo in ``folder`` (idempotent) and return the dataset root."""
        raise NotImplementedError(f"dataset {self.name!r} has no embedded demo: give its folder (dataset_dir)")

    def fixed_test(self, datalist: list[dict]) -> tuple[list[dict], list[dict]] | None:
        """(pool, test) for a dataset whose test set is fixed by its design, else None."""
        return None

    # ------------------------------------------------------------------ model
    def output_names(self, task: str | Task) -> list[str]:
        """Names of the model's output channels: classes, or segmented regions."""
        if get_task(task).label_kind == "class":
            return list(self.classes or [])
        return ["lesion"]

    def bundle_settings(self, task: str | Task, root: str | os.PathLike | None = None,
                        demo_options: dict | None = None) -> dict:
        """What a bundle's model takes from the data: "class_names" (its outputs, in order) and
        "image_channels" (channels of an image as stored). ``root`` is the dataset folder, None
        for the demo ``demo_options`` build; a dataset whose names and channels are fixed needs
        neither. The generic segmentation bundles read their class names and input channels here."""
        return {"class_names": self.output_names(task), "image_channels": self.image_channels}

    def label_values(self, task: str | Task, **settings) -> dict[str, int]:
        """{name: value} of the label maps its predictions become (MONAI Label's ``labels``):
        independent masks are 1..K by channel; softmax class k is value k, background 0."""
        names = self.output_names(task)
        if self.multilabel(task):
            return {name: i + 1 for i, name in enumerate(names)}
        return {name: i for i, name in enumerate(names) if i > 0}

    def multilabel(self, task: str | Task) -> bool:
        """Independent sigmoid outputs (binary masks, nested regions) rather than softmax classes."""
        return get_task(task).dense

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, tasks={self.tasks})"


# ---------------------------------------------------------------------------- the registry
_REGISTRY: dict[str, Dataset] = {}


def datasets() -> dict[str, Dataset]:
    """Every dataset medadapt ships, by name: the ``DATASETS`` of each ``medadapt.datasets``
    package (found, not listed, so that a new dataset folder needs no registry line)."""
    if not _REGISTRY:
        import medadapt.datasets as package

        for module in pkgutil.iter_modules(package.__path__):
            for dataset in getattr(importlib.import_module(f"{package.__name__}.{module.name}"), "DATASETS", ()):
                if dataset.name in _REGISTRY:
                    raise ValueError(f"two datasets are called {dataset.name!r}: {_REGISTRY[dataset.name]!r} and "
                                     f"{dataset!r}")
                _REGISTRY[dataset.name] = dataset
    return _REGISTRY


def get_dataset(name: str) -> Dataset:
    """The dataset called ``name``; raises naming the known ones."""
    known = datasets()
    if name not in known:
        raise ValueError(f"unknown dataset {name!r}; known: {sorted(known)}")
    return known[name]


def load_datalist(name: str, root: str | os.PathLike, task: str | None = None, **options) -> list[dict]:
    """Datalist of dataset ``name`` under ``root``.

    Arguments:
        name: dataset name (see `datasets`).
        root: dataset folder in the official layout.
        task: one of the dataset's tasks (default: its first).
        options: reader options, e.g. ``release`` for BraTS or ``mask_cache`` for BUSI.
    """
    dataset = get_dataset(name)
    return dataset.datalist(root, task=dataset.check_task(task).name, **options)


def dataset_or_demo(name: str, dataset_dir: str | os.PathLike | None, demo_dir: str | os.PathLike, **demo_options) -> str:
    """``dataset_dir`` if one is given, else the demo of ``name`` built (once) in ``demo_dir``."""
    if dataset_dir:
        return str(dataset_dir)
    return get_dataset(name).make_demo(demo_dir, **demo_options)
