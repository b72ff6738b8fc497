"""ResNet-50 in torchvision's layout, loading RadImageNet's published PyTorch weights.

RadImageNet saved its encoder as ``nn.Sequential(*list(resnet50().children())[:9])``
under an attribute ``backbone``, so its keys are the children's indices:
``backbone.0`` conv1, ``backbone.1`` bn1, ``backbone.4``..``backbone.7`` layer1..layer4
(2, 3 and 8 are ReLU, max-pool and avg-pool, which hold no weights). Some copies lack the
``backbone.`` prefix. Plain torchvision files load too. The classifier is dropped: this
backbone returns features only.
"""

from __future__ import annotations

import logging
from typing import Any, Mapping

import torch
import torch.nn as nn
from torchvision.models import ResNet, resnet50

from .base import Backbone, warn_not_pretrained
from .loading import (
    Checkpoint,
    describe,
    load_strict,
    read_checkpoint,
    strip_prefix,
    unwrap_state_dict,
)

__all__ = ["ResNetBackbone", "build_radimagenet_resnet50", "checkpoint_filter_fn"]

logger = logging.getLogger(__name__)

# RadImageNet trained on ImageNet-normalised inputs.
IMAGENET_PREPROCESSING = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}

# Position of each weighted child in list(torchvision ResNet.children()).
_CHILD_NAMES = {0: "conv1", 1: "bn1", 4: "layer1", 5: "layer2", 6: "layer3", 7: "layer4", 9: "fc"}


def checkpoint_filter_fn(state_dict: Mapping[str, Any], model: ResNet) -> dict[str, Any]:
    """Map RadImageNet (``backbone.N.*`` or ``N.*``) or torchvision keys onto ``model``.

    The classifier (``fc.*``, or keys outside ``backbone.`` in a RadImageNet file) is
    dropped because the backbone has none; every other key is kept for the strict load.
    """
    state = unwrap_state_dict(state_dict)
    if any(k.startswith("backbone.") for k in state):
        head = sorted(k for k in state if not k.startswith("backbone."))
        if head:
            logger.info("dropping classifier keys outside 'backbone.': %s", head)
        state = strip_prefix(state, "backbone.")
    out: dict[str, Any] = {}
    for key, value in state.items():
        first, _, rest = key.partition(".")
        if first.isdigit() and int(first) in _CHILD_NAMES:
            key = f"{_CHILD_NAMES[int(first)]}.{rest}"
        if key.startswith("fc.") and not hasattr(model.fc, "weight"):
            continue
        out[key] = value
    return out


class ResNetBackbone(Backbone):
    """torchvision ResNet returning layer1..layer4 (strides 4, 8, 16, 32)."""

    def __init__(self, encoder: ResNet, name: str, preprocessing: dict[str, Any]) -> None:
        """
        Arguments:
            encoder: a torchvision ResNet whose ``fc`` is ``nn.Identity``.
            name: the registry name.
            preprocessing: the normalisation preset of its weights.
        """
        layers = (encoder.layer1, encoder.layer2, encoder.layer3, encoder.layer4)
        # The last conv of the last block: conv3 in a Bottleneck, conv2 in a BasicBlock.
        channels = [getattr(layer[-1], "conv3", layer[-1].conv2).out_channels for layer in layers]
        super().__init__(
            encoder,
            name=name,
            feature_channels=channels,
            feature_strides=[4, 8, 16, 32],
            img_size=None,
            preprocessing=preprocessing,
        )

    def forward_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        self.check_input(x)
        e = self.encoder
        x = e.maxpool(e.relu(e.bn1(e.conv1(x))))
        features = []
        for layer in (e.layer1, e.layer2, e.layer3, e.layer4):
            x = layer(x)
            features.append(x)
        return features


def build_radimagenet_resnet50(checkpoint: Checkpoint | None = None) -> ResNetBackbone:
    """ResNet-50 with RadImageNet (or torchvision) weights.

    Arguments:
        checkpoint: RadImageNet's ``ResNet50.pt`` / a torchvision ResNet-50 file or state
            dict. None gives random weights with a NotPretrainedWarning.
    """
    encoder = resnet50(weights=None)
    encoder.fc = nn.Identity()  # features only; a task head is added by medadapt.models
    if checkpoint is None:
        warn_not_pretrained("radimagenet_resnet50", "RadImageNet's ResNet50 weights")
    else:
        load_strict(encoder, checkpoint_filter_fn(read_checkpoint(checkpoint), encoder), describe(checkpoint))
    return ResNetBackbone(encoder, name="radimagenet_resnet50", preprocessing=IMAGENET_PREPROCESSING)
