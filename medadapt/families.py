"""Backbone families: where the adapters go in each supported encoder, and how its tokens lie.

A family recognises an encoder module (by class name, so optional packages need not be
imported), lists its blocks (and where its stages end) in order, and names for each block the
sub-layers an adapter can sit beside (attention, MLP, the whole block) with the layout of the
tensor each one receives, where prompts can go and which module gives the encoder's output.
Adding a backbone family is one class here and one line in ``FAMILIES``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch.nn as nn


@dataclass
class Site:
    """A module an adapter wraps: its qualified name (relative to the encoder), the channels
    of the tensor it sees and that tensor's layout (TokenLayout keyword arguments).

    ``input_norm`` names the norm inside the module that it applies to its own input first
    (TinyViT's attention and MLP): an adapter beside the module sees that norm's output.
    ``layer_scale`` names (relative to the encoder) the block's LayerScale on the module's
    output (timm's ls1 / ls2): an adapter beside the module adds its update outside it.
    """

    name: str
    dim: int
    layout: dict
    input_norm: str | None = None
    layer_scale: str | None = None


@dataclass
class PromptInfo:
    """Where VPT's prompts go in an encoder.

    kind: "sequence" (tokens inserted into (B, L, C) sequences after ``num_prefix`` prefix
      tokens), "attention" (keys and values of each block's ``attention`` sub-layer, normalised
      by the block's ``attention_norm``) or "pixels" (a pixel-space prompt added to the input
      of the module ``input``, which sees ``channels`` image channels).
    dim: token channels; patch_fan_in: in_channels * patch area of the patch embedding.
    """

    kind: str
    dim: int = 0
    patch_fan_in: int | None = None
    num_prefix: int = 0
    attention: str = "attn"
    attention_norm: str = "norm1"
    input: str = ""
    channels: int = 3


def base_type_name(module: nn.Module) -> str:
    """Class name of the module under any medadapt wrappers (adapters, checkpointing)."""
    while True:
        inner = getattr(module, "base", None) or getattr(module, "block", None)
        if not isinstance(inner, nn.Module):
            return type(module).__name__
        module = inner


def _patch_fan_in(proj: nn.Module) -> int | None:
    return proj.in_channels * math.prod(proj.kernel_size) if isinstance(proj, nn.Conv2d) else None


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
    # What VPT's prompts are in this family (see PromptInfo.kind); None: no prompts.
    prompt_kind: str | None = None

    def matches(self, module: nn.Module) -> bool:
        return type(module).__name__ in self.class_names

    def blocks(self, encoder: nn.Module) -> list[tuple[str, nn.Module]]:
        raise NotImplementedError

    def stage_ends(self, encoder: nn.Module) -> list[tuple[str, nn.Module]]:
        """The last block of each stage, whose output is the stage's; a plain ViT has no
        stages, so each of its blocks is one."""
        return self.blocks(encoder)

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
    prompt_kind = "attention"

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

    def prompt_info(self, encoder):
        # Channels-last grids and windowed attention: prompts are keys and values of attention.
        return PromptInfo("attention", encoder.patch_embed.proj.out_channels, _patch_fan_in(encoder.patch_embed.proj))


class TimmViT(Family):
    name = "timm_vit"
    description = "timm VisionTransformer: token sequence with prefix tokens, any grid"
    class_names = ("VisionTransformer",)
    prompt_kind = "sequence"

    def blocks(self, encoder):
        return [(f"blocks.{i}", b) for i, b in enumerate(encoder.blocks)]

    def _layout(self, encoder):
        grid = tuple(encoder.patch_embed.grid_size) if encoder.patch_embed.grid_size else None
        return dict(kind="sequence", grid=grid, num_prefix=int(encoder.num_prefix_tokens))

    def site(self, encoder, block_name, block, site):
        dim = block.norm1.normalized_shape[0]
        if site in ("attn", "mlp"):
            # The block multiplies each sub-layer's output by its LayerScale (ls1, ls2).
            scale = {"attn": "ls1", "mlp": "ls2"}[site]
            layer_scale = f"{block_name}.{scale}" if hasattr(block, scale) else None
            return Site(f"{block_name}.{site}", dim, self._layout(encoder), layer_scale=layer_scale)
        return Site(block_name, dim, self._layout(encoder))

    def output_site(self, encoder):
        return Site("norm", encoder.embed_dim, self._layout(encoder))

    def prompt_info(self, encoder):
        return PromptInfo("sequence", encoder.embed_dim, _patch_fan_in(encoder.patch_embed.proj),
                          num_prefix=int(encoder.num_prefix_tokens))


class TimmSwin(Family):
    name = "timm_swin"
    description = "timm SwinTransformer: channels-last stages, shifted-window attention"
    class_names = ("SwinTransformer",)

    def blocks(self, encoder):
        return [(f"layers.{i}.blocks.{j}", b)
                for i, layer in enumerate(encoder.layers) for j, b in enumerate(layer.blocks)]

    def stage_ends(self, encoder):
        return [(f"layers.{i}.blocks.{len(layer.blocks) - 1}", layer.blocks[-1])
                for i, layer in enumerate(encoder.layers)]

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

    def stage_ends(self, encoder):
        ends: dict[str, tuple[str, nn.Module]] = {}
        for name, block in self.blocks(encoder):
            ends[name.rsplit(".blocks.", 1)[0]] = (name, block)
        return list(ends.values())

    def site(self, encoder, block_name, block, site):
        resolution = tuple(block.input_resolution)
        if site == "attn":
            # TinyViT skips the partition when the grid is exactly one window.
            ws = block.window_size
            window = None if resolution == (ws, ws) else (ws, ws)
            # Its Attention and Mlp normalise their input themselves (a LayerNorm "norm").
            return Site(f"{block_name}.attn", block.dim, dict(kind="sequence", grid=resolution, window=window),
                        input_norm="norm")
        if site == "mlp":
            return Site(f"{block_name}.mlp", block.dim, dict(kind="sequence", grid=resolution), input_norm="norm")
        return Site(block_name, block.dim, dict(kind="sequence", grid=resolution))

    def output_site(self, encoder):
        return Site("neck", _last_conv_channels(encoder.neck), dict(kind="channels_first"))


class CNNFamily(Family):
    cnn = True
    lora_pattern = None
    prompt_kind = "pixels"
    # The module that first sees the (normalised) image: where a pixel-space prompt is added.
    pixel_input = ""

    def prompt_info(self, encoder):
        first = encoder.get_submodule(self.pixel_input)
        conv = first if isinstance(first, nn.Conv2d) else next(m for m in first.modules() if isinstance(m, nn.Conv2d))
        return PromptInfo("pixels", input=self.pixel_input, channels=conv.in_channels)

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
    pixel_input = "stem"

    def blocks(self, encoder):
        return [(f"stages.{i}.blocks.{j}", b)
                for i, stage in enumerate(encoder.stages) for j, b in enumerate(stage.blocks)]

    def stage_ends(self, encoder):
        return [(f"stages.{i}.blocks.{len(stage.blocks) - 1}", stage.blocks[-1])
                for i, stage in enumerate(encoder.stages)]

    def output_site(self, encoder):
        last = len(encoder.stages) - 1
        return Site(f"stages.{last}", encoder.num_features, dict(kind="channels_first"))


class ResNetFamily(CNNFamily):
    name = "resnet"
    description = "torchvision / timm ResNet (e.g. RadImageNet ResNet-50): adapters on bottleneck blocks"
    class_names = ("ResNet",)
    pixel_input = "conv1"

    def blocks(self, encoder):
        return [(f"layer{i}.{j}", b) for i in range(1, 5) for j, b in enumerate(getattr(encoder, f"layer{i}"))]

    def stage_ends(self, encoder):
        layers = [getattr(encoder, f"layer{i}") for i in range(1, 5)]
        return [(f"layer{i}.{len(layer) - 1}", layer[-1]) for i, layer in enumerate(layers, start=1)]

    def block_keeps_shape(self, block):
        return getattr(block, "downsample", None) is None

    def output_site(self, encoder):
        return Site("layer4", self.block_channels(encoder.layer4[-1]), dict(kind="channels_first"))


# Name of the Identity that EfficientNetBackbone puts on the encoder's final map.
EFFICIENTNET_OUTPUT_TAP = "final_features"


class EfficientNetFamily(CNNFamily):
    name = "efficientnet"
    description = "EfficientNet(-Lite) MBConv blocks: adapters on whole blocks"
    class_names = ("EfficientNet",)
    pixel_input = "_conv_stem"

    def blocks(self, encoder):
        return [(f"_blocks.{i}", b) for i, b in enumerate(encoder._blocks)]

    def stage_ends(self, encoder):
        # No stage modules: a stage is a run of MBConv blocks of one output width.
        ends: list[tuple[str, nn.Module]] = []
        width = None
        for name, block in self.blocks(encoder):
            filters = block._block_args.output_filters
            if filters == width:
                ends[-1] = (name, block)
            else:
                ends.append((name, block))
            width = filters
        return ends

    def block_channels(self, block):
        return block._bn2.num_features

    def block_in_channels(self, block):
        return block._block_args.input_filters

    def block_keeps_shape(self, block):
        args = block._block_args
        return args.input_filters == args.output_filters and args.stride in (1, [1], (1, 1), [1, 1])

    def output_site(self, encoder):
        # The encoder's last map is act(bn1(conv_head(x))), computed by EfficientNetBackbone;
        # its output tap (an Identity) is where a module on the final map goes.
        if not hasattr(encoder, EFFICIENTNET_OUTPUT_TAP):
            raise ValueError("the EfficientNet encoder has no output tap; build it with "
                             "medadapt.create_backbone('efficientnet_lite0') (EfficientNetBackbone)")
        return Site(EFFICIENTNET_OUTPUT_TAP, encoder._conv_head.out_channels, dict(kind="channels_first"))


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
