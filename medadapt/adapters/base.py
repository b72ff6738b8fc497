"""What every adapter method shares: the token layout, the config base classes and small layers.

An adapter never knows which backbone it sits in. The injector tells it how the tensor it
receives is laid out (a :class:`TokenLayout`), and the adapter uses that to reach the spatial
grid when it has a convolution, so one class serves SAM's channels-last grids, timm's token
sequences with prefix tokens, windowed attention and CNN maps, in 2D and 3D.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import numbers
import re
import types
import typing
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

logger = logging.getLogger(__name__)

from medadapt.ops.dwconv import capturing_graph
from medadapt.patterns import check_pattern

if TYPE_CHECKING:
    from medadapt.families import Family, Site

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
        # and its batch bookkeeping breaks on the reshapes below. (Not while a graph is
        # recorded: torch.export cannot record as_subclass, and its inputs are no MetaTensors.)
        m = grid.permute(0, 3, 1, 2)
        if type(m) is not torch.Tensor and not capturing_graph():
            m = m.as_subclass(torch.Tensor)
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


# ----------------------------------------------------------------------------- adapter modules

class AdapterModule(nn.Module):
    """A module medadapt puts into a backbone (a wrapper around one of its sub-layers).

    It carries its own lifecycle: ``enabled`` switches its update off (the wrapped sub-layer
    then computes exactly what it did before injection), :meth:`adapter_parameters` lists the
    parameters it added, and :meth:`merged` gives the module to put in its place with the
    update folded into weights, where the math makes that exact.
    """

    def __init__(self):
        super().__init__()
        self.enabled = True

    def adapter_parameters(self) -> list[nn.Parameter]:  # pragma: no cover - abstract
        raise NotImplementedError

    def merged(self) -> nn.Module:
        """The module to put in this one's place, its update folded into the weights (exact)."""
        raise ValueError(f"{type(self).__name__} is non-linear and cannot be merged into the backbone")


def adapter_modules(root: nn.Module) -> list[tuple[str, AdapterModule]]:
    """(name, module) of every adapter module in ``root``, outermost first."""
    return [(name, m) for name, m in root.named_modules() if isinstance(m, AdapterModule)]


