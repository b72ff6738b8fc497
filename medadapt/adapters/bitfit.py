"""BitFit: train only the bias terms of the frozen backbone (Zaken et al., 2021)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch.nn as nn

from medadapt.adapters.base import AdapterConfig


@dataclass
class BitFitConfig(AdapterConfig):
    """BitFit has no options: every bias in the encoder (linear, conv and norm) is trained.

    The biases are the backbone's own weights, so there is nothing to switch off, and merging
    is already done."""

    summary: ClassVar[str] = "BitFit: train only the backbone's bias terms"
    changes_base_weights: ClassVar[bool] = True

    def inject(self, encoder: nn.Module, family) -> list[str]:
        names = [n for n, _ in encoder.named_parameters() if n.endswith("bias")]
        if not names:
            raise ValueError(f"the {family.name} encoder has no bias terms to train")
        return names

    def adapter_parameters(self, encoder: nn.Module) -> list[nn.Parameter]:
        return [p for n, p in encoder.named_parameters() if n.endswith("bias")]

    def merge(self, encoder: nn.Module) -> None:
        pass  # the trained biases are the weights
