"""Clicks for the box-prompted models: what 3D Slicer's DeepGrow tools and OHIF send.

The LiteMedSAM models take boxes. A viewer's DeepGrow tool sends clicks instead, starting
from ONE foreground click, and may add background clicks. Here:

- one foreground click on a slice stands for the box around the region of similar intensity
  connected to it (`box_around_click`): the pixels within `TOLERANCE` of the clicked value (on
  the slice's 1-99 percentile range, lightly smoothed), at most half the slice from the click
  in each direction, the box enlarged by `BOX_MARGIN` and at least `MIN_BOX_SIDE`;
- two or more foreground clicks on a slice are the corners of its box (as before);
- a background click removes the part of the answer it lies on, on its slice
  (`remove_touched_parts`), unless that part also holds a foreground click.

Coordinates are voxel indices (IJK) of the stored image: for a PNG, which viewers load as a
(W, H, 1) volume, i is the column and j the row.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from medadapt.monailabel.errors import InvalidInput

TOLERANCE = 0.1  # of the slice's robust intensity range
BOX_MARGIN = 0.1  # each side, as box propagation enlarges its boxes
MIN_BOX_SIDE = 8  # pixels
MAX_CLICKS = 1000


def click_points(value: Any, what: str, shape: tuple[int, ...], usage: str) -> list[tuple[float, ...]]:
    """The points of a click list (``foreground`` / ``background``), each with one coordinate
    per axis of ``shape`` (a 2D image also takes [i, j, 0], the viewer's third index); InvalidInput
    (400 malformed, 422 outside) naming the list and the point."""
    if value is None:
        return []
    if not isinstance(value, list) or len(value) > MAX_CLICKS:
        raise InvalidInput(f"{what} must be a list of at most {MAX_CLICKS} points [i, j, k]: {usage}", 400)
    points = []
    for n, point in enumerate(value):
        try:
            coords = [float(c) for c in point] if isinstance(point, list) else []
        except (TypeError, ValueError, OverflowError):
            coords = []
        if len(shape) == 2 and len(coords) == 3:
            if coords[2] != 0:
                raise InvalidInput(f"{what}[{n}] {point!r}: a 2D image has one slice, k = 0", 422)
            coords = coords[:2]
        if len(coords) != len(shape) or not all(math.isfinite(c) for c in coords):
            raise InvalidInput(f"{what}[{n}] {point!r} is not a point of {len(shape)} numbers: {usage}", 400)
        if any(not 0 <= c <= s - 1 for c, s in zip(coords, shape)):
            raise InvalidInput(f"{what}[{n}] {point!r} lies outside the image of shape {tuple(shape)}", 422)
        points.append(tuple(coords))
    return points


def box_around_click(image: np.ndarray, row: float, column: float) -> list[float]:
    """[column0, row0, column1, row1], both ends inclusive: the box one click at (row, column)
    of a 2D ``image`` stands for (see the module docstring)."""
    from scipy import ndimage

    image = np.asarray(image, dtype=np.float32)
    height, width = image.shape
    row, column = int(round(row)), int(round(column))
    low, high = np.percentile(image, [1, 99])
    scaled = ndimage.gaussian_filter((np.clip(image, low, high) - low) / max(high - low, 1e-6), sigma=1.0)
    # Only the half of the slice around the click can belong to the clicked object.
    r0, r1 = max(0, row - height // 2), min(height, row + height // 2 + 1)
    c0, c1 = max(0, column - width // 2), min(width, column + width // 2 + 1)
    window = scaled[r0:r1, c0:c1]
    similar = np.abs(window - scaled[row, column]) <= TOLERANCE
    regions, _ = ndimage.label(similar)
    rows, columns = np.nonzero(regions == regions[row - r0, column - c0])
    box = [columns.min() + c0, rows.min() + r0, columns.max() + c0, rows.max() + r0]
    return _enlarged(box, row, column, height, width)


def _enlarged(box: list[int], row: int, column: int, height: int, width: int) -> list[float]:
    x0, y0, x1, y1 = box
    half_x = max((x1 - x0 + 1) * (1 + 2 * BOX_MARGIN), MIN_BOX_SIDE) / 2
    half_y = max((y1 - y0 + 1) * (1 + 2 * BOX_MARGIN), MIN_BOX_SIDE) / 2
    centre_x, centre_y = (x0 + x1) / 2, (y0 + y1) / 2
    return [float(max(0, math.floor(centre_x - half_x + 0.5))), float(max(0, math.floor(centre_y - half_y + 0.5))),
            float(min(width - 1, math.ceil(centre_x + half_x - 0.5))),
            float(min(height - 1, math.ceil(centre_y + half_y - 0.5)))]


def remove_touched_parts(mask: np.ndarray, background: list[tuple[float, float]],
                         foreground: list[tuple[float, float]]) -> np.ndarray:
    """``mask`` (2D) without its connected parts that hold a background click (row, column),
    except parts that also hold a foreground click."""
    from scipy import ndimage

    if not background or not mask.any():
        return mask
    parts, _ = ndimage.label(mask > 0)
    kept = {parts[int(round(r)), int(round(c))] for r, c in foreground}
    removed = {parts[int(round(r)), int(round(c))] for r, c in background} - kept - {0}
    if not removed:
        return mask
    mask = mask.copy()
    mask[np.isin(parts, list(removed))] = 0
    return mask
