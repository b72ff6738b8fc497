"""The Backbone interface shared by every pretrained encoder in medadapt.

A backbone wraps one real third-party encoder (segment_anything's ``ImageEncoderViT``,
LiteMedSAM's ``TinyViT``, torchvision's ``ResNet``, a timm model, ``EfficientNet``) in
``self.encoder`` without rebuilding it, so the adapter injector can find its blocks by
type, and adds what task heads and configs need: NCHW feature maps, their channels and
strides, and the intensity preprocessing the weights were trained with.
"""

from __future__ import annotations

import contextlib
import os
import sys
import warnings
from typing import Any, Iterator, Sequence

import torch
import torch.nn as nn

__all__ = ["Backbone", "CheckpointError", "NotPretrainedWarning", "POOLS", "apply_preprocessing",
           "normalised_input_gradients"]

# How a classification head pools a backbone's output: its class token, or the mean of its
# last map (the patch tokens of a ViT).
POOLS = ("cls", "mean")


class CheckpointError(ValueError):
    """A checkpoint file could not be read, or does not match the model it is loaded into."""


class NotPretrainedWarning(UserWarning):
    """A backbone was built with random weights because no checkpoint was given."""


def _outside_stacklevel() -> int:
    # Point the warning at the user's create_backbone(...) line, however deep the builder.
    here = os.path.dirname(os.path.abspath(__file__))
    frame, level = sys._getframe(1), 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(here):
        frame, level = frame.f_back, level + 1
    return level


def warn_not_pretrained(name: str, what: str) -> None:
    # A randomly initialised "foundation model" trains to plausible-looking but poor
    # results, so say so loudly rather than let it pass unnoticed.
    warnings.warn(
        f"{name}: no checkpoint given, the weights are random and NOT pretrained. "
        f"Pass checkpoint=<path to {what}> to use the pretrained model.",
        NotPretrainedWarning,
        stacklevel=_outside_stacklevel(),
    )


def apply_preprocessing(x: torch.Tensor, preprocessing: dict[str, Any], pass_gradients: bool = False) -> torch.Tensor:
    """Apply a normalisation preset to an image batch whose intensities lie in [0, 1].

    Presets (the dicts stored in ``Backbone.preprocessing``):

    - ``{"scaling": "minmax", "range": [a, b]}``: each image is rescaled so that its own
      minimum maps to ``a`` and maximum to ``b`` (MedSAM / LiteMedSAM).
    - ``{"mean": [...], "std": [...]}``: per-channel ``(x - mean) / std`` with mean and std
      given for [0, 1] input (ImageNet, RadImageNet, timm models).
    - ``{"scaling": "affine", "offset": o, "scale": s}``: ``(255 * x - o) / s``; the preset
      is defined on 0-255 input as the original model was (EfficientNet-Lite).

    Arguments:
        x: float tensor (B, C, H, W) with values in [0, 1].
        preprocessing: one of the presets above.
        pass_gradients: the output's gradient passes to ``x`` unchanged (the values are the
            same), so the gradient at ``x`` is the gradient with respect to the normalised
            image, and no gradient reaches an image's own statistics (its minimum and maximum
            pixels under min-max). For gradient analyses (ERF); see normalised_input_gradients.
    """
    out = _normalise(x, preprocessing)
    return x + (out - x).detach() if pass_gradients else out


def _normalise(x: torch.Tensor, preprocessing: dict[str, Any]) -> torch.Tensor:
    if "mean" in preprocessing:
        shape = (1, -1) + (1,) * (x.ndim - 2)
        mean = torch.as_tensor(preprocessing["mean"], dtype=x.dtype, device=x.device).view(shape)
        std = torch.as_tensor(preprocessing["std"], dtype=x.dtype, device=x.device).view(shape)
        return (x - mean) / std
    scaling = preprocessing.get("scaling")
    if scaling == "minmax":
        low, high = preprocessing.get("range", (0.0, 1.0))
        dims = tuple(range(1, x.ndim))
        x_min = x.amin(dim=dims, keepdim=True)
        x_max = x.amax(dim=dims, keepdim=True)
        # MedSAM clips the denominator the same way, so a constant image maps to `low`.
        x = (x - x_min) / (x_max - x_min).clamp_min(1e-8)
        return x * (high - low) + low
    if scaling == "affine":
        return (x * 255.0 - preprocessing["offset"]) / preprocessing["scale"]
    raise ValueError(f"unknown preprocessing preset {preprocessing!r}")


