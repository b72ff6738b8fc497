"""Visual Prompt Tuning (Jia et al., 2022): learnable tokens inserted after the prefix tokens.

Deep VPT gives every target block its own prompts; the prompts' outputs are dropped after the
block, which is the same as replacing them at the next block. Shallow VPT inserts prompts
before the first target block and drops them after the last block.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn as nn

from medadapt.adapters.base import AdapterConfig


class PromptedBlock(nn.Module):
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
        self.enabled = True

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


def make_prompts(num_tokens: int, dim: int, patch_dim: int | None = None) -> nn.Parameter:
    # VPT's uniform initialisation, scaled by the patch embedding's fan-in.
    bound = math.sqrt(6.0 / float(3 * (patch_dim or dim) + dim))
    return nn.Parameter(torch.empty(num_tokens, dim).uniform_(-bound, bound))


@dataclass
class VPTConfig(AdapterConfig):
    """VPT options: ``num_tokens`` prompts per block (deep) or at the input (shallow)."""

    kind: ClassVar[str] = "prompt"
    summary: ClassVar[str] = "Visual Prompt Tuning: learnable prompt tokens (deep or shallow)"
    identity_at_init: ClassVar[bool] = False

    num_tokens: int = 10
    deep: bool = True

    def __post_init__(self):
        super().__post_init__()
        if self.num_tokens < 1:
            raise ValueError(f"vpt num_tokens must be >= 1, got {self.num_tokens}")
