"""Gradient checkpointing for the frozen encoder: trade compute for activation memory.

With adapters inside every block, backpropagation must keep each block's activations even
though the block's own weights are frozen. Checkpointing a block stores only its input and
recomputes the rest during the backward pass.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from medadapt.families import find_encoder
from medadapt.injection import replace_module


class CheckpointedBlock(nn.Module):
    """Runs ``block`` under non-reentrant activation checkpointing while training with grad."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block

    def forward(self, x: torch.Tensor, *args, **kwargs):
        if self.training and torch.is_grad_enabled():
            return checkpoint(self.block, x, *args, use_reentrant=False, **kwargs)
        return self.block(x, *args, **kwargs)


def enable_gradient_checkpointing(model: nn.Module) -> nn.Module:
    """Checkpoint every block of the encoder inside ``model`` (call after ``inject``)."""
    _, encoder, family = find_encoder(model)
    for name, block in family.blocks(encoder):
        if not isinstance(block, CheckpointedBlock):
            replace_module(encoder, name, CheckpointedBlock(block))
    return model
