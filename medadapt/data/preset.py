"""`DatasetPreset`: everything one dataset needs, in one object.

A preset knows how to read the official layout into a datalist, how to check it before any
training starts, which MONAI transforms prepare it (as a config the bundles embed), how to
build its embedded demo (and what is synthetic about it), its class or region names, and how
predictions become files. Bundles, the protocol runner, MONAI Label and the notebooks ask the
preset; none of them branches on a dataset's name.

Adding a dataset = a subclass in its own module plus one line in `medadapt.data.presets`, and
one bundle folder that names it (``"dataset_name"``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

IMAGE_SUFFIXES = (".nii.gz", ".nii", ".png", ".jpg", ".jpeg")


def case_name(path: str | os.PathLike) -> str:
    """A file's name without its image suffix (``.nii.gz`` counts as one)."""
    name = Path(path).name
    for suffix in IMAGE_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem


class DatasetPreset:
    """Base class; subclasses set the attributes and implement `datalist` and
    `transform_config`.

    Attributes:
        name: registry name (``dataset_name`` in a bundle, ``--dataset`` on the command line).
        tasks: tasks the dataset supports ("classification", "segmentation",
            "segmentation3d"); the first is the default.
        spatial_dims: 2 or 3.
        classes: class names in label order for classification, or None.
        stratify_key: entry key holding the class to stratify splits by, or None.
        unit: what one sample is called in reports ("images", "cases", "slices", "stacks").
        demo_note: what the embedded demo is, said wherever it is used; name anything
            SYNTHETIC as such.
        settings: bundle settings its transform configs refer to (``@name``), with defaults
            for the Python API.
    """

    name: str = ""
    tasks: tuple[str, ...] = ()
    spatial_dims: int = 2
    classes: tuple[str, ...] | None = None
    stratify_key: str | None = None
    unit: str = "images"
    demo_note: str = "demo data"
    settings: dict = {}

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

    def check_task(self, task: str | None) -> str:
        """``task`` (default: the first), or an error naming the supported ones."""
        task = task or self.tasks[0]
        if task not in self.tasks:
            raise ValueError(f"dataset {self.name!r} supports task(s) {list(self.tasks)}, not {task!r}")
        return task

    def validate(self, datalist: Sequence[dict], task: str, root: str | os.PathLike | None = None,
                 require_labels: bool = True, read_data: bool = True, **options) -> None:
        """Raise a `DatasetError` naming every unusable entry (see `validate_datalist`);
        ``options`` are the reader options `datalist` was given."""
        from medadapt.data.validate import validate_datalist

        kind = "classification" if task == "classification" else "segmentation"
        num_classes = len(self.classes) if task == "classification" and self.classes else None
        binary = kind == "segmentation" and self.multilabel(task) and len(self.output_names(task)) == 1
        validate_datalist(datalist, kind, num_classes=num_classes, read_data=read_data, require_labels=require_labels,
                          binary_masks=binary)

    def make_demo(self, folder: str | os.PathLike, **options) -> str:
        """Build the embedded demo in ``folder`` (idempotent) and return the dataset root."""
        from medadapt.data.demo import make_demo

        return make_demo(self.name, folder, **options)

    def fixed_test(self, datalist: list[dict]) -> tuple[list[dict], list[dict]] | None:
        """(pool, test) for a dataset whose test set is fixed by its design, else None."""
        return None

    # ------------------------------------------------------------------ model
    def output_names(self, task: str) -> list[str]:
        """Names of the model's output channels: classes, or segmented regions."""
        if task == "classification":
            return list(self.classes or [])
        return ["lesion"]

    def label_values(self, task: str, **settings) -> dict[str, int]:
        """{name: value} of the label maps its predictions become (MONAI Label's ``labels``):
        independent masks are 1..K by channel; softmax class k is value k, background 0."""
        names = self.output_names(task)
        if self.multilabel(task):
            return {name: i + 1 for i, name in enumerate(names)}
        return {name: i for i, name in enumerate(names) if i > 0}

    def multilabel(self, task: str) -> bool:
        """Independent sigmoid outputs (binary masks, nested regions) rather than softmax classes."""
        return task != "classification"

    # ------------------------------------------------------------------ transforms
    def transform_config(self, stage: str, task: str) -> dict:
        """The MONAI config of the transforms for ``stage`` ("train", "validate", "infer"),
        referring to `settings` by ``@name``."""
        raise NotImplementedError

    def transforms(self, stage: str, task: str | None = None, **settings):
        """The transforms of `transform_config` built, with ``settings`` over the defaults."""
        from medadapt.data.transforms import instantiate

        task = self.check_task(task)
        unknown = sorted(set(settings) - set(self.settings))
        if unknown:
            raise ValueError(f"dataset {self.name!r} transforms take settings {sorted(self.settings)}, not {unknown}")
        return instantiate(self.transform_config(stage, task), **{**self.settings, **settings})

    def prediction_steps(self, task: str) -> list[dict]:
        """Config steps between the thresholded, inverted prediction and the file writer
        (e.g. BraTS regions to its label values); none by default."""
        return []

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, tasks={self.tasks})"
