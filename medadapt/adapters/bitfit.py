"""BitFit: train only the bias terms of the frozen backbone (Zaken et al., 2021)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from medadapt.adapters.base import AdapterConfig


@dataclass
class BitFitConfig(AdapterConfig):
    """BitFit has no options: every bias in the encoder (linear, conv and norm) is trained."""

    kind: ClassVar[str] = "bias"
    summary: ClassVar[str] = "BitFit: train only the backbone's bias terms"
