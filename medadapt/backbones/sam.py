"""SAM and MedSAM ViT image encoders (segment_anything's ``ImageEncoderViT``).

MedSAM is SAM ViT-B fine-tuned on medical images: same architecture and checkpoint layout,
different intensity preprocessing (min-max to [0, 1] instead of SAM's mean/std). The
builders below differ only in numbers and preset, as in segment_anything's build_sam.py.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Mapping, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from segment_anything.modeling import (
    ImageEncoderViT,
    MaskDecoder,
    PromptEncoder,
    TwoWayTransformer,
)

from .base import Backbone, CheckpointError, warn_not_pretrained
from .loading import (
    Checkpoint,
    describe,
    load_strict,
    read_checkpoint,
    strip_prefix,
    unwrap_state_dict,
)

__all__ = [
    "SamBackbone",
    "build_medsam_vit_b",
    "build_sam_vit_b",
    "build_sam_vit_l",
    "build_sam_vit_h",
    "build_sam_parts",
    "checkpoint_filter_fn",
    "load_sam_parts",
]

PATCH_SIZE = 16
PROMPT_EMBED_DIM = 256
# MedSAM rescales each image to [0, 1]; SAM normalises 0-255 pixels with its pixel_mean /
# pixel_std (123.675, 116.28, 103.53) / (58.395, 57.12, 57.375), i.e. ImageNet statistics.
MEDSAM_PREPROCESSING = {"scaling": "minmax", "range": [0.0, 1.0]}
SAM_PREPROCESSING = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}

_SAM_PARTS = ("image_encoder.", "prompt_encoder.", "mask_decoder.")


class SamBackbone(Backbone):
    """A SAM-family ViT encoder; one map of stride 16 (64x64 at 1024 input)."""

    def forward_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        self.check_input(x)
        return [self.encoder(x)]

    def build_prompt_parts(self, checkpoint=None):
        return build_sam_parts(checkpoint, img_size=self.img_size)


def select_image_encoder(state: Mapping[str, Any]) -> dict[str, Any]:
    """The image encoder's weights from a full SAM-style file, or the file as is if encoder-only."""
    state = unwrap_state_dict(state)
    if not any(k.startswith("image_encoder.") for k in state):
        return state
    # prompt_encoder / mask_decoder belong to other modules (see load_sam_parts); any other
    # key is kept so that the strict load reports it instead of dropping it unseen.
    return {
        (k[len("image_encoder.") :] if k.startswith("image_encoder.") else k): v
        for k, v in state.items()
        if not k.startswith(_SAM_PARTS[1:])
    }


def resize_pos_embed(pos_embed: torch.Tensor, grid: Sequence[int]) -> torch.Tensor:
    """Resize SAM's absolute position embedding (1, h, w, C) to (1, *grid, C), bicubic."""
    shrinking = grid[0] < pos_embed.shape[1] or grid[1] < pos_embed.shape[2]
    resized = F.interpolate(
        pos_embed.permute(0, 3, 1, 2).float(),
        size=tuple(grid),
        mode="bicubic",
        align_corners=False,
        # e.g. 64x64 -> 16x16 for 256 input: without antialiasing every 4th embedding
        # dominates instead of a smooth average of its neighbourhood.
        antialias=shrinking,
    )
    return resized.permute(0, 2, 3, 1).to(pos_embed.dtype)


def resize_rel_pos(rel_pos: torch.Tensor, length: int) -> torch.Tensor:
    """Resize a relative position table (2*size-1, head_dim) to ``length`` rows, linearly.

    This is exactly what segment_anything's ``get_rel_pos`` does at run time when the table
    does not match the attention size, so doing it once at load time changes no output.
    """
    resized = F.interpolate(
        rel_pos.float().reshape(1, rel_pos.shape[0], -1).permute(0, 2, 1), size=length, mode="linear"
    )
    return resized.reshape(-1, length).permute(1, 0).to(rel_pos.dtype)


