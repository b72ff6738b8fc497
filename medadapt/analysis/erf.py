"""Effective receptive field (ERF): how far an adapted backbone looks, measured on real images.

RepLKNet's recipe, which the DKA and LKA papers follow: for each image, the gradient of the
central unit of the backbone's last feature map (ReLU'd and summed over channels) with
respect to the input pixels, ReLU'd and summed over the input channels, averaged over the
images. As in RepLKNet, the gradient is taken with respect to the normalised image the
encoder sees: the backbone's normalisation passes it straight through, with each image's
own statistics (MedSAM's per-image min and max) held constant (and back through an input
stem and resize to the image's pixels). Otherwise every pixel's gradient would also reach
the image's darkest and brightest pixels through the minimum and maximum, giving those two
pixels a spurious share of the contribution. The map is shown on a log scale (``normalise_erf``) and summarised by the
"high-contribution area ratio": the share of the image covered by the smallest central
square that holds a given share of the total contribution.

Example::

    erf = effective_receptive_field(model, images)          # raw (H, W) map
    ratios = high_contribution_area_ratio(np.log10(erf + 1))  # RepLKNet's numbers
    path, ratios = compare_erf({"dka": dka_model, "adapter": adapter_model}, images, "erf.png")

Models built by ``medadapt.create_model`` from the same pretrained backbone differ only in
their adapters, so their ERFs compare the adapters. Freshly injected adapters whose
up-projection starts at zero leave the ERF equal to the backbone's.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np
import torch
import torch.nn as nn

from medadapt.backbones import Backbone
from medadapt.backbones.base import normalised_input_gradients
from medadapt.io import atomic_path
from medadapt.models.classifier import backbone_input, fit_to_backbone
from medadapt.models.volume import VolumeSegmenter

__all__ = [
    "DEFAULT_THRESHOLDS",
    "RATIO_SCALES",
    "VolumeERF",
    "compare_erf",
    "effective_receptive_field",
    "feature_map",
    "feature_maps",
    "format_ratios",
    "high_contribution_area_ratio",
    "measure_erfs",
    "normalise_erf",
    "plot_erfs",
    "scaled_for_ratio",
    "volume_effective_receptive_field",
]

DEFAULT_THRESHOLDS = (0.2, 0.3, 0.5, 0.99)
# "log": the ratios RepLKNet reports (computed on log10(erf + 1)); "raw": on the gradients.
RATIO_SCALES = ("log", "raw")
# Thresholds shown in figure titles, as the papers' ERF figures annotate them.
TITLE_THRESHOLDS = (0.2, 0.5, 0.99)


# ----------------------------------------------------------------------------- features

def feature_maps(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """The backbone's feature maps for input ``x``, reached through the model's own input path.

    Arguments:
      model: a task model with ``.backbone`` (Classifier, Segmenter, BoxPromptSegmenter: NCHW
        maps; VolumeSegmenter: (B, C, S, h, w) maps with the slices on axis 2), a Backbone
        (fed [0, 1] images: resized and preprocessed as task models do), or any module whose
        output is one NCHW map (returned as the only map).
      x: the model's input, (B, C, H, W) or (B, C, X, Y, Z) for a VolumeSegmenter.
    """
    if isinstance(model, VolumeSegmenter):
        return model.slice_features(x)
    if isinstance(model, Backbone):
        return model.forward_features(model.preprocess(fit_to_backbone(x, model)))
    if isinstance(getattr(model, "backbone", None), Backbone):
        return model.backbone.forward_features(
            backbone_input(x, getattr(model, "stem", nn.Identity()), model.backbone, getattr(model, "preprocess", False)))
    out = model(x)
    if not isinstance(out, torch.Tensor) or out.ndim != 4:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"{type(model).__name__} has no .backbone and does not return one NCHW map (got {shape})")
    return [out]


def feature_map(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The backbone's last feature map for ``x`` (see :func:`feature_maps`)."""
    return feature_maps(model, x)[-1]


# ----------------------------------------------------------------------------- gradients

def _batches(images: torch.Tensor | Iterable[torch.Tensor], batch_size: int) -> Iterable[torch.Tensor]:
    if isinstance(images, torch.Tensor):
        yield from torch.split(images, batch_size)
    else:
        yield from images


