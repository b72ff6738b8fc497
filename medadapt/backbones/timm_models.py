"""timm ViT / Swin / ConvNeXt (and other models with ``forward_intermediates``).

``create_backbone("timm:<model_name>", checkpoint=path, **options)`` builds the model with
``pretrained=False`` (timm's own pretrained weights are downloads, unavailable offline)
and loads weights only from the given file, through timm's checkpoint_filter_fn for the
model's family where it has one.
"""

from __future__ import annotations

import sys
from typing import Any, Mapping

import torch
import torch.nn as nn

from .base import Backbone, CheckpointError, warn_not_pretrained
from .loading import (
    Checkpoint,
    describe,
    load_strict,
    read_checkpoint,
    unwrap_state_dict,
)

__all__ = ["TimmBackbone", "build_timm", "checkpoint_filter_fn"]

PREFIX = "timm:"


def _classifier_names(model: nn.Module) -> tuple[str, ...]:
    names = model.pretrained_cfg.get("classifier") or ()
    return (names,) if isinstance(names, str) else tuple(names)


def _drop_classifier(state: Mapping[str, Any], model: nn.Module) -> dict[str, Any]:
    # The model is built with num_classes=0, so the classifier of a classification
    # checkpoint (pretrained_cfg["classifier"], e.g. "head" or "head.fc") has no place to
    # go; timm's own pretrained loading drops it the same way.
    expected = model.state_dict()
    heads = tuple(name + "." for name in _classifier_names(model))
    return {k: v for k, v in state.items() if k in expected or not k.startswith(heads)}


def checkpoint_filter_fn(state_dict: Mapping[str, Any], model: nn.Module) -> dict[str, Any]:
    """Unwrap, apply the family's own timm ``checkpoint_filter_fn`` and drop the classifier."""
    state = unwrap_state_dict(state_dict)
    family_filter = getattr(sys.modules.get(type(model).__module__), "checkpoint_filter_fn", None)
    if family_filter is not None:
        state = dict(family_filter(state, model))
    return _drop_classifier(state, model)


class TimmBackbone(Backbone):
    """A timm model: one map for plain ViTs, one map per stage for hierarchical models.

    A ViT with a class token pools it by default, as timm's own head does for the model's
    ``global_pool="token"`` (the default of every ViT with one); a model built with
    ``global_pool="avg"``, or one without a class token, pools the mean of its patch tokens.
    """

    def __init__(self, encoder: nn.Module, name: str) -> None:
        """
        Arguments:
            encoder: a timm model created with ``num_classes=0``.
            name: ``"timm:<model_name>"``.
        """
        info = list(encoder.feature_info)
        # A plain ViT reports every block at the patch stride; only its last map is wanted.
        self.plain = len({f["reduction"] for f in info}) == 1
        if self.plain:
            info = info[-1:]
        patch_embed = getattr(encoder, "patch_embed", None)
        fixed = patch_embed is not None and getattr(patch_embed, "strict_img_size", False)
        img_size = getattr(patch_embed, "img_size", None) if fixed else None
        cfg = encoder.pretrained_cfg
        super().__init__(
            encoder,
            name=name,
            feature_channels=[f["num_chs"] for f in info],
            feature_strides=[f["reduction"] for f in info],
            img_size=int(img_size[0]) if isinstance(img_size, (tuple, list)) else img_size,
            preprocessing={"mean": list(cfg.get("mean", (0.485, 0.456, 0.406))),
                           "std": list(cfg.get("std", (0.229, 0.224, 0.225)))},
        )

    @property
    def has_class_token(self) -> bool:
        return getattr(self.encoder, "cls_token", None) is not None

    @property
    def default_pool(self) -> str:
        return "cls" if self.has_class_token and getattr(self.encoder, "global_pool", "token") == "token" else "mean"

    def class_token(self, x: torch.Tensor) -> torch.Tensor:
        """The final class token, normalised as timm's head reads it (final norm, fc_norm)."""
        if not self.has_class_token:
            return super().class_token(x)
        self.check_input(x)
        tokens = self.encoder.forward_features(x)
        return self.encoder.fc_norm(tokens[:, 0])

    def forward_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        self.check_input(x)
        # norm=True applies the model's final norm to the last map only (ViT: to the one
        # map), so forward() equals the model's own forward_features in NCHW form.
        return self.encoder.forward_intermediates(
            x,
            indices=1 if self.plain else len(self.feature_channels),
            norm=True,
            output_fmt="NCHW",
            intermediates_only=True,
        )


def build_timm(model_name: str, checkpoint: Checkpoint | None = None, **options: Any) -> TimmBackbone:
    """A timm model as a backbone.

    Arguments:
        model_name: a timm model name without the ``timm:`` prefix, e.g. ``convnext_tiny``.
        checkpoint: a state dict file (.pth/.bin/.safetensors) or mapping for that model;
            None gives random weights with a NotPretrainedWarning.
        options: passed to ``timm.create_model`` (e.g. ``img_size``, ``embed_dim``,
            ``depth``, ``depths``, ``dims``, ``dynamic_img_size=True`` for any ViT grid).
    """
    import timm

    if options.pop("pretrained", False):
        raise ValueError(
            "timm pretrained=True downloads weights, which is not allowed here; "
            "pass checkpoint=<path to the weights file> instead"
        )
    if not timm.is_model(model_name):
        close = timm.list_models(f"*{model_name.split('_')[0]}*")[:10]
        raise ValueError(f"unknown timm model {model_name!r}; similar names: {close}")
    model = timm.create_model(model_name, pretrained=False, num_classes=0, **options)
    if not hasattr(model, "forward_intermediates"):
        raise ValueError(f"timm model {model_name!r} has no forward_intermediates, so no feature maps")
    if checkpoint is None:
        warn_not_pretrained(PREFIX + model_name, f"a {model_name} weights file")
    else:
        raw, note = read_checkpoint(checkpoint), ""
        try:
            state = checkpoint_filter_fn(raw, model)
        except Exception as error:
            # Family remapping code assumes a file of its own family; for a foreign file
            # keep the keys as they are so that the strict load lists what does not match.
            state = _drop_classifier(unwrap_state_dict(raw), model)
            note = f"{type(error).__name__}: {error}"
        try:
            load_strict(model, state, describe(checkpoint))
        except CheckpointError as error:
            if note:
                raise CheckpointError(f"{error}\n  (timm's checkpoint_filter_fn failed: {note})") from None
            raise
    return TimmBackbone(model, name=PREFIX + model_name)
