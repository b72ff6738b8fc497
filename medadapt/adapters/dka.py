"""Dual-Kernel Adapter (DKA).

f(x) = x + Up(act(DWConv_large(Down x) + DWConv_small(Down x))): a 51x51 depthwise branch keeps
the effective receptive field large when training data is scarce and a 5x5 branch keeps local
detail. Both convolutions see the same input and are linear in their kernels, so they run as
one convolution with the kernels summed (gradients reach both) and one shared transform of
the input; :meth:`DualKernelAdapter.fold_kernels` makes that permanent for inference.

Placement follows the reference code: one adapter on the output of each transformer block
(``placement="block"``) and, on CNNs, one on the output of each residual stage
(``placement="stage"``: ResNet's layer1-4, ConvNeXt's stages, EfficientNet's groups of
MBConv blocks of one width). ``placement="parallel"`` puts two beside attention and MLP, as
LKA does.
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
from medadapt.ops.dwconv import fold_kernels


class DualKernelAdapter(BottleneckAdapter):
    """Bottleneck adapter with parallel large and small depthwise kernels.

    Arguments:
      dim, layout, bottleneck, activation, dropout: see :class:`BottleneckAdapter`.
      large_kernel: large kernel size (int, or a tuple per axis). In 3D an int k is the paper's
        in-plane kernel, (1, k, k).
      small_kernel: small kernel size, same rules, except that in 3D an int k becomes
        (3, k, k): through-slice context from the small branch is medadapt's extension (3 x 5 x 5
        costs 50 more weights a channel than the paper's 5 x 5; pass [1, 5, 5] for the paper's).
      use_torch_conv: run the two branches as plain torch convolutions (reference path).
    """

    def __init__(
        self,
        dim: int,
        layout: TokenLayout,
        bottleneck: int = 16,
        large_kernel: int | tuple = 51,
        small_kernel: int | tuple = 5,
        activation: str = "gelu",
        dropout: float = 0.1,
        zero_init: bool = True,
        use_torch_conv: bool = False,
    ):
        # The reference projections carry no bias; the activation follows the summed convs.
        super().__init__(dim, layout, bottleneck, activation, dropout, bias=False,
                         zero_init=zero_init, activate_before_mix=False)
        sd = layout.spatial_dims
        self.large = depthwise_weight(bottleneck, as_kernel(large_kernel, sd, depth=1))
        self.small = depthwise_weight(bottleneck, as_kernel(small_kernel, sd))
        self.use_torch_conv = use_torch_conv
        self.folded = False

    def kernels(self) -> list[torch.Tensor]:
        return [self.large] if self.folded else [self.large, self.small]

    def _conv(self, m: torch.Tensor) -> torch.Tensor:
        if self.use_torch_conv:
            return sum(_torch_dwconv(m, k) for k in self.kernels())
        return dwconv(m, fold_kernels(self.kernels()))

    def mix(self, h: torch.Tensor) -> torch.Tensor:
        return self.layout.map_spatial(h, self._conv)

    def merged(self) -> DualKernelAdapter:
        """Itself with the small kernel folded into the large one (exact)."""
        self.fold_kernels()
        return self

    @torch.no_grad()
    def fold_kernels(self) -> None:
        """Fold the small kernel into the large one (exact; for inference and export)."""
        if self.folded:
            return
        self.large = nn.Parameter(fold_kernels([self.large, self.small]), requires_grad=self.large.requires_grad)
        del self.small
        self.register_parameter("small", None)
        self.folded = True


def _torch_dwconv(m: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    conv = torch.nn.functional.conv2d if m.ndim == 4 else torch.nn.functional.conv3d
    return conv(m, weight, padding="same", groups=m.shape[1])


@dataclass
class DKAConfig(BlockAdapterConfig):
    """Dual-Kernel Adapter options (paper defaults on ViT-B: bottleneck 16 for classification,
    192 for segmentation; kernels 51 and 5; GELU; dropout 0.1; one adapter after each
    transformer block, or after each residual stage of a CNN).

    Arguments:
      bottleneck: the width of every adapter; None (default) takes ``bottleneck_ratio`` of each
        block's width (see `AdapterConfig.bottleneck_for`): 16/768 for classification and
        192/768 for segmentation, the paper's 16 and 192 on ViT-B, and a bottleneck that stays
        narrower than the block on narrow backbones (LiteMedSAM: 8 and 32-80).
      large_kernel, small_kernel, activation, dropout, use_torch_conv: see
        :class:`DualKernelAdapter`.
    """

    summary: ClassVar[str] = "Dual-Kernel Adapter: parallel 51x51 and 5x5 depthwise convs in a bottleneck"
    has_spatial_part: ClassVar[bool] = True
    size_option: ClassVar[str | None] = "bottleneck"
    default_placement: ClassVar[str] = "block"
    default_cnn_placement: ClassVar[str] = "stage"
    # DKA poster, Table 3: a wider bottleneck for dense prediction.
    dense_options: ClassVar[dict] = {"bottleneck_ratio": 192 / VIT_B_WIDTH}

    bottleneck: int | None = None
    bottleneck_ratio: float = 16 / VIT_B_WIDTH
    large_kernel: int | list[int] = 51
    small_kernel: int | list[int] = 5
    activation: str = "gelu"
    dropout: float = 0.1
    use_torch_conv: bool = False

    def build(self, dim: int, layout: TokenLayout) -> nn.Module:
        return DualKernelAdapter(dim, layout, self.bottleneck_for(dim), self.large_kernel, self.small_kernel,
                                 self.activation, self.dropout, use_torch_conv=self.use_torch_conv)
