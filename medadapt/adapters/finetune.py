"""The two reference points of every table: linear probing and full fine-tuning."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch.nn as nn

from medadapt.adapters.base import AdapterConfig


@dataclass
class LinearProbeConfig(AdapterConfig):
    """Linear probing: the encoder is frozen and only the task head (outside it) trains, so
    the encoder's output never changes and can be computed once."""

    summary: ClassVar[str] = "Linear probing: frozen encoder, only the task head trains"

    def stage_trains(self, stage: int) -> frozenset[str]:
        self.check_stage(stage)
        return frozenset({"head"})

    def encoder_output_fixed(self, stage: int) -> bool:
        self.check_stage(stage)
        return True

    def inject(self, encoder: nn.Module, family) -> list[str]:
        return []

    def merge(self, encoder: nn.Module) -> None:
        pass  # nothing was added


@dataclass
class FullFineTuneConfig(AdapterConfig):
    """Full fine-tuning: every parameter trains (BatchNorm statistics included); the
    'adapter' file is the whole model."""

    summary: ClassVar[str] = "Full fine-tuning: every parameter trains"
    changes_base_weights: ClassVar[bool] = True

    def stage_trains(self, stage: int) -> frozenset[str]:
        self.check_stage(stage)
        return frozenset({"encoder", "head"})

    def inject(self, encoder: nn.Module, family) -> list[str]:
        return []

    def merge(self, encoder: nn.Module) -> None:
        pass  # the trained weights are the model
