"""Large Kernel Adapter (LKA): Down -> activation -> one large depthwise kernel -> Up.

Trainable parameters per module: 2 * d * d^ + d^ * k^2 (+ biases). The paper places two of
them in parallel with attention and with the MLP of each block, which is the default here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn as nn

from medadapt.adapters.base import (
    VIT_B_WIDTH,
    BlockAdapterConfig,
    BottleneckAdapter,
    TokenLayout,
    as_kernel,
    depthwise_weight,
)
from medadapt.ops import dwconv


class LargeKernelAdapter(BottleneckAdapter):
    """Bottleneck adapter with one channel-wise large kernel.

    Arguments:
      dim, layout, bottleneck, activation, dropout, bias: see :class:`BottleneckAdapter`.
      kernel_size: kernel size (int, or a tuple per axis; in 3D an int k is in-plane, (1, k, k)).
      use_torch_conv: run the convolution as a plain torch convolution (reference path).
    """

    def __init__(
        self,
        dim: int,
        layout: TokenLayout,
        bottleneck: int = 8,
        kernel_size: int | tuple = 51,
        activation: str = "gelu",
        dropout: float = 0.0,
        bias: bool = True,
        zero_init: bool = True,
        use_torch_conv: bool = False,
    ):
        super().__init__(dim, layout, bottleneck, activation, dropout, bias=bias,
                         zero_init=zero_init, activate_before_mix=True)
        self.kernel = depthwise_weight(bottleneck, as_kernel(kernel_size, layout.spatial_dims, depth=1))
        self.use_torch_conv = use_torch_conv

    def _conv(self, m: torch.Tensor) -> torch.Tensor:
        if self.use_torch_conv:
            conv = torch.nn.functional.conv2d if m.ndim == 4 else torch.nn.functional.conv3d
            return conv(m, self.kernel, padding="same", groups=m.shape[1])
        return dwconv(m, self.kernel)

    def mix(self, h: torch.Tensor) -> torch.Tensor:
        return self.layout.map_spatial(h, self._conv)


@dataclass
class LKAConfig(BlockAdapterConfig):
    """Large Kernel Adapter options (paper: kernel 51, bottleneck 8 on ViT-B, parallel placement;
    ``bottleneck`` None takes ``bottleneck_ratio`` of each block's width, see
    `AdapterConfig.bottleneck_for`)."""

    summary: ClassVar[str] = "Large Kernel Adapter: one large depthwise kernel in a bottleneck adapter"
    has_spatial_part: ClassVar[bool] = True
    size_option: ClassVar[str | None] = "bottleneck"

    bottleneck: int | None = None
    bottleneck_ratio: float = 8 / VIT_B_WIDTH
    kernel_size: int | list[int] = 51
    activation: str = "gelu"
    dropout: float = 0.0
    use_torch_conv: bool = False

    def build(self, dim: int, layout: TokenLayout) -> nn.Module:
        return LargeKernelAdapter(dim, layout, self.bottleneck_for(dim), self.kernel_size, self.activation,
                                  self.dropout, use_torch_conv=self.use_torch_conv)