def checkpoint_filter_fn(state_dict: Mapping[str, Any], model: ImageEncoderViT) -> dict[str, Any]:
    """Map a SAM/MedSAM checkpoint onto ``model`` (an ImageEncoderViT) of any input size.

    Accepts a flat full-SAM state dict (``image_encoder.*``, ``prompt_encoder.*``,
    ``mask_decoder.*``), an encoder-only one, either wrapped as {"model": ...} or
    {"state_dict": ...} and/or with a DDP ``module.`` prefix. ``pos_embed`` and the
    ``rel_pos_h``/``rel_pos_w`` tables are resized when the model's input or window size
    differs from the checkpoint's. Anything else is left for the strict load to report.
    """
    state = select_image_encoder(state_dict)
    expected = model.state_dict()
    for key, value in list(state.items()):
        target = expected.get(key)
        if target is None or not torch.is_tensor(value) or value.shape == target.shape:
            continue
        if key == "pos_embed" and value.ndim == 4 and value.shape[-1] == target.shape[-1]:
            state[key] = resize_pos_embed(value, target.shape[1:3])
        elif key.endswith((".attn.rel_pos_h", ".attn.rel_pos_w")) and value.ndim == 2:
            # Only the length depends on the input/window size; head_dim must match.
            if value.shape[1] == target.shape[1]:
                state[key] = resize_rel_pos(value, target.shape[0])
    return state


def build_image_encoder(
    img_size: int,
    embed_dim: int,
    depth: int,
    num_heads: int,
    global_attn_indexes: Sequence[int],
    window_size: int,
) -> ImageEncoderViT:
    """segment_anything's ImageEncoderViT with the settings of its own ``_build_sam``."""
    if img_size % PATCH_SIZE:
        raise ValueError(f"img_size must be a multiple of {PATCH_SIZE}, got {img_size}")
    return ImageEncoderViT(
        img_size=img_size,
        patch_size=PATCH_SIZE,
        embed_dim=embed_dim,
        depth=depth,
        num_heads=num_heads,
        mlp_ratio=4,
        norm_layer=partial(nn.LayerNorm, eps=1e-6),
        qkv_bias=True,
        use_rel_pos=True,
        global_attn_indexes=tuple(global_attn_indexes),
        window_size=window_size,
        out_chans=PROMPT_EMBED_DIM,
    )


def _build_sam_backbone(
    name: str,
    preprocessing: dict[str, Any],
    checkpoint: Checkpoint | None,
    img_size: int,
    embed_dim: int,
    depth: int,
    num_heads: int,
    global_attn_indexes: Sequence[int],
    window_size: int,
) -> SamBackbone:
    encoder = build_image_encoder(img_size, embed_dim, depth, num_heads, global_attn_indexes, window_size)
    if checkpoint is None:
        warn_not_pretrained(name, f"a {name} checkpoint (.pth)")
    else:
        state = checkpoint_filter_fn(read_checkpoint(checkpoint), encoder)
        load_strict(encoder, state, describe(checkpoint))
    return SamBackbone(
        encoder,
        name=name,
        feature_channels=[PROMPT_EMBED_DIM],
        feature_strides=[PATCH_SIZE],
        img_size=img_size,
        preprocessing=preprocessing,
    )


def build_medsam_vit_b(
    checkpoint: Checkpoint | None = None,
    img_size: int = 1024,
    embed_dim: int = 768,
    depth: int = 12,
    num_heads: int = 12,
    global_attn_indexes: Sequence[int] = (2, 5, 8, 11),
    window_size: int = 14,
) -> SamBackbone:
    """MedSAM's ViT-B image encoder (min-max [0, 1] preprocessing).

    Arguments:
        checkpoint: a MedSAM/SAM ViT-B file (``medsam_vit_b.pth``) or state dict; full-SAM
            or encoder-only, optionally wrapped; None gives random weights with a warning.
        img_size: square input size, any multiple of 16 (256 is practical on a CPU);
            position tables are resized from the checkpoint's 1024.
        embed_dim, depth, num_heads, global_attn_indexes, window_size: the architecture;
            change them only for tiny test configurations.
    """
    return _build_sam_backbone(
        "medsam_vit_b", MEDSAM_PREPROCESSING, checkpoint, img_size, embed_dim, depth, num_heads,
        global_attn_indexes, window_size,
    )


