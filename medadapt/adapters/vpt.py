"""Visual Prompt Tuning (Jia et al., 2022): learnable prompts that the frozen encoder attends to.

What a prompt is depends on the backbone family (the DKA paper's "Prompt" rows cover ViTs,
MedSAM's ViT and ResNet-50):

- Token-sequence ViTs (timm): ``num_tokens`` prompt tokens inserted after the prefix (class,
  register) tokens. Deep VPT (``deep=True``) gives every target block its own prompts and drops
  their outputs after the block, which is the same as replacing them at the next block.
  Shallow VPT inserts prompts before the first target block and drops them after the last
  block, so they travel through the blocks as tokens.
- SAM / MedSAM's ViT: tokens are a channels-last (B, H, W, C) grid and most blocks attend
  within 14x14 windows, so there is no sequence to insert tokens into. In deep VPT a block's
  prompts only ever act on the image tokens through attention (their own outputs are
  dropped), so each target block's prompts are keys and values of its attention: normalised
  by the block's norm1 and projected by its frozen qkv, as tokens would be, and attended to by
  every window (windowed blocks) or by the whole grid (global blocks), without relative
  position terms (a prompt has no position). Shallow prompts would have to travel between
  blocks beside the grid, which SAM's encoder has no place for: only ``deep=True`` runs there.
- CNNs (ResNet, EfficientNet, ConvNeXt): no tokens at all. The prompt lives in pixel space:
  a learnable frame ``num_tokens`` pixels wide around the image (Bahng et al.'s padding
  prompt), added to the normalised image where the encoder's stem first sees it. It is
  defined on a ``pixel_grid`` x ``pixel_grid`` image and resized to other inputs; ``deep`` and
  ``targets`` do not apply.

Prompt tokens start from VPT's uniform initialisation, bounded by sqrt(6 / (fan_in + dim))
with fan_in = channels * patch height * patch width of the patch embedding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from medadapt.adapters.base import (
    AdapterConfig,
    AdapterModule,
    replace_module,
    select_blocks,
)
from medadapt.adapters.wrappers import Adapted


class PromptedBlock(AdapterModule):
    """Runs ``block`` with prompt tokens inserted after ``num_prefix`` prefix tokens.

    Arguments:
      block: the transformer block, taking (B, L, C) token sequences.
      prompts: (P, C) learnable tokens to insert, or None when this block only strips them.
      num_prefix: prefix tokens (class, registers) ahead of the prompts.
      strip: number of prompt tokens to drop from the block's output.
    """

    def __init__(self, block: nn.Module, prompts: nn.Parameter | None, num_prefix: int, strip: int):
        super().__init__()
        self.block = block
        self.prompts = prompts
        self.num_prefix = num_prefix
        self.strip = strip

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if not self.enabled:
            return self.block(x, *args, **kwargs)
        if self.prompts is not None:
            p = self.prompts.unsqueeze(0).expand(x.shape[0], -1, -1).to(x.dtype)
            x = torch.cat([x[:, : self.num_prefix], p, x[:, self.num_prefix :]], dim=1)
        out = self.block(x, *args, **kwargs)
        if self.strip:
            out = torch.cat([out[:, : self.num_prefix], out[:, self.num_prefix + self.strip :]], dim=1)
        return out

    def adapter_parameters(self) -> list[nn.Parameter]:
        return [] if self.prompts is None else [self.prompts]


class PromptedAttention(AdapterModule):
    """segment_anything's ``Attention`` whose queries also attend to learnable prompts.

    The prompts are normalised by ``norm`` (the block's norm1, which the block applies to its
    tokens before attention) and projected by the attention's own frozen qkv into P extra
    keys and values, shared by every window of the batch. Image-token pairs keep their
    decomposed relative-position terms; prompts have none.

    Arguments:
      base: a segment_anything ``Attention`` (input (B, H, W, C): whole grids or windows).
      prompts: (P, C) learnable prompt tokens.
      norm: the norm the block applies before attention.
    """

    def __init__(self, base: nn.Module, prompts: nn.Parameter, norm: nn.Module):
        super().__init__()
        self.base = base
        self.prompts = prompts
        self.norm = norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return self.base(x)
        from segment_anything.modeling.image_encoder import add_decomposed_rel_pos

        attn, heads = self.base, self.base.num_heads
        b, h, w, _ = x.shape
        qkv = attn.qkv(x).reshape(b, h * w, 3, heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.reshape(3, b * heads, h * w, -1).unbind(0)
        p = attn.qkv(self.norm(self.prompts.to(x.dtype)))
        # (P, 3C) -> keys and values (B * heads, P, head_dim), batch-major like q.
        pk, pv = p.reshape(p.shape[0], 3, heads, -1).permute(1, 2, 0, 3)[1:]
        pk, pv = (t.unsqueeze(0).expand(b, -1, -1, -1).reshape(b * heads, p.shape[0], -1) for t in (pk, pv))
        scaled = q * attn.scale
        logits = scaled @ k.transpose(-2, -1)
        if attn.use_rel_pos:
            logits = add_decomposed_rel_pos(logits, q, attn.rel_pos_h, attn.rel_pos_w, (h, w), (h, w))
        weights = torch.cat([logits, scaled @ pk.transpose(-2, -1)], dim=-1).softmax(dim=-1)
        out = weights[..., : h * w] @ v + weights[..., h * w :] @ pv
        out = out.view(b, heads, h, w, -1).permute(0, 2, 3, 1, 4).reshape(b, h, w, -1)
        return attn.proj(out)

    def adapter_parameters(self) -> list[nn.Parameter]:
        return [self.prompts]


class PixelPrompt(nn.Module):
    """A learnable frame ``width`` pixels wide around a ``size`` x ``size`` image; zero inside.

    ``forward(x)`` returns the frame (1, C, H, W) at ``x``'s size (bilinear resize for other
    sizes), to be added to ``x``.
    """

    def __init__(self, channels: int, width: int, size: int):
        super().__init__()
        if width < 1 or 2 * width >= size:
            raise ValueError(f"a pixel prompt of width {width} needs 1 <= width < pixel_grid / 2 = {size / 2}")
        inner = size - 2 * width
        # Bahng et al. start the frame from a standard normal, the scale of a normalised image.
        self.top = nn.Parameter(torch.randn(channels, width, size))
        self.bottom = nn.Parameter(torch.randn(channels, width, size))
        self.left = nn.Parameter(torch.randn(channels, inner, width))
        self.right = nn.Parameter(torch.randn(channels, inner, width))

    def frame(self) -> torch.Tensor:
        inner = self.left.shape[1]
        centre = self.left.new_zeros(self.left.shape[0], inner, inner)
        middle = torch.cat([self.left, centre, self.right], dim=2)
        return torch.cat([self.top, middle, self.bottom], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        frame = self.frame().unsqueeze(0).to(x.dtype)
        if frame.shape[-2:] != x.shape[-2:]:
            frame = F.interpolate(frame, size=tuple(x.shape[-2:]), mode="bilinear", align_corners=False)
        return frame


def make_prompts(num_tokens: int, dim: int, patch_fan_in: int | None = None) -> nn.Parameter:
    """(num_tokens, dim) prompts with VPT's uniform initialisation.

    ``patch_fan_in`` is the patch embedding's fan-in, in_channels * patch_h * patch_w (VPT's
    3 * 16 * 16 on ViT-B/16); without one, ``dim`` stands in for it.
    """
    bound = math.sqrt(6.0 / float((patch_fan_in or dim) + dim))
    return nn.Parameter(torch.empty(num_tokens, dim).uniform_(-bound, bound))


@dataclass
class VPTConfig(AdapterConfig):
    """VPT options (see the module docstring for what a prompt is on each backbone family).

    Arguments:
      num_tokens: prompt tokens per block (deep) or at the first target block (shallow); on
        CNNs, the width in pixels of the pixel-space prompt frame.
      deep: deep (per-block prompts) or shallow VPT; token-sequence ViTs only for shallow.
      pixel_grid: side of the image the CNN pixel prompt is defined on (resized to others).
    """

    summary: ClassVar[str] = "Visual Prompt Tuning: learnable prompts (tokens; attention prompts on SAM; pixels on CNNs)"
    identity_at_init: ClassVar[bool] = False
    size_option: ClassVar[str | None] = "num_tokens"

    num_tokens: int = 10
    deep: bool = True
    pixel_grid: int = 224

    def __post_init__(self):
        super().__post_init__()
        if self.num_tokens < 1:
            raise ValueError(f"vpt num_tokens must be >= 1, got {self.num_tokens}")

    @classmethod
    def supports(cls, family) -> bool:
        return family.prompt_kind is not None

    def inject(self, encoder: nn.Module, family) -> list[str]:
        info = family.prompt_info(encoder)
        if info is None:
            raise ValueError(
                f"prompts need a token sequence, attention or a pixel input, and the {family.name} backbone "
                f"offers none of them to VPT ({family.description}); use an adapter method instead"
            )
        if info.kind == "sequence":
            return self._prompt_sequence(encoder, family, info)
        if info.kind == "attention":
            return self._prompt_attention(encoder, family, info)
        return self._prompt_pixels(encoder, family, info)

    def _prompt_sequence(self, encoder, family, info) -> list[str]:
        blocks = family.blocks(encoder)
        chosen = select_blocks(blocks, self.targets)
        n = self.num_tokens
        wrapped = []
        if self.deep:
            for _, name, block in chosen:
                prompts = make_prompts(n, info.dim, info.patch_fan_in)
                replace_module(encoder, name, PromptedBlock(block, prompts, info.num_prefix, n))
                wrapped.append(name)
            return wrapped
        first, last = chosen[0][1], blocks[-1][0]
        for name, block in blocks:
            if name in (first, last):
                prompts = make_prompts(n, info.dim, info.patch_fan_in) if name == first else None
                replace_module(encoder, name, PromptedBlock(block, prompts, info.num_prefix, n if name == last else 0))
                wrapped.append(name)
        return wrapped

    def _prompt_attention(self, encoder, family, info) -> list[str]:
        if not self.deep:
            raise ValueError(
                f"shallow prompts travel between blocks as tokens, and the {family.name} encoder passes a "
                "channels-last grid with no place for them; use deep=True (prompts in every block's attention)"
            )
        wrapped = []
        for _, name, block in select_blocks(family.blocks(encoder), self.targets):
            prompts = make_prompts(self.num_tokens, info.dim, info.patch_fan_in)
            attention = f"{name}.{info.attention}"
            norm = block.get_submodule(info.attention_norm)
            replace_module(encoder, attention, PromptedAttention(encoder.get_submodule(attention), prompts, norm))
            wrapped.append(attention)
        return wrapped

    def _prompt_pixels(self, encoder, family, info) -> list[str]:
        if self.targets is not None:
            raise ValueError(f"the {family.name} backbone's prompt is one pixel-space frame at its input; "
                             "targets do not apply")
        prompt = PixelPrompt(info.channels, self.num_tokens, self.pixel_grid)
        replace_module(encoder, info.input, Adapted(encoder.get_submodule(info.input), prompt, "pre"))
        return [info.input]
