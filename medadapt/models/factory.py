"""``create_model``: backbone + task model + adapters in one call, for bundles and servers.

A bundle's ``network_def`` is ``{"_target_": "medadapt.models.create_model", ...}``: the
pretrained backbone is always built from its own weights first, the method is injected, and
an adapter checkpoint (if given) is loaded strictly on top, so adapter weights can never end
up on an untrained backbone.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch.nn as nn

from medadapt.adapters import METHODS
from medadapt.backbones import create_backbone, takes_input_size
from medadapt.checkpoint import load_adapters
from medadapt.injection import inject
from medadapt.memory import enable_gradient_checkpointing
from medadapt.models.loading import record_build
from medadapt.models.stem import InputMapping
from medadapt.tasks import Task, get_task

# More classes than any dataset has (ImageNet-21k: 21,843): a head for 10**9 would allocate
# gigabytes before anything else could object.
MAX_NUM_CLASSES = 100_000


def method_defaults(method: str, task: Task) -> dict[str, Any]:
    """The options ``method`` takes by default for ``task`` (its config's ``dense_options`` for
    dense prediction, where the papers size adapters wider)."""
    if method not in METHODS:
        from medadapt.adapters import list_methods

        raise ValueError(f"unknown adapter method {method!r}; choose one of {list_methods()}")
    return dict(METHODS[method].dense_options) if task.dense else {}


def _check_num_classes(num_classes: Any) -> None:
    """ValueError unless ``num_classes`` is a whole number in 1..MAX_NUM_CLASSES (checked before
    the backbone is built, so a bad value costs nothing)."""
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)):
        raise ValueError(f"num_classes must be a whole number, got {num_classes!r}")
    if not 1 <= num_classes <= MAX_NUM_CLASSES:
        raise ValueError(f"num_classes must be from 1 to {MAX_NUM_CLASSES:,}, got {num_classes}")


def create_model(
    task: str | Task,
    backbone: str = "litemedsam",
    num_classes: int = 2,
    method: str = "dka",
    method_options: dict[str, Any] | None = None,
    backbone_checkpoint: str | None = None,
    backbone_options: dict[str, Any] | None = None,
    adapter_checkpoint: str | None = None,
    in_channels: int | None = None,
    input_mapping: InputMapping = None,
    num_slices: int | None = None,
    decoder_channels: int = 32,
    multilabel: bool = False,
    slice_axis: int = 2,
    gradient_checkpointing: bool = False,
    pool: str | None = None,
    export_input_size: list[int] | None = None,
    input_size: int | None = None,
) -> nn.Module:
    """Build a task model around a pretrained backbone and inject ``method``.

    Arguments:
      task: a task (`medadapt.tasks`) or its name: "classification", "segmentation" (2D,
        prompt-free), "segmentation3d" (slice-stack volumes) or "box_segmentation" (MedSAM-style
        box prompts).
      backbone: a name for :func:`medadapt.create_backbone`.
      num_classes: classes or label channels.
      method, method_options: the adapter method and its options; options not given take the
        method's defaults for the task (DKA: bottleneck 192 for segmentation, 16 for
        classification, as in the DKA paper).
      backbone_checkpoint, backbone_options: passed to ``create_backbone``.
      adapter_checkpoint: a folder written by ``save_adapters`` to load strictly.
      in_channels, input_mapping: input channels and how they reach the backbone: "learned"
        (a trainable 1x1 convolution), "repeat" (one channel copied), or a list of the input
        channels to pass on, e.g. [1, 2, 3]; None picks learned / repeat / identity.
      num_slices, slice_axis: the patch depth and the slicing axis for "segmentation3d".
      decoder_channels, multilabel: decoder width, and sigmoid (True) or softmax outputs.
      gradient_checkpointing: recompute the encoder's blocks in the backward pass instead of
        storing their activations (less memory, more time; see benchmarks).
      pool: classification: "cls" (the class token) or "mean" (of the patch tokens); None: the
        class token where the backbone has one.
      export_input_size: the spatial size of the inputs the model is deployed at ([H, W], or the
        patch [X, Y, Z] for "segmentation3d"), at which ``torch.jit.script(model)`` and MONAI's
        ``ckpt_export`` trace it (see ``medadapt.models.export``); None: the fixed input size
        of the encoder (LiteMedSAM, SAM), if it has one. Nothing else depends on it.
      input_size: the side of the square images (or slices) the data arrive at. A backbone
        built for a fixed input size (SAM's ViTs, LiteMedSAM) is built for this one unless
        ``backbone_options`` set ``img_size``: MedSAM's 1024 would upsample 256-pixel images
        sixteen-fold in work and memory.
    """
    # Every argument, taken before anything else is defined: save_adapters writes them so that
    # medadapt.load_model can rebuild this model from its adapter folder alone.
    build_arguments = dict(locals())
    kind = get_task(task)
    build_arguments["task"] = kind.name
    _check_num_classes(num_classes)
    options = {**method_defaults(method, kind), **dict(method_options or {})}
    backbone_options = dict(backbone_options or {})
    if input_size and "img_size" not in backbone_options and takes_input_size(backbone):
        backbone_options["img_size"] = int(input_size)
    encoder = create_backbone(backbone, checkpoint=backbone_checkpoint, **backbone_options)
    model = kind.build(encoder, num_classes, in_channels=in_channels, input_mapping=input_mapping, pool=pool,
                       decoder_channels=decoder_channels, multilabel=multilabel, num_slices=num_slices,
                       slice_axis=slice_axis, backbone_checkpoint=backbone_checkpoint)
    options = kind.adapter_options(options, num_slices)
    inject(model, method, **options)
    if adapter_checkpoint:
        load_adapters(model, adapter_checkpoint)
    if gradient_checkpointing:
        enable_gradient_checkpointing(model)
    if export_input_size is not None:
        model.export_input_size = tuple(int(s) for s in export_input_size)
    record_build(model, build_arguments)
    return model