def _central_unit(feature: torch.Tensor) -> torch.Tensor:
    """(B, C) values of the central unit of (B, C, *spatial); of the central slice in 3D."""
    return feature[(slice(None), slice(None)) + tuple(n // 2 for n in feature.shape[2:])]


def _input_contributions(model: nn.Module, x: torch.Tensor, output_relu: bool) -> torch.Tensor:
    """Per-image contribution maps (B, *spatial): ReLU'd input gradients summed over channels."""
    x = x.detach().clone().float().requires_grad_(True)
    centre = _central_unit(feature_map(model, x))
    if output_relu:
        centre = centre.relu()
    # Images never interact in eval mode, so one backward of the batch sum gives each
    # image's own gradient.
    (grad,) = torch.autograd.grad(centre.sum(), x)
    return grad.relu().sum(dim=1)


def _mean_contribution(model: nn.Module, images, batch_size: int, output_relu: bool) -> torch.Tensor:
    """The average contribution map over all images; images with non-finite gradients skipped."""
    total, count = None, 0
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad(), normalised_input_gradients(model):
            for batch in _batches(images, batch_size):
                maps = _input_contributions(model, batch, output_relu)
                # RepLKNet skips images whose gradient is NaN rather than poison the average.
                maps = maps[torch.isfinite(maps.flatten(1)).all(dim=1)]
                total = maps.sum(dim=0) if total is None else total + maps.sum(dim=0)
                count += maps.shape[0]
    finally:
        model.train(was_training)
    if not count:
        raise ValueError("no image gave a finite input gradient (or no images were given)")
    return total / count


def effective_receptive_field(model: nn.Module, images: torch.Tensor | Iterable[torch.Tensor],
                              batch_size: int = 8, output_relu: bool = True) -> np.ndarray:
    """The raw (un-logged) ERF map (H, W) of the central unit of the backbone's last feature map.

    For a VolumeSegmenter this is the map of the central slice (the slice holding the central
    unit); :func:`volume_effective_receptive_field` also gives the through-slice profile.

    Arguments:
      model: a task model, Backbone or NCHW-map module (see :func:`feature_maps`); it is run
        in eval mode and its train/eval state is restored afterwards.
      images: (N, C, H, W) images in [0, 1] (N volumes (N, C, X, Y, Z) for a VolumeSegmenter),
        or an iterable of such batches.
      batch_size: images per backward pass when ``images`` is one tensor.
      output_relu: ReLU the central unit's channels before summing them, as RepLKNet does.
    """
    if isinstance(model, VolumeSegmenter):
        return volume_effective_receptive_field(model, images, batch_size, output_relu).central
    contribution = _mean_contribution(model, images, batch_size, output_relu)
    if contribution.ndim != 2:
        raise ValueError(f"expected 2D images (N, C, H, W), got contribution maps of shape {tuple(contribution.shape)}")
    return contribution.double().cpu().numpy()


@dataclass
class VolumeERF:
    """The ERF of a slice-stack model's central unit.

    Attributes:
      central: (H, W) raw ERF map of the central slice.
      profile: (S,) share of the total contribution per slice (sums to 1).
      volume: (S, H, W) raw contribution of every slice, slices first.
    """

    central: np.ndarray
    profile: np.ndarray
    volume: np.ndarray


def volume_effective_receptive_field(model: VolumeSegmenter, volumes: torch.Tensor | Iterable[torch.Tensor],
                                     batch_size: int = 2, output_relu: bool = True) -> VolumeERF:
    """ERF of the central unit of the central slice of a VolumeSegmenter, and its depth profile.

    Arguments:
      model: a VolumeSegmenter (slices taken on ``model.slice_axis``).
      volumes: (N, C, X, Y, Z) volumes in [0, 1] with ``model.num_slices`` slices on the
        slice axis, or an iterable of such batches.
      batch_size, output_relu: see :func:`effective_receptive_field`.
    """
    if not isinstance(model, VolumeSegmenter):
        raise ValueError(f"volume ERFs need a VolumeSegmenter, got {type(model).__name__}")
    contribution = _mean_contribution(model, volumes, batch_size, output_relu)
    stack = contribution.movedim(model.slice_axis, 0).double().cpu().numpy()
    per_slice = stack.sum(axis=(1, 2))
    total = per_slice.sum()
    profile = per_slice / total if total > 0 else per_slice
    return VolumeERF(central=stack[stack.shape[0] // 2], profile=profile, volume=stack)


# ----------------------------------------------------------------------------- summaries

def normalise_erf(erf: np.ndarray) -> np.ndarray:
    """log10(erf + 1) min-max scaled to [0, 1] for display (RepLKNet); a flat map gives zeros."""
    data = np.log10(np.asarray(erf, dtype=np.float64) + 1.0)
    low, high = data.min(), data.max()
    if high <= low:
        return np.zeros_like(data)
    return (data - low) / (high - low)


def scaled_for_ratio(erf: np.ndarray, scale: str = "log") -> np.ndarray:
    """The map the area ratios are computed on: ``log10(erf + 1)`` (RepLKNet) or the raw map."""
    if scale not in RATIO_SCALES:
        raise ValueError(f"ratio scale must be one of {RATIO_SCALES}, got {scale!r}")
    data = np.asarray(erf, dtype=np.float64)
    return np.log10(data + 1.0) if scale == "log" else data


def _central_square_shares(data: np.ndarray) -> np.ndarray:
    """Share of the total held by the central square of radius r = 0, 1, ... (clipped to the map)."""
    h, w = data.shape
    cy, cx = h // 2, w // 2
    integral = np.zeros((h + 1, w + 1))
    integral[1:, 1:] = data.cumsum(axis=0).cumsum(axis=1)
    radii = np.arange(max(cy, h - 1 - cy, cx, w - 1 - cx) + 1)
    y0, y1 = np.maximum(cy - radii, 0), np.minimum(cy + radii, h - 1) + 1
    x0, x1 = np.maximum(cx - radii, 0), np.minimum(cx + radii, w - 1) + 1
    sums = integral[y1, x1] - integral[y0, x1] - integral[y1, x0] + integral[y0, x0]
    # The largest square covers the map, so the last share is 1 up to rounding; make it exact.
    return np.minimum(sums / integral[-1, -1], 1.0)


def high_contribution_area_ratio(erf: np.ndarray, thresholds: Sequence[float] = DEFAULT_THRESHOLDS
                                 ) -> dict[float, dict[str, float]]:
    """For each threshold t, the smallest central square holding at least t of the total.

    The square is centred on the pixel (H // 2, W // 2), the one under the central unit, and
    has an odd side 2r + 1; squares reaching past the border are clipped to the map. RepLKNet
    reports these on ``log10(erf + 1)`` (see :func:`scaled_for_ratio`).

    Arguments:
      erf: a non-negative (H, W) contribution map.
      thresholds: shares of the total contribution, each in (0, 1].

    Returns ``{t: {"side": 2r + 1, "area_ratio": clipped square area / (H * W)}}``.
    """
    data = np.asarray(erf, dtype=np.float64)
    if data.ndim != 2:
        raise ValueError(f"expected an (H, W) map, got shape {data.shape}")
    if not np.isfinite(data).all() or (data < 0).any():
        raise ValueError("an ERF map must be finite and non-negative")
    if data.sum() <= 0:
        raise ValueError("the ERF map is all zero: the central unit does not depend on the input")
    bad = [t for t in thresholds if not 0 < t <= 1]
    if bad:
        raise ValueError(f"thresholds must lie in (0, 1], got {bad}")
    h, w = data.shape
    shares = _central_square_shares(data)
    result = {}
    for t in thresholds:
        # A relative tolerance keeps t = 1.0 reachable despite rounding in the sums.
        r = int(np.argmax(shares >= t - 1e-12))
        rows = min(h // 2 + r, h - 1) - max(h // 2 - r, 0) + 1
        cols = min(w // 2 + r, w - 1) - max(w // 2 - r, 0) + 1
        result[float(t)] = {"side": 2 * r + 1, "area_ratio": rows * cols / (h * w)}
    return result


def format_ratios(ratios: Mapping[str, Mapping[float, Mapping[str, float]]]) -> str:
    """A plain-text table: one row per model, side and area ratio per threshold."""
    if not ratios:
        return ""
    thresholds = list(next(iter(ratios.values())))
    width = max(len("model"), *(len(str(name)) for name in ratios))
    header = f"{'model':<{width}}" + "".join(f"  {f't={t:g} side/area':>20}" for t in thresholds)
    lines = [header]
    for name, per_t in ratios.items():
        cells = "".join(f"  {per_t[t]['side']:>9d} / {per_t[t]['area_ratio']:8.4f}" for t in thresholds)
        lines.append(f"{str(name):<{width}}{cells}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- figures

def _title(name: str, ratios: Mapping[float, Mapping[str, float]]) -> str:
    shown = [t for t in TITLE_THRESHOLDS if t in ratios] or list(ratios)
    return name + "\n" + "  ".join(f"{t:.0%}: {ratios[t]['area_ratio']:.3f}" for t in shown)


def plot_erfs(erfs: Mapping[str, np.ndarray], out_png: str | Path,
              ratios: Mapping[str, Mapping[float, Mapping[str, float]]] | None = None,
              profiles: Mapping[str, np.ndarray] | None = None, cmap: str = "viridis") -> Path:
    """Draw the normalised ERF maps side by side (and through-slice profiles below, if given).

    Arguments:
      erfs: raw ERF maps by name (method, data fraction, ...), drawn left to right.
      out_png: the PNG to write (written atomically; parent folders are created).
      ratios: area ratios by name for the titles (default: computed on the log scale).
      profiles: per-name slice profiles of 3D models, drawn as bar charts under the maps.
      cmap: a matplotlib colormap name.
    """
    # Figure + its own Agg canvas: no pyplot global state, no display needed.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not erfs:
        raise ValueError("no ERF maps to draw")
    names = list(erfs)
    ratios = ratios or {n: high_contribution_area_ratio(scaled_for_ratio(erfs[n])) for n in names}
    rows = 2 if profiles else 1
    fig = Figure(figsize=(3.2 * len(names), 3.6 * rows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, len(names), squeeze=False)
    for i, name in enumerate(names):
        ax = axes[0, i]
        image = ax.imshow(normalise_erf(erfs[name]), cmap=cmap, vmin=0.0, vmax=1.0, interpolation="nearest")
        ax.set_title(_title(str(name), ratios[name]), fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
        if profiles:
            profile = np.asarray(profiles.get(name, []))
            axes[1, i].bar(np.arange(len(profile)) - len(profile) // 2, profile, color="tab:blue")
            axes[1, i].set_xlabel("slice offset from the centre")
            axes[1, i].set_ylabel("share of contribution")
    fig.colorbar(image, ax=axes[0, :].tolist(), shrink=0.8, label="log10(ERF + 1), min-max")
    out = Path(out_png)
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    return out


def compare_erf(models: Mapping[str, nn.Module], images: torch.Tensor | Iterable[torch.Tensor],
                out_png: str | Path, thresholds: Sequence[float] = DEFAULT_THRESHOLDS, scale: str = "log",
                batch_size: int = 8, output_relu: bool = True
                ) -> tuple[Path, dict[str, dict[float, dict[str, float]]]]:
    """Measure each model's ERF on the same images and draw them side by side.

    Keys are free labels: methods ("dka", "adapter"), data fractions ("1%", "100%"), or both.

    Arguments:
      models: models by label (see :func:`effective_receptive_field`); VolumeSegmenters get
        their through-slice profiles drawn under the maps.
      images: the images (or volumes) every model sees; a re-iterable, e.g. a tensor.
      out_png: the PNG to write.
      thresholds: area-ratio thresholds.
      scale: compute the ratios on "log" (RepLKNet, the papers' numbers) or "raw" maps.
      batch_size, output_relu: see :func:`effective_receptive_field`.

    Returns the PNG path and ``{label: high_contribution_area_ratio(...)}``.
    """
    erfs, profiles = measure_erfs(models, images, batch_size, output_relu)
    ratios = {name: high_contribution_area_ratio(scaled_for_ratio(erf, scale), thresholds)
              for name, erf in erfs.items()}
    return plot_erfs(erfs, out_png, ratios, profiles or None), ratios


def measure_erfs(models: Mapping[str, nn.Module], images: torch.Tensor | Iterable[torch.Tensor],
                 batch_size: int = 8, output_relu: bool = True) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Raw ERF maps by label, and the through-slice profiles of the VolumeSegmenters among them.

    Arguments: see :func:`compare_erf`.
    """
    erfs, profiles = {}, {}
    for name, model in models.items():
        if isinstance(model, VolumeSegmenter):
            result = volume_effective_receptive_field(model, images, batch_size, output_relu)
            erfs[name], profiles[name] = result.central, result.profile
        else:
            erfs[name] = effective_receptive_field(model, images, batch_size, output_relu)
    return erfs, profiles
