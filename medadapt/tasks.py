"""The tasks, one object each: what a task's model is, what its labels are, how it is measured
and how it is served. Code that depends on the task asks the task object; nothing compares task
names.

A bundle names its task (``"task": "segmentation3d"``); `get_task` gives the object.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch.nn as nn


@dataclass(frozen=True)
class Task:
    """One task.

    Arguments:
      name: the name bundles and the Python API use.
      label_kind: "class" (one class index per image) or "mask" (a label per pixel or voxel).
      spatial_dims: 2, or 3 for volumes (2D encoders over slice stacks).
      prompted: the model takes box prompts beside the image.
      metrics: (name, title) of what a protocol table reports, headline first; the bundle's
        ``test_<name>`` values.
      served_as: how MONAI Label lists it (``type`` in ``/info/``): one of the types 3D Slicer's
        MONAI Label module and OHIF list (segmentation, deepgrow, deepedit); they show no other.
      description: what a server says the model does.
      untrained_note: what serving it without trained adapters means.
      builder: ``builder(encoder, num_classes, **arguments)``: the task model around an encoder
        (``arguments``: create_model's, each builder takes what it needs).
    """

    name: str
    label_kind: str
    builder: Callable[..., nn.Module] = field(repr=False)
    spatial_dims: int = 2
    prompted: bool = False
    metrics: tuple[tuple[str, str], ...] = ()
    served_as: str = "segmentation"
    description: str = ""
    untrained_note: str = ""

    @property
    def dense(self) -> bool:
        """A prediction per pixel or voxel (the papers size adapters wider for these)."""
        return self.label_kind == "mask"

    def build(self, encoder: nn.Module, num_classes: int, **arguments: Any) -> nn.Module:
        return self.builder(encoder, num_classes, **arguments)

    def adapter_options(self, options: dict, num_slices: int | None = None) -> dict:
        """``options`` with what the task adds: the 3D adapter variants over a stack of
        ``num_slices`` slices for volumes (what the caller gives wins)."""
        if self.spatial_dims == 3 and not self.prompted:
            if not num_slices:
                raise ValueError(f"task {self.name!r} needs num_slices (the ROI size on the slice axis)")
            return {"spatial_dims": 3, "num_slices": num_slices, **options}
        return dict(options)


# ---------------------------------------------------------------------------- model builders
# Imported when called: the model modules import this one through medadapt.models.factory.

def _classifier(encoder, num_classes, in_channels=None, input_mapping=None, pool=None, **_):
    from medadapt.models.classifier import Classifier

    return Classifier(encoder, num_classes, pool=pool, in_channels=in_channels, input_mapping=input_mapping)


def _segmenter(encoder, num_classes, in_channels=None, input_mapping=None, decoder_channels=32, multilabel=False, **_):
    from medadapt.models.segmenter import Segmenter

    return Segmenter(encoder, num_classes, decoder_channels=decoder_channels, multilabel=multilabel,
                     in_channels=in_channels, input_mapping=input_mapping)


def _volume_segmenter(encoder, num_classes, num_slices=None, in_channels=None, input_mapping=None,
                      decoder_channels=32, multilabel=False, slice_axis=2, **_):
    from medadapt.models.volume import VolumeSegmenter

    return VolumeSegmenter(encoder, num_classes, num_slices, decoder_channels=decoder_channels, multilabel=multilabel,
                           slice_axis=slice_axis, in_channels=in_channels, input_mapping=input_mapping)


def _box_segmenter(encoder, num_classes, backbone_checkpoint=None, **_):
    from medadapt.models.box_prompt import BoxPromptSegmenter

    return BoxPromptSegmenter(encoder, *encoder.build_prompt_parts(backbone_checkpoint))


_DICE = (("dice", "Dice (%)"),)

TASKS: dict[str, Task] = {task.name: task for task in (
    Task("classification", "class", _classifier,
         metrics=(("accuracy", "Accuracy (%)"), ("balanced_accuracy", "Balanced accuracy (%)")),
         # Listed as segmentation: the label image paints the whole image with the class's value.
         served_as="segmentation", description="Classification of PNG/JPG images",
         untrained_note="the classification head is untrained, so its classes mean nothing until training"),
    Task("segmentation", "mask", _segmenter, metrics=_DICE,
         description="2D segmentation of PNG/JPG images",
         untrained_note="the segmentation decoder is untrained, so its masks mean nothing until training"),
    Task("segmentation3d", "mask", _volume_segmenter, spatial_dims=3, metrics=_DICE,
         description="3D segmentation of NIfTI volumes",
         untrained_note="the segmentation decoder is untrained, so its masks mean nothing until training"),
    # DeepGrow: the clients send their clicks (and 3D Slicer its ROI) to these models.
    Task("box_segmentation", "mask", _box_segmenter, prompted=True, served_as="deepgrow",
         description="Box-prompted 2D segmentation of PNG/JPG images",
         untrained_note="the SAM prompt encoder and mask decoder are the pretrained ones, so it segments as is"),
    Task("box_segmentation3d", "mask", _box_segmenter, spatial_dims=3, prompted=True, served_as="deepgrow",
         description="Box-prompted 3D segmentation of NIfTI volumes, slice by slice",
         untrained_note="the SAM prompt encoder and mask decoder are the pretrained ones, so it segments as is"),
)}


def get_task(task: str | Task) -> Task:
    """The task called ``task`` (a Task passes through); raises naming the known ones."""
    if isinstance(task, Task):
        return task
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose one of {list(TASKS)}")
    return TASKS[task]
