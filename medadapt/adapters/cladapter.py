"""CLAdapter (Li et al., 2025): cluster-attention feature adaptation on the encoder's output.

The encoder's output tokens (CNN maps flattened, ViT prefix tokens set aside, 3D maps
flattened over D*H*W) go through LayerNorm -> FR-ResBlock(s) -> LayerNorm and are put back in
their original layout, so a pooling head or a segmentation decoder can follow. An FR-ResBlock
is ``x = ClusterAttention(LN x); x = x + MLP(LN x)``. ClusterAttention compares the mean token
with K learnable centres by cosine similarity and uses the softmax weights (temperature 1, as
in the reference code) to mix K transform matrices, applied to every token inside a bottleneck.

The paper drops a ViT's class token and mean-pools the adapted patch tokens into the head.
Here each prefix token of a token sequence is replaced by that mean, so a head that reads the
class token (a Classifier's default pooling on a ViT) reads the paper's mean pool as well.

The adapter wraps the module whose output is the encoder's last map (SAM's and LiteMedSAM's
neck, ResNet's layer4, EfficientNet's head convolution with its norm and activation, a timm
model's final norm or last stage), right before the task head.

Staged fine-tuning (stage 1: encoder frozen, adapter and head train; stage 2: everything, at
lr / 10 by the paper) is ``num_stages = 2``: :func:`medadapt.set_stage` plus
:func:`medadapt.param_groups`. In stage 1 the encoder's own output does not change, so its
features can be cached (``encoder_output_fixed(1)``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from medadapt.adapters.base import (
    VIT_B_WIDTH,
    AdapterConfig,
    TokenLayout,
    replace_module,
    site_layout,
)
from medadapt.adapters.wrappers import Adapted


class ClusterAttention(nn.Module):
    """Mixes K token transforms by the similarity of the mean token to K centres.

    Arguments:
      dim: token channels.
      num_clusters: K learnable centres (the paper's best is 20).
      bottleneck: width in which the K transforms act (256 in the paper).
      temperature: softmax temperature on the cosine similarities (1 in the reference code).
    """

    def __init__(self, dim: int, num_clusters: int = 20, bottleneck: int = 256, temperature: float = 1.0):
        super().__init__()
        self.centres = nn.Parameter(torch.randn(num_clusters, dim) * 0.02)
        self.down = nn.Linear(dim, bottleneck)
        # Transforms start near the identity so every cluster begins as a pass-through.
        eye = torch.eye(bottleneck).expand(num_clusters, -1, -1)
        self.transforms = nn.Parameter(eye + 0.01 * torch.randn(num_clusters, bottleneck, bottleneck))
        self.up = nn.Linear(bottleneck, dim)
        self.temperature = temperature

    def cluster_weights(self, x: torch.Tensor) -> torch.Tensor:
        query = x.mean(dim=1)
        similarity = F.normalize(query, dim=-1) @ F.normalize(self.centres, dim=-1).t()
        return torch.softmax(similarity / self.temperature, dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights = self.cluster_weights(x)                       # (B, K)
        transform = torch.einsum("bk,kij->bij", weights, self.transforms)
        return self.up(torch.bmm(self.down(x), transform))


class FRResBlock(nn.Module):
    def __init__(self, dim: int, num_clusters: int, bottleneck: int, mlp_ratio: float, dropout: float,
                 temperature: float = 1.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.cluster_attn = ClusterAttention(dim, num_clusters, bottleneck, temperature)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.cluster_attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class CLAdapter(nn.Module):
    """LayerNorm -> FR-ResBlocks -> LayerNorm over the encoder's output tokens.

    Arguments:
      dim: channels of the encoder output.
      layout: the output's layout; tokens are flattened over the grid (and over slices for
        ``spatial_dims=3``) and restored afterwards.
      num_clusters, bottleneck, num_blocks, mlp_ratio, dropout: see the paper.
      temperature: softmax temperature of the cluster attention.
    """

    def __init__(self, dim: int, layout: TokenLayout, num_clusters: int = 20, bottleneck: int = 256,
                 num_blocks: int = 1, mlp_ratio: float = 4.0, dropout: float = 0.0, temperature: float = 1.0):
        super().__init__()
        self.layout = layout
        self.norm_in = nn.LayerNorm(dim)
        self.blocks = nn.Sequential(*[FRResBlock(dim, num_clusters, bottleneck, mlp_ratio, dropout, temperature)
                                      for _ in range(num_blocks)])
        self.norm_out = nn.LayerNorm(dim)

    def _adapt(self, m: torch.Tensor) -> torch.Tensor:
        # m: (B, C, *spatial) -> tokens (B, N, C) over every spatial axis, and back.
        b, c = m.shape[:2]
        tokens = m.flatten(2).transpose(1, 2)
        tokens = self.norm_out(self.blocks(self.norm_in(tokens)))
        return tokens.transpose(1, 2).reshape(m.shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.layout.map_spatial(self.layout.to_tokens(x), self._adapt)
        prefix = self.layout.num_prefix
        if prefix:
            # The class token is dropped: prefix tokens carry the mean of the adapted patch tokens.
            pooled = t[:, prefix:].mean(dim=1, keepdim=True)
            t = torch.cat([pooled.expand(-1, prefix, -1), t[:, prefix:]], dim=1)
        return self.layout.from_tokens(t)


@dataclass
class CLAdapterConfig(AdapterConfig):
    """CLAdapter options (paper: K = 20 centres, 256-d bottleneck on ViT-B's 768 channels, MLP
    ratio 4; reference code: softmax temperature 1). Two training stages: 1 trains adapter and
    head on the frozen encoder, 2 trains everything. ``bottleneck`` None takes
    ``bottleneck_ratio`` (256/768) of the encoder's output width (see
    `AdapterConfig.bottleneck_for`)."""

    summary: ClassVar[str] = "CLAdapter: cluster-attention adaptation of the encoder's output tokens"
    identity_at_init: ClassVar[bool] = False
    has_spatial_part: ClassVar[bool] = True
    size_option: ClassVar[str | None] = "bottleneck"
    num_stages: ClassVar[int] = 2

    num_clusters: int = 20
    bottleneck: int | None = None
    bottleneck_ratio: float = 256 / VIT_B_WIDTH
    num_blocks: int = 1
    mlp_ratio: float = 4.0
    dropout: float = 0.0
    temperature: float = 1.0

    def __post_init__(self):
        super().__post_init__()
        if not self.temperature > 0:
            raise ValueError(f"cladapter temperature must be positive, got {self.temperature}")

    def stage_trains(self, stage: int) -> frozenset[str]:
        self.check_stage(stage)
        return frozenset({"adapter", "head"} if stage == 1 else {"adapter", "head", "encoder"})

    def encoder_output_fixed(self, stage: int) -> bool:
        # The adapter runs after the encoder: until stage 2 trains the encoder, its output is fixed.
        self.check_stage(stage)
        return stage == 1

    def build(self, dim: int, layout: TokenLayout) -> nn.Module:
        return CLAdapter(dim, layout, self.num_clusters, self.bottleneck_for(dim), self.num_blocks,
                         self.mlp_ratio, self.dropout, self.temperature)

    def inject(self, encoder: nn.Module, family) -> list[str]:
        site = family.output_site(encoder)
        adapter = self.build(site.dim, site_layout(site, self))
        replace_module(encoder, site.name, Adapted(encoder.get_submodule(site.name), adapter, "replace"))
        return [site.name]