@contextlib.contextmanager
def normalised_input_gradients(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block, gradients reaching ``model``'s input are taken with respect to the
    normalised image each Backbone in it sees: the normalisation passes gradients straight
    through (forward values unchanged), its per-image statistics held constant."""
    backbones = [m for m in model.modules() if isinstance(m, Backbone)]
    previous = [getattr(b, "pass_normalisation_gradients", False) for b in backbones]
    for b in backbones:
        b.pass_normalisation_gradients = True
    try:
        yield model
    finally:
        for b, state in zip(backbones, previous):
            b.pass_normalisation_gradients = state


class Backbone(nn.Module):
    """A pretrained image encoder that returns NCHW feature maps."""

    # True when the pretrained weights ship inside an installed package, so the backbone is
    # pretrained without a checkpoint file (LiteMedSAM, EfficientNet-Lite0).
    ships_weights: bool = False

    def __init__(
        self,
        encoder: nn.Module,
        name: str,
        feature_channels: Sequence[int],
        feature_strides: Sequence[int],
        img_size: int | None,
        preprocessing: dict[str, Any],
        in_channels: int = 3,
    ) -> None:
        """
        Arguments:
            encoder: the third-party encoder module, kept with its original class and
                attribute names so that adapters can be injected into it.
            name: the registry name the backbone was created with.
            feature_channels: channels of each map of ``forward_features``, ascending stride.
            feature_strides: stride (input pixels per feature pixel) of each of those maps.
            img_size: the square input size the encoder requires, or None if any size works.
            preprocessing: the normalisation preset the weights expect, see
                ``apply_preprocessing``; recorded in configs with the backbone.
            in_channels: channels of the input image.
        """
        super().__init__()
        if len(feature_channels) != len(feature_strides):
            raise ValueError("feature_channels and feature_strides must have the same length")
        self.encoder = encoder
        self.name = name
        self.in_channels = in_channels
        self.feature_channels = [int(c) for c in feature_channels]
        self.feature_strides = [int(s) for s in feature_strides]
        self.out_channels = self.feature_channels[-1]
        self.img_size = img_size
        self.preprocessing = dict(preprocessing)
        # Set by normalised_input_gradients() for gradient analyses.
        self.pass_normalisation_gradients = False

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise a float image batch with values in [0, 1] the way the weights expect."""
        return apply_preprocessing(x, self.preprocessing, getattr(self, "pass_normalisation_gradients", False))

    @property
    def has_class_token(self) -> bool:
        """Whether the encoder has a class token that :meth:`class_token` returns."""
        return False

    @property
    def default_pool(self) -> str:
        """How a classifier pools this backbone by default (one of POOLS)."""
        return "mean"

    def class_token(self, x: torch.Tensor) -> torch.Tensor:
        """The encoder's final class token (B, C) for a preprocessed batch ``x``."""
        raise ValueError(f"{self.name} has no class token; pool='mean' averages its last feature map")

    def check_input(self, x: torch.Tensor) -> None:
        # Fixed-size encoders fail deep inside (a pos_embed broadcast) with an unhelpful
        # message; name the expected size up front instead.
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"{self.name} expects input (B, {self.in_channels}, H, W), got {tuple(x.shape)}"
            )
        if self.img_size is not None and tuple(x.shape[-2:]) != (self.img_size, self.img_size):
            raise ValueError(
                f"{self.name} was built for {self.img_size}x{self.img_size} input, got "
                f"{x.shape[-2]}x{x.shape[-1]}; resize the image or build the backbone with "
                f"img_size={x.shape[-1]} where the family allows it"
            )

    def forward_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Multi-scale NCHW feature maps in ascending stride (one map for plain ViTs)."""
        raise NotImplementedError

    def build_prompt_parts(self, checkpoint=None) -> tuple[nn.Module, nn.Module]:
        """The prompt encoder and mask decoder that go with this encoder (SAM family), loaded
        strictly from ``checkpoint``, for box-prompted segmentation."""
        raise ValueError(f"backbone {self.name!r} has no prompt encoder or mask decoder; box prompts need a "
                         "SAM-family backbone (litemedsam, medsam_vit_b, sam_vit_*)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The final feature map (B, out_channels, h, w)."""
        return self.forward_features(x)[-1]

    def extra_repr(self) -> str:
        return (
            f"name={self.name!r}, img_size={self.img_size}, out_channels={self.out_channels}, "
            f"feature_strides={self.feature_strides}"
        )
