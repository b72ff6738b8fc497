"""What every adapter method shares: the token layout, the config base classes and small layers.

An adapter never knows which backbone it sits in. The injector tells it how the tensor it
receives is laid out (a :class:`TokenLayout`), and the adapter uses that to reach the spatial
grid when it has a convolution, so one class serves SAM's channels-last grids, timm's token
sequences with prefix tokens, windowed attention and CNN maps, in 2D and 3D.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable, ClassVar, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

LAYOUT_KINDS = ("channels_last", "sequence", "channels_first")


@dataclass(frozen=True)
class TokenLayout:
    """How a sub-layer's input tensor maps onto an image grid.

    Arguments:
      kind: "channels_last" for (N, h, w, C) grids (SAM, Swin blocks), "sequence" for
        (N, L, C) token sequences (timm ViT, Swin/TinyViT windows), "channels_first" for
        (N, C, h, w) CNN maps.
      grid: (h, w) of one image's grid. For plain sequences a hint, re-derived from L when
        the input size changes (the aspect ratio is kept); required with ``window``.
      num_prefix: tokens before the grid (class / register tokens); they skip the spatial part.
      window: (wh, ww) when the tensor holds attention windows rather than whole images
        (windowed attention partitions the grid, padded at the bottom and right, into
        ``N * windows`` items in row-major order). The spatial part then runs on the whole
        reassembled grid, so a large kernel reaches across windows as it would without them.
      shift: the cyclic shift (sh, sw) the block rolled the grid by before partitioning
        (Swin's shifted windows); it is undone for the spatial part and redone after.
      spatial_dims: 2, or 3 when the batch holds stacks of ``num_slices`` slices per volume
        (volume-major order, as the slice-stack encoder lays them out).
      num_slices: slices per volume for ``spatial_dims=3``.
    """

    kind: str
    grid: tuple[int, int] | None = None
    num_prefix: int = 0
    window: tuple[int, int] | None = None
    shift: tuple[int, int] = (0, 0)
    spatial_dims: int = 2
    num_slices: int = 1

    def __post_init__(self):
        if self.kind not in LAYOUT_KINDS:
            raise ValueError(f"layout kind must be one of {LAYOUT_KINDS}, got {self.kind!r}")
        if self.spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {self.spatial_dims!r}")
        if self.window is not None and (self.grid is None or self.kind == "channels_first" or self.num_prefix):
            raise ValueError("a windowed layout needs the whole grid, channels-last or sequence "
                             "tokens and no prefix tokens")

    def to_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Channels-last view of ``x`` so linear projections act on the last axis."""
        return x.movedim(1, -1) if self.kind == "channels_first" else x

    def from_tokens(self, t: torch.Tensor) -> torch.Tensor:
        return t.movedim(-1, 1) if self.kind == "channels_first" else t

    def resolve_grid(self, length: int) -> tuple[int, int]:
        """The (h, w) grid holding ``length`` tokens."""
        if self.grid is not None and self.grid[0] * self.grid[1] == length:
            return tuple(self.grid)
        ratio = self.grid[0] / self.grid[1] if self.grid is not None else 1.0
        h = max(1, round(math.sqrt(length * ratio)))
        if length % h == 0:
            return h, length // h
        raise ValueError(
            f"cannot arrange {length} tokens into a 2D grid (expected {self.grid} with "
            f"{self.num_prefix} prefix tokens); is the layout of this backbone supported?"
        )

    def _window_counts(self) -> tuple[int, int]:
        return tuple(math.ceil(g / w) for g, w in zip(self.grid, self.window))

    def _merge_windows(self, t: torch.Tensor) -> torch.Tensor:
        """(N * windows, wh, ww, C) or (N * windows, wh * ww, C) -> (N, h, w, C), unshifted."""
        (wh, ww), (nh, nw), (h, w) = self.window, self._window_counts(), self.grid
        c = t.shape[-1]
        if t.shape[0] % (nh * nw) or t[0].numel() != wh * ww * c:
            raise ValueError(
                f"expected attention windows of {wh}x{ww} tokens, {nh * nw} per image of a {h}x{w} "
                f"grid, got a tensor of shape {tuple(t.shape)}; was the backbone resized after injection?"
            )
        n = t.shape[0] // (nh * nw)
        grid = t.reshape(n, nh, nw, wh, ww, c).transpose(2, 3).reshape(n, nh * wh, nw * ww, c)[:, :h, :w]
        return torch.roll(grid, self.shift, dims=(1, 2)) if any(self.shift) else grid

    def _split_windows(self, grid: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """The inverse of :meth:`_merge_windows`; padded positions are zero."""
        (wh, ww), (nh, nw) = self.window, self._window_counts()
        n, h, w, c = grid.shape
        if any(self.shift):
            grid = torch.roll(grid, tuple(-s for s in self.shift), dims=(1, 2))
        grid = F.pad(grid, (0, 0, 0, nw * ww - w, 0, nh * wh - h))
        return grid.reshape(n, nh, wh, nw, ww, c).transpose(2, 3).reshape(like.shape)

    def map_spatial(self, t: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """Apply ``fn`` to the spatial map under channels-last tokens ``t``.

        ``fn`` receives (B, C, h, w) for 2D or (B, C, D, h, w) for 3D, always whole images
        (attention windows are reassembled first), and must keep the shape; prefix tokens
        are passed through untouched.
        """
        prefix = None
        if self.window is not None:
            grid = self._merge_windows(t)
        elif self.kind == "sequence":
            n, length, c = t.shape
            if self.num_prefix:
                prefix, t = t[:, : self.num_prefix], t[:, self.num_prefix :]
            h, w = self.resolve_grid(length - self.num_prefix)
            grid = t.reshape(n, h, w, c)
        else:
            grid = t
        n, h, w, c = grid.shape
        # Plain tensors inside: MONAI's MetaTensor metadata describes images, not these grids,
        # and its batch bookkeeping breaks on the reshapes below.
        m = grid.permute(0, 3, 1, 2).as_subclass(torch.Tensor)
        if self.spatial_dims == 3:
            if n % self.num_slices:
                raise ValueError(
                    f"a 3D adapter got a batch of {n} slices, not a multiple of num_slices={self.num_slices}"
                )
            b = n // self.num_slices
            m = fn(m.reshape(b, self.num_slices, c, h, w).transpose(1, 2))
            m = m.transpose(1, 2).reshape(n, c, h, w)
        else:
            m = fn(m)
        out = m.permute(0, 2, 3, 1)
        if self.window is not None:
            return self._split_windows(out, like=t)
        if self.kind == "sequence":
            out = out.reshape(n, h * w, c)
            if prefix is not None:
                out = torch.cat([prefix, out], dim=1)
        return out


def as_kernel(size: int | Sequence[int], spatial_dims: int, depth: int = 3) -> tuple[int, ...]:
    """Kernel size tuple; a single int in 3D becomes an anisotropic (depth, k, k) stack kernel."""
    if isinstance(size, int):
        return (size, size) if spatial_dims == 2 else (min(depth, size), size, size)
    size = tuple(int(s) for s in size)
    if len(size) != spatial_dims:
        raise ValueError(f"kernel size {size} does not have {spatial_dims} dimensions")
    return size


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x), the activation Convpass and CLIP use."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


_ACTIVATIONS = {
    "gelu": nn.GELU,
    "relu": nn.ReLU,
    "silu": nn.SiLU,
    "quickgelu": QuickGELU,
    "identity": nn.Identity,
}


def make_activation(name: str) -> nn.Module:
    if name not in _ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; choose one of {sorted(_ACTIVATIONS)}")
    return _ACTIVATIONS[name]()


def depthwise_weight(channels: int, kernel: tuple[int, ...]) -> nn.Parameter:
    """A depthwise kernel (C, 1, *kernel) initialised like nn.Conv's default."""
    weight = torch.empty(channels, 1, *kernel)
    nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
    return nn.Parameter(weight)


class BottleneckAdapter(nn.Module):
    """Down-projection -> [spatial mixing] -> activation -> dropout -> up-projection.

    The module returns only the update; where it is added (beside a sub-layer, after it, or
    after the whole block) is the injector's business. The up-projection starts at zero so an
    injected model computes exactly what the pretrained one did until training moves it.
    Subclasses override :meth:`mix` for their spatial part.

    Arguments:
      dim: channels of the tokens the adapter sees.
      layout: how those tokens map onto a grid.
      bottleneck: width of the bottleneck.
      activation: name of the activation (gelu, relu, silu, quickgelu, identity).
      dropout: dropout before the up-projection.
      bias: whether the projections carry a bias.
      zero_init: start the up-projection at zero.
      activate_before_mix: apply the activation after the down-projection (Houlsby, LKA,
        Convpass) instead of after the spatial mixing (DKA's equation).
    """

    def __init__(
        self,
        dim: int,
        layout: TokenLayout,
        bottleneck: int = 16,
        activation: str = "gelu",
        dropout: float = 0.0,
        bias: bool = True,
        zero_init: bool = True,
        activate_before_mix: bool = True,
    ):
        super().__init__()
        if bottleneck < 1:
            raise ValueError(f"bottleneck must be >= 1, got {bottleneck}")
        self.layout = layout
        self.activate_before_mix = activate_before_mix
        self.down = nn.Linear(dim, bottleneck, bias=bias)
        self.act = make_activation(activation)
        self.dropout = nn.Dropout(dropout)
        self.up = nn.Linear(bottleneck, dim, bias=bias)
        if zero_init:
            nn.init.zeros_(self.up.weight)
            if self.up.bias is not None:
                nn.init.zeros_(self.up.bias)

    def mix(self, h: torch.Tensor) -> torch.Tensor:
        """Spatial mixing on the bottleneck tokens; the plain adapter has none."""
        return h

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.down(self.layout.to_tokens(x))
        if self.activate_before_mix:
            h = self.mix(self.act(h))
        else:
            h = self.act(self.mix(h))
        return self.layout.from_tokens(self.up(self.dropout(h)))


# ----------------------------------------------------------------------------- configs

PLACEMENTS = ("parallel", "sequential", "block")


@dataclass
class AdapterConfig:
    """Options every method shares.

    Arguments:
      targets: which blocks get adapters: None for all, a list of block indices (negative
        counts from the end), or a regular expression matched against block names.
      spatial_dims: 2, or 3 for slice-stack volumes (the encoder sees ``num_slices`` slices per
        volume and the spatial parts of the adapters mix across them).
      num_slices: slices per volume when ``spatial_dims=3``.
    """

    # what the method touches: "block" (modules inside blocks), "linear" (wraps nn.Linear),
    # "bias", "prompt", "output" (after the encoder), "head" (nothing), "full" (everything).
    kind: ClassVar[str] = "block"
    summary: ClassVar[str] = ""
    # True when the method's update starts at zero, so injection leaves outputs unchanged.
    identity_at_init: ClassVar[bool] = True
    # True when the method has a spatial part that the 3D variant extends across slices.
    has_spatial_part: ClassVar[bool] = False

    targets: list[int] | str | None = None
    spatial_dims: int = 2
    num_slices: int | None = None

    def __post_init__(self):
        if self.spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {self.spatial_dims!r}")
        if self.spatial_dims == 3:
            if not self.num_slices or int(self.num_slices) < 1:
                raise ValueError("spatial_dims=3 needs num_slices (slices per volume in a batch)")
        if isinstance(self.targets, tuple):
            self.targets = list(self.targets)

    def options(self) -> dict:
        """The options as JSON-ready values (what ``save_adapters`` records)."""
        return dataclasses.asdict(self)


@dataclass
class BlockAdapterConfig(AdapterConfig):
    """Options of methods that add a module inside the backbone's blocks.

    Arguments:
      placement: "parallel" (beside attention and beside the MLP, fed the same normalised
        input), "sequential" (on the output of attention and of the MLP, inside their
        residuals, as Houlsby placed adapters), or "block" (on the output of the whole block).
        None takes the method's default; CNN blocks, which have no attention/MLP split, use
        "block" unless "parallel" is asked for and the block keeps its shape.
      scale: factor on the adapter's update.
    """

    kind: ClassVar[str] = "block"
    default_placement: ClassVar[str] = "parallel"

    placement: str | None = None
    scale: float = 1.0

    def __post_init__(self):
        super().__post_init__()
        if self.placement is not None and self.placement not in self.placements():
            raise ValueError(
                f"placement must be one of {self.placements()}, got {self.placement!r}"
            )

    @classmethod
    def placements(cls) -> tuple[str, ...]:
        return PLACEMENTS

    def plan(self, placement: str) -> list[tuple[str, str, float]]:
        """(site, mode, scale) triples: which sub-layer to wrap and how."""
        if placement == "parallel":
            return [("attn", "parallel", self.scale), ("mlp", "parallel", self.scale)]
        if placement == "sequential":
            return [("attn", "sequential", self.scale), ("mlp", "sequential", self.scale)]
        return [("block", "sequential", self.scale)]

    def build(self, dim: int, layout: TokenLayout) -> nn.Module:  # pragma: no cover - abstract
        raise NotImplementedError


__all__ = [
    "AdapterConfig",
    "BlockAdapterConfig",
    "BottleneckAdapter",
    "TokenLayout",
    "as_kernel",
    "depthwise_weight",
    "make_activation",
]