def build_sam_vit_b(checkpoint: Checkpoint | None = None, img_size: int = 1024, **options: Any) -> SamBackbone:
    """SAM ViT-B image encoder (SAM's mean/std preprocessing); options as build_medsam_vit_b."""
    arch = dict(embed_dim=768, depth=12, num_heads=12, global_attn_indexes=(2, 5, 8, 11), window_size=14)
    return _build_sam_backbone("sam_vit_b", SAM_PREPROCESSING, checkpoint, img_size, **{**arch, **options})


def build_sam_vit_l(checkpoint: Checkpoint | None = None, img_size: int = 1024, **options: Any) -> SamBackbone:
    """SAM ViT-L image encoder; options as build_medsam_vit_b."""
    arch = dict(embed_dim=1024, depth=24, num_heads=16, global_attn_indexes=(5, 11, 17, 23), window_size=14)
    return _build_sam_backbone("sam_vit_l", SAM_PREPROCESSING, checkpoint, img_size, **{**arch, **options})


def build_sam_vit_h(checkpoint: Checkpoint | None = None, img_size: int = 1024, **options: Any) -> SamBackbone:
    """SAM ViT-H image encoder; options as build_medsam_vit_b."""
    arch = dict(embed_dim=1280, depth=32, num_heads=16, global_attn_indexes=(7, 15, 23, 31), window_size=14)
    return _build_sam_backbone("sam_vit_h", SAM_PREPROCESSING, checkpoint, img_size, **{**arch, **options})


def load_sam_parts(checkpoint: Checkpoint) -> dict[str, dict[str, Any]]:
    """The prompt encoder's and mask decoder's state dicts from a full SAM/MedSAM file.

    Returns {"prompt_encoder": ..., "mask_decoder": ...} with the part prefixes removed, for
    a box-prompted model to load into segment_anything's PromptEncoder and MaskDecoder.
    Raises CheckpointError for an encoder-only file.
    """
    state = unwrap_state_dict(read_checkpoint(checkpoint))
    parts = {part: strip_prefix(state, part + ".") for part in ("prompt_encoder", "mask_decoder")}
    empty = [part for part, weights in parts.items() if not weights]
    if empty:
        raise CheckpointError(
            f"{describe(checkpoint)} has no {' or '.join(empty)} weights (keys "
            f"'{empty[0]}.*'); it looks like an encoder-only file, not a full SAM/MedSAM checkpoint"
        )
    return parts


def build_sam_parts(
    checkpoint: Checkpoint | None = None, img_size: int = 1024
) -> tuple[PromptEncoder, MaskDecoder]:
    """segment_anything's PromptEncoder and MaskDecoder with SAM's settings.

    Arguments:
        checkpoint: a full SAM/MedSAM file; its prompt encoder and mask decoder are loaded
            strictly. None leaves them randomly initialised.
        img_size: the encoder's input size; boxes are given in pixels of this size and the
            image embedding is img_size/16 on a side. The weights do not depend on it.
    """
    grid = img_size // PATCH_SIZE
    prompt_encoder = PromptEncoder(
        embed_dim=PROMPT_EMBED_DIM,
        image_embedding_size=(grid, grid),
        input_image_size=(img_size, img_size),
        mask_in_chans=16,
    )
    mask_decoder = MaskDecoder(
        num_multimask_outputs=3,
        transformer=TwoWayTransformer(depth=2, embedding_dim=PROMPT_EMBED_DIM, mlp_dim=2048, num_heads=8),
        transformer_dim=PROMPT_EMBED_DIM,
        iou_head_depth=3,
        iou_head_hidden_dim=256,
    )
    if checkpoint is None:
        warn_not_pretrained("sam prompt encoder and mask decoder", "a full SAM/MedSAM checkpoint")
    else:
        parts = load_sam_parts(checkpoint)
        load_strict(prompt_encoder, parts["prompt_encoder"], f"{describe(checkpoint)} [prompt_encoder]")
        load_strict(mask_decoder, parts["mask_decoder"], f"{describe(checkpoint)} [mask_decoder]")
    return prompt_encoder, mask_decoder
