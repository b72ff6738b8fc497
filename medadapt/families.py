"""Backbone families: where the adapters go in each supported encoder, and how its tokens lie.

A family recognises an encoder module (by class name, so optional packages need not be
imported), lists its blocks in order, and names for each block the sub-layers an adapter can
sit beside (attention, MLP, the whole block) with the layout of the tensor each one receives.
Adding a backbone family is one class here and one line in ``FAMILIES``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch.nn as nn


@dataclass
class Site:
    """A module an adapter wraps: its qualified name (relative to the encoder), the channels
    of the tensor it sees and that tensor's layout (TokenLayout keyword arguments)."""

    name: str
    dim: int
    layout: dict


@dataclass
class PromptInfo:
    num_prefix: int
    dim: int
    patch_dim: int | None


def base_type_name(module: nn.Module) -> str:
    """Class name of the module under any medadapt wrappers (adapters, checkpointing)."""
    while True:
        inner = getattr(module, "base", None) or getattr(module, "block", None)
        if not isinstance(inner, nn.Module):
            return type(module).__name__
        module = inner


def _last_conv_channels(module: nn.Module) -> int:
    convs = [m for m in module.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    if not convs:
        raise ValueError(f"cannot tell the output channels of {type(module).__name__}")
    last = convs[-1]
    return last.out_channels if isinstance(last, nn.Conv2d) else last.out_features


class Family:
    """Base class; the defaults describe a transformer with pre-norm attention and MLP."""

    name = "family"
    description = ""
    class_names: tuple[str, ...] = ()
    # CNN families have no attention/MLP split: adapters go on whole blocks.
    cnn = False
    # regex (relative to a block) of the linear layers LoRA wraps by default; None: no LoRA.
    lora_pattern: str | None = r"attn\.qkv$"

    def matches(self, module: nn.Module) -> bool:
        return type(module).__name__ in self.class_names

    def blocks(self, encoder: nn.Module) -> list[tuple[str, nn.Module]]:
        raise NotImplementedError

    def site(self, encoder: nn.Module, block_name: str, block: nn.Module, site: str) -> Site | None:
        raise NotImplementedError

    def output_site(self, encoder: nn.Module) -> Site:
        raise NotImplementedError

    def prompt_info(self, encoder: nn.Module) -> PromptInfo | None:
        return None

    def block_keeps_shape(self, block: nn.Module) -> bool:
        return True


class SamViT(Family):
    name = "sam_vit"
    description = "segment_anything ImageEncoderViT (SAM / MedSAM): channels-last grid, windowed and global blocks"
    class_names = ("ImageEncoderViT",)

    def blocks(self, encoder):
        return [(f"blocks.{i}", b) for i, b in enumerate(encoder.blocks)]

    def _grid(self, encoder):
        patch = encoder.patch_embed.proj.kernel_size[0]
        return (encoder.img_size // patch, encoder.img_size // patch)

    def site(self, encoder, block_name, block, site):
        dim = block.norm1.normalized_shape[0]
        if site == "attn":
            window = (block.window_size,) * 2 if block.window_size > 0 else None
            return Site(f"{block_name}.attn", dim, dict(kind="channels_last", grid=self._grid(encoder), window=window))
        if site == "mlp":
            return Site(f"{block_name}.mlp", dim, dict(kind="channels_last"))
        return Site(block_name, dim, dict(kind="channels_last"))

    def output_site(self, encoder):
        return Site("neck", _last_conv_channels(encoder.neck), dict(kind="channels_first"))


class TimmViT(Family):
    name = "timm_vit"
    description = "timm VisionTransformer: token sequence with prefix tokens, any grid"
    class_names = ("VisionTransformer",)

    def blocks(self, encoder):
        return [(f"blocks.{i}", b) for i, b in enumerate(encoder.blocks)]

    def _layout(self, encoder):
        grid = tuple(encoder.patch_embed.grid_size) if encoder.patch_embed.grid_size else None
        return dict(kind="sequence", grid=grid, num_prefix=int(encoder.num_prefix_tokens))

    def site(self, encoder, block_name, block, site):
        dim = block.norm1.normalized_shape[0]
        name = {"attn": f"{block_name}.attn", "mlp": f"{block_name}.mlp"}.get(site, block_name)
        return Site(name, dim, self._layout(encoder))

    def output_site(self, encoder):
        return Site("norm", encoder.embed_dim, self._layout(encoder))

    def prompt_info(self, encoder):
        proj = encoder.patch_embed.proj
        patch_dim = proj.in_channels * math.prod(proj.kernel_size) if isinstance(proj, nn.Conv2d) else None
        return PromptInfo(int(encoder.num_prefix_tokens), encoder.embed_dim, patch_dim)


class TimmSwin(Family):
    name = "timm_swin"
    description = "timm SwinTransformer: channels-last stages, shifted-window attention"
    class_names = ("SwinTransformer",)

    def blocks(self, encoder):
        return [(f"layers.{i}.blocks.{j}", b)
                for i, layer in enumerate(encoder.layers) for j, b in enumerate(layer.blocks)]

    def site(self, encoder, block_name, block, site):
        dim = block.norm1.normalized_shape[0]
        resolution = tuple(block.input_resolution)
        if site == "attn":
            return Site(f"{block_name}.attn", dim, dict(kind="sequence", grid=resolution, window=tuple(block.window_size),
                                                        shift=tuple(block.shift_size)))
        if site == "mlp":
            return Site(f"{block_name}.mlp", dim, dict(kind="sequence", grid=resolution))
        return Site(block_name, dim, dict(kind="channels_last"))

    def output_site(self, encoder):
        return Site("norm", encoder.num_features, dict(kind="channels_last"))


class TinyViTFamily(Family):
    name = "tinyvit"
    description = "LiteMedSAM TinyViT: token sequences, windowed attention, MBConv stem stage"
    class_names = ("TinyViT",)

    def blocks(self, encoder):
        return [(f"layers.{i}.blocks.{j}", b)
                for i, layer in enumerate(encoder.layers) for j, b in enumerate(layer.blocks)
                if base_type_name(b) == "TinyViTBlock"]

    def site(self, encoder, block_name, block, site):
        resolution = tuple(block.input_resolution)
        if site == "attn":
            # TinyViT skips the partition when the grid is exactly one window.
            ws = block.window_size
            window = None if resolution == (ws, ws) else (ws, ws)
            return Site(f"{block_name}.attn", block.dim, dict(kind="sequence", grid=resolution, window=window))
        name = f"{block_name}.mlp" if site == "mlp" else block_name
        return Site(name, block.dim, dict(kind="sequence", grid=resolution))

    def output_site(self, encoder):
        return Site("neck", _last_conv_channels(encoder.neck), dict(kind="channels_first"))


class CNNFamily(Family):
    cnn = True
    lora_pattern = None

    def site(self, encoder, block_name, block, site):
        if site not in ("block", "input"):
            return None
        dim = self.block_in_channels(block) if site == "input" else self.block_channels(block)
        return Site(block_name, dim, dict(kind="channels_first"))

    def block_channels(self, block: nn.Module) -> int:
        return _last_conv_channels(block)

    def block_in_channels(self, block: nn.Module) -> int:
        first = next(m for m in block.modules() if isinstance(m, nn.Conv2d))
        return first.in_channels


class TimmConvNeXt(CNNFamily):
    name = "timm_convnext"
    description = "timm ConvNeXt: (B, C, H, W) maps, adapters on whole blocks"
    class_names = ("ConvNeXt",)

    def blocks(self, encoder):
        return [(f"stages.{i}.blocks.{j}", b)
                for i, stage in enumerate(encoder.stages) for j, b in enumerate(stage.blocks)]

    def output_site(self, encoder):
        last = len(encoder.stages) - 1
        return Site(f"stages.{last}", encoder.num_features, dict(kind="channels_first"))


class ResNetFamily(CNNFamily):
    name = "resnet"
    description = "torchvision / timm ResNet (e.g. RadImageNet ResNet-50): adapters on bottleneck blocks"
    class_names = ("ResNet",)

    def blocks(self, encoder):
        return [(f"layer{i}.{j}", b) for i in range(1, 5) for j, b in enumerate(getattr(encoder, f"layer{i}"))]

    def block_keeps_shape(self, block):
        return getattr(block, "downsample", None) is None

    def output_site(self, encoder):
        return Site("layer4", self.block_channels(encoder.layer4[-1]), dict(kind="channels_first"))


class EfficientNetFamily(CNNFamily):
    name = "efficientnet"
    description = "EfficientNet(-Lite) MBConv blocks: adapters on whole blocks"
    class_names = ("EfficientNet",)

    def blocks(self, encoder):
        return [(f"_blocks.{i}", b) for i, b in enumerate(encoder._blocks)]

    def block_channels(self, block):
        return block._bn2.num_features

    def block_in_channels(self, block):
        return block._block_args.input_filters

    def block_keeps_shape(self, block):
        args = block._block_args
        return args.input_filters == args.output_filters and args.stride in (1, [1], (1, 1), [1, 1])

    def output_site(self, encoder):
        last = len(encoder._blocks) - 1
        return Site(f"_blocks.{last}", self.block_channels(encoder._blocks[last]), dict(kind="channels_first"))


FAMILIES: list[Family] = [SamViT(), TimmViT(), TimmSwin(), TinyViTFamily(), TimmConvNeXt(),
                          ResNetFamily(), EfficientNetFamily()]


def find_encoder(model: nn.Module) -> tuple[str, nn.Module, Family]:
    """The first module in ``model`` (itself included) that a family recognises."""
    for name, module in model.named_modules():
        for family in FAMILIES:
            if family.matches(module):
                return name, module, family
    supported = ", ".join(sorted({c for f in FAMILIES for c in f.class_names}))
    raise ValueError(
        f"no supported encoder found in {type(model).__name__}; medadapt injects into {supported}"
    )
