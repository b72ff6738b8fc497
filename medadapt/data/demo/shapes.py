"""Deterministic building blocks for synthetic lesions: smooth noise and irregular blobs."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F


def smooth_noise(shape: Sequence[int], rng: np.random.Generator, cells: int = 4, waves: int = 12) -> np.ndarray:
    """Smooth random field in [-1, 1]: a sum of random low-frequency plane waves.

    Cheaper than upsampling a coarse random grid by splines (which took most of the demo
    generation time) and just as smooth.

    Arguments:
        shape: output shape (any number of axes).
        rng: random generator (the caller's seed makes the field deterministic).
        cells: highest number of wave periods across an axis; more means finer wiggles.
        waves: number of plane waves summed.
    """
    # Evaluate on a coarse grid (>= 3 samples per period) and interpolate up: same field, far
    # fewer cosines for 3D volumes.
    coarse = tuple(min(n, 4 * cells + 1) for n in shape)
    field = np.zeros(coarse, dtype=np.float32)
    axes = [np.linspace(0.0, 1.0, n, dtype=np.float32) for n in coarse]
    for _ in range(waves):
        frequency = rng.uniform(-cells / 2, cells / 2, len(shape))
        phase = rng.uniform(0, 2 * np.pi)
        total = phase
        for axis, (f, coords) in enumerate(zip(frequency, axes)):
            view = [1] * len(shape)
            view[axis] = -1
            total = total + (2 * np.pi * f) * coords.reshape(view)
        field += np.cos(total)
    if coarse != tuple(shape):
        mode = {1: "linear", 2: "bilinear", 3: "trilinear"}[len(shape)]
        field = F.interpolate(torch.from_numpy(field)[None, None], size=tuple(shape), mode=mode, align_corners=True)
        field = field[0, 0].numpy()
    return field / (np.abs(field).max() + 1e-8)


def blob(
    shape: tuple[int, int],
    center: tuple[float, float],
    radii: tuple[float, float],
    rng: np.random.Generator,
    angle: float = 0.0,
    irregularity: float = 0.1,
    spikes: int = 0,
    spike_depth: float = 0.0,
) -> np.ndarray:
    """Boolean mask of a 2D lesion: an ellipse whose border is perturbed in polar form.

    Arguments:
        shape: (H, W) of the image.
        center: (row, column) of the lesion centre.
        radii: (vertical, horizontal) semi-axes in pixels before rotation.
        rng: random generator for the border harmonics.
        angle: rotation in radians.
        irregularity: amplitude of the smooth (low-frequency, 2-5 lobes) border wobble.
        spikes: number of sharp radial spikes (spiculation, typical of malignancy).
        spike_depth: relative length of the spikes.
    """
    rows, cols = np.mgrid[: shape[0], : shape[1]].astype(np.float32)
    y, x = rows - center[0], cols - center[1]
    c, s = np.cos(angle), np.sin(angle)
    u, v = c * x + s * y, -s * x + c * y
    radius = np.sqrt((v / radii[0]) ** 2 + (u / radii[1]) ** 2)
    theta = np.arctan2(v, u)
    border = np.ones_like(theta)
    for k in range(2, 6):
        border += irregularity / (k - 1) * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
    if spikes:
        border += spike_depth * np.maximum(0.0, np.cos(spikes * theta + rng.uniform(0, 2 * np.pi))) ** 8
    return radius < border