def replace_module(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def select_blocks(blocks: list[tuple[str, nn.Module]], targets) -> list[tuple[int, str, nn.Module]]:
    """The (index, name, module) of the ``blocks`` that ``targets`` selects (see AdapterConfig)."""
    indexed = [(i, name, block) for i, (name, block) in enumerate(blocks)]
    if targets is None:
        chosen = indexed
    elif isinstance(targets, str):
        pattern = re.compile(targets)
        chosen = [t for t in indexed if pattern.search(t[1])]
    else:
        n = len(blocks)
        bad = [t for t in targets if not -n <= int(t) < n]
        if bad:
            raise ValueError(f"target block indices {bad} are out of range for {n} blocks")
        wanted = sorted({int(t) % n for t in targets})
        chosen = [indexed[i] for i in wanted]
    if not chosen:
        names = [name for name, _ in blocks][:6]
        raise ValueError(f"targets={targets!r} select no block (blocks are named like {names})")
    return chosen


# ----------------------------------------------------------------------------- configs

PLACEMENTS = ("parallel", "sequential", "block", "stage")
# The narrowest bottleneck a width ratio gives: the DKA paper's d^ = 8 keeps 97 % of the accuracy
# of d^ = 16 at 0.63 % of BUSI (its Table 3), while d^ = 4 loses 6 %.
MIN_BOTTLENECK = 8
# The width the papers' bottlenecks were chosen for: ViT-B's 768 channels.
VIT_B_WIDTH = 768
# What a training stage can train: the method's own parameters, the task head (everything
# outside the encoder) and the encoder's pretrained weights.
TRAINABLE_PARTS = ("adapter", "head", "encoder")


@dataclass
class AdapterConfig:
    """Options every method shares, and what the method does over its lifecycle.

    A config builds and injects its method's modules (:meth:`inject`), names its trainable
    parameters (:meth:`adapter_parameters`), folds them into the weights where that is exact
    (:meth:`merge`), and declares its size option and its training stages.

    Arguments:
      targets: which blocks get adapters: None for all, a list of block indices (negative
        counts from the end), or a regular expression matched against block names.
      spatial_dims: 2, or 3 for slice-stack volumes (the encoder sees ``num_slices`` slices per
        volume and the spatial parts of the adapters mix across them).
      num_slices: slices per volume when ``spatial_dims=3``.
    """

    summary: ClassVar[str] = ""
    # True when the method's update starts at zero, so injection leaves outputs unchanged.
    identity_at_init: ClassVar[bool] = True
    # True when the method has a spatial part that the 3D variant extends across slices.
    has_spatial_part: ClassVar[bool] = False
    # The option that sets the method's size (bottleneck, rank, num_tokens), the one a
    # parameter budget searches over; None when the method has no size.
    size_option: ClassVar[str | None] = None
    # Training stages: 1, or 2 for staged fine-tuning (see stage_trains).
    num_stages: ClassVar[int] = 1
    # Options for dense prediction (segmentation), where the papers size the method apart from
    # classification; what the caller gives wins.
    dense_options: ClassVar[dict] = {}
    # True when training changes the backbone's own weights (BitFit's biases, full
    # fine-tuning): there is no separate update to switch off.
    changes_base_weights: ClassVar[bool] = False

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
        if isinstance(self.targets, str):
            check_pattern("targets", self.targets)

    @classmethod
    def from_options(cls, options: dict, method: str | None = None) -> AdapterConfig:
        """The config from keyword options, each checked against its field's type first: an
        unknown name or a value of the wrong type is a ValueError naming the option and what it
        takes (a request, a JSON file or a command line can send any value)."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - set(fields))
        method = f"method {method!r}" if method else cls.__name__
        if unknown:
            raise ValueError(f"{method} has no option(s) {unknown}; its options are {list(fields)}")
        hints = typing.get_type_hints(cls)
        for name, value in options.items():
            if not _conforms(value, hints[name]):
                raise ValueError(f"{method} option {name!r} takes {_type_text(hints[name])}, got {value!r}")
        return cls(**options)

    def options(self) -> dict:
        """The options as JSON-ready values (what ``save_adapters`` records)."""
        return dataclasses.asdict(self)

    # -- size

    def bottleneck_for(self, dim: int) -> int:
        """The bottleneck of an adapter on ``dim`` channels: the ``bottleneck`` option when it is
        given, else ``bottleneck_ratio`` of ``dim`` (the papers' bottleneck over ViT-B's 768, so
        ViT-B gets exactly the papers' width), at least `MIN_BOTTLENECK`; never wider than ``dim``,
        so that a bottleneck never expands a narrow block."""
        given = getattr(self, "bottleneck", None)
        width = given if given is not None else max(MIN_BOTTLENECK, round(self.bottleneck_ratio * dim))
        if width > dim:
            if given is not None:
                logger.warning("%s: bottleneck %d is wider than a block of %d channels; using %d there",
                               type(self).__name__, given, dim, dim)
            width = dim
        return int(width)

    # -- stages

    def check_stage(self, stage: int) -> None:
        if stage not in range(1, self.num_stages + 1):
            stages = "1" if self.num_stages == 1 else f"1 to {self.num_stages}"
            raise ValueError(f"this method has {self.num_stages} training stage(s): stage must be {stages}, got {stage!r}")

    def stage_trains(self, stage: int) -> frozenset[str]:
        """What trains at ``stage``: a subset of ``TRAINABLE_PARTS``."""
        self.check_stage(stage)
        return frozenset({"adapter", "head"})

    def encoder_output_fixed(self, stage: int) -> bool:
        """True when training at ``stage`` cannot change what the encoder outputs (before any
        module the method puts after it), so the encoder's features can be computed once."""
        self.check_stage(stage)
        return False

    # -- lifecycle

    @classmethod
    def supports(cls, family: Family) -> bool:
        """Whether the method fits encoders of ``family`` at all."""
        return True

    def inject(self, encoder: nn.Module, family: Family) -> list[str]:
        """Put the method's modules into ``encoder``; returns the names of what it changed."""
        raise NotImplementedError  # pragma: no cover - abstract

    def adapter_parameters(self, encoder: nn.Module) -> list[nn.Parameter]:
        """The parameters the method trains inside ``encoder`` (its adapters)."""
        params = {id(p): p for _, m in adapter_modules(encoder) for p in m.adapter_parameters()}
        return list(params.values())

    def merge(self, encoder: nn.Module) -> None:
        """Fold the method's updates into the encoder's weights; ValueError where not exact."""
        for name, module in adapter_modules(encoder)[::-1]:
            # Innermost first, so an outer module's name stays valid when an inner one is replaced.
            replace_module(encoder, name, module.merged())


@dataclass
class BlockAdapterConfig(AdapterConfig):
    """Options of methods that add a module inside the backbone's blocks.

    Arguments:
      placement: "parallel" (beside attention and beside the MLP, fed the input they
        normalise), "sequential" (on the output of attention and of the MLP, inside their
        residuals, as Houlsby placed adapters), "block" (on the output of each whole block)
        or "stage" (on the output of each stage: a CNN's residual stages, a hierarchical
        transformer's stages; every block of a plain ViT). None takes the method's default.
        CNN blocks have no attention/MLP split: there "parallel" puts the adapter beside each
        block that keeps its shape and any other placement after it (or after each stage).
      scale: factor on the adapter's update.
    """

    default_placement: ClassVar[str] = "parallel"
    # The default on CNNs, whose blocks have no attention/MLP split.
    default_cnn_placement: ClassVar[str] = "block"

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

    def resolved_placement(self, family: Family) -> str:
        if self.placement is not None:
            return self.placement
        return self.default_cnn_placement if family.cnn else self.default_placement

    def _family_plan(self, placement: str, family: Family) -> list[tuple[str, str, float]]:
        if not family.cnn:
            return self.plan(placement)
        # CNN blocks have no attention/MLP split: the update goes on the whole block (an
        # embedding-filter "input" step of the method's plan stays).
        mode = "parallel" if placement == "parallel" else "sequential"
        return [("block", mode, self.scale)] + [s for s in self.plan(placement) if s[0] == "input"]

    def inject(self, encoder: nn.Module, family: Family) -> list[str]:
        # Recorded as built, so a saved folder does not depend on a default that may change.
        placement = self.placement = self.resolved_placement(family)
        plan = self._family_plan(placement, family)
        units = family.stage_ends(encoder) if placement == "stage" else family.blocks(encoder)
        chosen = select_blocks(units, self.targets)
        wrapped: list[str] = []
        # Sub-layers first, then whole-block wrappers, so the recorded names stay valid.
        ordered = sorted(plan, key=lambda step: step[0] in ("block", "input"))
        for position, (_, block_name, block) in enumerate(chosen):
            for site_name, mode, scale in ordered:
                if site_name == "input" and position > 0:
                    continue
                site = family.site(encoder, block_name, block, site_name)
                if site is None:
                    raise ValueError(f"the {family.name} block {block_name} has no {site_name!r} sub-layer")
                base = encoder.get_submodule(site.name)
                if mode == "parallel" and site_name == "block" and not family.block_keeps_shape(base):
                    raise ValueError(
                        f"placement='parallel' needs blocks that keep their shape, but {family.name} "
                        f"block {block_name} changes it; use placement='block'"
                    )
                adapter = self.build(site.dim, site_layout(site, self))
                wrapper = self._wrap(encoder, site, base, adapter, "pre" if site_name == "input" else mode, scale)
                replace_module(encoder, site.name, wrapper)
                wrapped.append(site.name)
        return wrapped

    @staticmethod
    def _wrap(encoder: nn.Module, site: Site, base: nn.Module, adapter: nn.Module, mode: str,
              scale: float) -> nn.Module:
        from medadapt.adapters.wrappers import Adapted

        if mode != "parallel":
            return Adapted(base, adapter, mode, scale)
        layer_scale = encoder.get_submodule(site.layer_scale) if site.layer_scale else None
        if isinstance(layer_scale, nn.Identity):
            layer_scale = None
        if layer_scale is not None:
            # The block scales the sub-layer's output (LayerScale); the adapter beside it adds
            # its own update unscaled, so the scale moves into the wrapper, onto base alone.
            replace_module(encoder, site.layer_scale, nn.Identity())
        return Adapted(base, adapter, mode, scale, input_norm=site.input_norm, layer_scale=layer_scale)


def site_layout(site: Site, config: AdapterConfig) -> TokenLayout:
    """The TokenLayout of what ``site`` receives, for the config's 2D or 3D variant."""
    return TokenLayout(spatial_dims=config.spatial_dims, num_slices=config.num_slices or 1, **site.layout)



# ----------------------------------------------------------------------------- option types

def _conforms(value: Any, hint: Any) -> bool:
    """Whether ``value`` fits the type annotation ``hint`` (the types configs use: numbers,
    strings, booleans, None, lists and fixed-length tuples of them, unions)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_conforms(value, h) for h in args)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            return False
        if origin is tuple and Ellipsis not in args:  # tuple[int, int]: that many items
            return len(value) == len(args) and all(map(_conforms, value, args))
        return all(_conforms(v, args[0]) for v in value)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, numbers.Real) and not isinstance(value, bool)
    return isinstance(value, origin or hint)


def _type_text(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_text(h) for h in typing.get_args(hint))
    if hint is type(None):
        return "null"
    names = {bool: "true or false", int: "a whole number", float: "a number", str: "a string", dict: "an object"}
    if hint in names:
        return names[hint]
    if origin in (list, tuple, Sequence):
        args = typing.get_args(hint)
        return f"a list of ({_type_text(args[0])})" if args else "a list"
    return str(hint)


__all__ = [
    "AdapterConfig",
    "AdapterModule",
    "BlockAdapterConfig",
    "BottleneckAdapter",
    "PLACEMENTS",
    "TRAINABLE_PARTS",
    "TokenLayout",
    "adapter_modules",
    "as_kernel",
    "depthwise_weight",
    "make_activation",
    "replace_module",
    "select_blocks",
    "site_layout",
]
