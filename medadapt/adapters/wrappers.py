"""Modules that wrap a backbone's sub-layer with an adapter.

Wrapping (rather than patching ``forward``) keeps deepcopy, DDP, ``state_dict`` and scripting
working, and it is undone by putting ``base`` back (and a moved ``layer_scale`` with it).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from medadapt.adapters.base import AdapterModule

MODES = ("parallel", "sequential", "pre", "replace")


class Adapted(AdapterModule):
    """``base`` with an adapter beside, after, before or instead of its output.

    Arguments:
      base: the wrapped sub-layer (attention, MLP, block, or the encoder's output module).
      adapter: a module returning an update of its input's shape ("replace": the new output).
      mode: "parallel": base(x) + s * adapter(x); "sequential": y + s * adapter(y) with
        y = base(x); "pre": base(x + s * adapter(x)); "replace": adapter(base(x)).
      scale: the factor s.
      input_norm: for "parallel": the name of the norm inside ``base`` that ``base`` applies
        to its input first (TinyViT's attention and MLP normalise internally); the adapter
        then sees that norm's output, the same normalised input as the sub-layer.
      layer_scale: for "parallel": the block's LayerScale of this sub-layer, taken out of the
        block and applied here to ``base``'s output only: layer_scale(base(x)) + s * adapter(x).
    """

    def __init__(self, base: nn.Module, adapter: nn.Module, mode: str, scale: float = 1.0,
                 input_norm: str | None = None, layer_scale: nn.Module | None = None):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if (input_norm or layer_scale is not None) and mode != "parallel":
            raise ValueError("input_norm and layer_scale apply to parallel adapters only")
        self.base = base
        self.adapter = adapter
        self.mode = mode
        self.scale = scale
        self.input_norm = input_norm
        self.layer_scale = layer_scale

    def _base(self, x: torch.Tensor, *args, **kwargs):
        out = self.base(x, *args, **kwargs)
        return out if self.layer_scale is None else self.layer_scale(out)

    def forward(self, x: torch.Tensor, *args, **kwargs):
        if not self.enabled:
            return self._base(x, *args, **kwargs)
        if self.mode == "pre":
            return self.base(x + self.scale * self.adapter(x), *args, **kwargs)
        out = self._base(x, *args, **kwargs)
        if self.mode == "parallel":
            seen = self.base.get_submodule(self.input_norm)(x) if self.input_norm else x
            return out + self.scale * self.adapter(seen)
        if self.mode == "sequential":
            return out + self.scale * self.adapter(out)
        return self.adapter(out)

    def adapter_parameters(self) -> list[nn.Parameter]:
        return list(self.adapter.parameters())

    def merged(self) -> nn.Module:
        """Itself, with the adapter's linear parts folded (DKA's kernels); ValueError for
        adapters with nothing exact to fold."""
        fold = getattr(self.adapter, "merged", None)
        if fold is None:
            raise ValueError(f"{type(self.adapter).__name__} is non-linear and cannot be merged into the backbone")
        self.adapter = fold()
        return self

    def extra_repr(self) -> str:
        extra = f", input_norm={self.input_norm!r}" if self.input_norm else ""
        return f"mode={self.mode}, scale={self.scale}{extra}"


class _FrozenBatchNormMixin:
    """BatchNorm that stays in eval mode: a frozen backbone must not drift its running stats
    (and small medical batches would give poor ones) when the task model trains."""

    def train(self, mode: bool = True):
        return super().train(False)


class FrozenBatchNorm1d(_FrozenBatchNormMixin, nn.BatchNorm1d):
    pass


class FrozenBatchNorm2d(_FrozenBatchNormMixin, nn.BatchNorm2d):
    pass


class FrozenBatchNorm3d(_FrozenBatchNormMixin, nn.BatchNorm3d):
    pass


_FROZEN = {nn.BatchNorm1d: FrozenBatchNorm1d, nn.BatchNorm2d: FrozenBatchNorm2d, nn.BatchNorm3d: FrozenBatchNorm3d}


def frozen_batchnorm(bn: nn.Module) -> nn.Module:
    """A frozen copy of ``bn`` with the same parameters, buffers and state-dict keys."""
    frozen_cls = _FROZEN[type(bn)]
    new = frozen_cls(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats)
    reference = next(iter(bn.state_dict().values()), None)
    if reference is not None:
        new = new.to(device=reference.device)
    new.load_state_dict(bn.state_dict())
    for p_new, p_old in zip(new.parameters(), bn.parameters()):
        p_new.requires_grad_(p_old.requires_grad)
    new.eval()
    return new
