"""The two reference points of every table: linear probing and full fine-tuning."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from medadapt.adapters.base import AdapterConfig


@dataclass
class LinearProbeConfig(AdapterConfig):
    """Linear probing: the encoder is frozen and only the task head (outside it) trains."""

    kind: ClassVar[str] = "head"
    summary: ClassVar[str] = "Linear probing: frozen encoder, only the task head trains"


@dataclass
class FullFineTuneConfig(AdapterConfig):
    """Full fine-tuning: every parameter trains; the 'adapter' file is the whole model."""

    kind: ClassVar[str] = "full"
    summary: ClassVar[str] = "Full fine-tuning: every parameter trains"
