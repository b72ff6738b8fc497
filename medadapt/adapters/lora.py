"""LoRA: a low-rank update B A beside frozen linear layers (Hu et al., 2022); mergeable."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn as nn

from medadapt.adapters.base import (
    AdapterConfig,
    AdapterModule,
    replace_module,
    select_blocks,
)
from medadapt.patterns import check_pattern


class LoRALinear(AdapterModule):
    """y = base(x) + (alpha / rank) * B(A(dropout(x))), with B zero-initialised.

    Arguments:
      base: the frozen nn.Linear it wraps.
      rank: rank of the update.
      alpha: scaling numerator.
      dropout: dropout on the LoRA path's input.
    """

    def __init__(self, base: nn.Linear, rank: int = 8, alpha: float = 16.0, dropout: float = 0.0):
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        self.base = base
        self.lora_a = nn.Linear(base.in_features, rank, bias=False)
        self.lora_b = nn.Linear(rank, base.out_features, bias=False)
        nn.init.kaiming_uniform_(self.lora_a.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_b.weight)
        self.scaling = alpha / rank
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        if self.enabled:
            out = out + self.lora_b(self.lora_a(self.dropout(x))) * self.scaling
        return out

    def adapter_parameters(self) -> list[nn.Parameter]:
        return [self.lora_a.weight, self.lora_b.weight]

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        """The base layer with the update folded into its weight."""
        self.base.weight += (self.lora_b.weight @ self.lora_a.weight) * self.scaling
        return self.base


@dataclass
class LoRAConfig(AdapterConfig):
    """LoRA options.

    Arguments:
      rank, alpha, dropout: see :class:`LoRALinear`.
      target_modules: regular expression for the linear layers to wrap, matched against names
        relative to each target block; None uses the backbone's attention projections (qkv).
    """

    summary: ClassVar[str] = "LoRA: low-rank updates of the attention projections (mergeable)"
    size_option: ClassVar[str | None] = "rank"

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: str | None = None

    def __post_init__(self):
        super().__post_init__()
        if self.target_modules is not None:
            check_pattern("target_modules", self.target_modules)

    @classmethod
    def supports(cls, family) -> bool:
        return family.lora_pattern is not None

    def build(self, base: nn.Linear) -> nn.Module:
        return LoRALinear(base, self.rank, self.alpha, self.dropout)

    def inject(self, encoder: nn.Module, family) -> list[str]:
        pattern_text = self.target_modules or family.lora_pattern
        if pattern_text is None:
            raise ValueError(
                f"LoRA wraps linear layers, and the {family.name} backbone has no attention projections; "
                "pass target_modules='<regex of nn.Linear names>' or use another method"
            )
        pattern = re.compile(pattern_text)
        wrapped = []
        for _, block_name, block in select_blocks(family.blocks(encoder), self.targets):
            for name, module in list(block.named_modules()):
                if name and isinstance(module, nn.Linear) and pattern.search(name):
                    full = f"{block_name}.{name}"
                    replace_module(encoder, full, self.build(module))
                    wrapped.append(full)
        if not wrapped:
            raise ValueError(f"target_modules={pattern_text!r} matches no nn.Linear in the {family.name} blocks")
        return wrapped
