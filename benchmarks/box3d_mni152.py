"""3D box propagation on real anatomy: the MNI152 brain from one box, against a box on every slice.

    python benchmarks/box3d_mni152.py                    # 2 mm template, axial, writes results/box3d.json
    python benchmarks/box3d_mni152.py --resolution 4     # the 2 mm template down-sampled to 4 mm

The volume is nilearn's skull-stripped MNI152 T1 template, the target its brain mask (both
offline, from the ``[demo]`` extra); the model is LiteMedSAM with its pretrained weights (DKA
injected, which starts as the identity). Two masks are compared with the brain mask:

- propagated: one box, the brain mask's bounding box on the middle slice of ``--axis``,
  carried through the volume by `medadapt.propagate_boxes`;
- upper bound: the same model given the brain mask's bounding box on every slice that holds
  brain (what a user drawing every slice would get).

Reported: both Dice scores, the slices each covers and where propagation stopped.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

import medadapt
from medadapt.models.box_propagation import propagate_boxes

HERE = Path(__file__).resolve().parent


def mni152_volume_and_brain(resolution: int) -> tuple[np.ndarray, np.ndarray]:
    """The T1 template and its brain mask at 1, 2 or 4 mm (4: every second voxel of 2 mm)."""
    from nilearn import datasets

    source = 1 if resolution == 1 else 2
    t1 = datasets.load_mni152_template(resolution=source).get_fdata().astype(np.float32)
    brain = datasets.load_mni152_brain_mask(resolution=source).get_fdata() > 0
    if resolution == 4:
        t1, brain = t1[::2, ::2, ::2], brain[::2, ::2, ::2]
    return t1, brain


def reference_box(mask2d: np.ndarray) -> list[float] | None:
    """The inclusive bounding box [x0, y0, x1, y1] of a slice's mask (x = columns)."""
    rows, cols = np.nonzero(mask2d)
    if rows.size == 0:
        return None
    return [float(cols.min()), float(rows.min()), float(cols.max()), float(rows.max())]


def dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a > 0, b > 0
    return float(2 * (a & b).sum() / max(a.sum() + b.sum(), 1))


def measure(model, volume: np.ndarray, brain: np.ndarray, axis: int, upper_bound: bool = True) -> dict:
    other = tuple(a for a in range(3) if a != axis)
    brain_slices = np.flatnonzero(brain.any(axis=other))
    middle = int(round((brain_slices[0] + brain_slices[-1]) / 2))
    started = time.perf_counter()
    box = reference_box(brain.take(middle, axis=axis))
    propagated = propagate_boxes(model, volume, {middle: box}, axis)
    propagated_s = time.perf_counter() - started

    # Upper bound: every slice with brain gets its own reference box, nothing is carried.
    started = time.perf_counter()
    upper = np.zeros(volume.shape, dtype=np.uint8)
    for k in brain_slices if upper_bound else []:
        single = propagate_boxes(model, volume, {int(k): reference_box(brain.take(k, axis=axis))}, axis,
                                 slice_range=(int(k), int(k)))  # only the boxed slice
        index = [slice(None)] * 3
        index[axis] = k
        upper[tuple(index)] = single.mask.take(k, axis=axis)
    upper_s = time.perf_counter() - started
    kept = propagated.slices
    return {
        "axis": axis,
        "shape": list(volume.shape),
        "box_slice": middle,
        "box": box,
        "brain_slices": [int(brain_slices[0]), int(brain_slices[-1])],
        "propagated_slices": [kept[0], kept[-1]] if kept else [],
        "stops": propagated.stops,
        "dice_propagated": round(dice(propagated.mask, brain), 4),
        "dice_upper_bound": round(dice(upper, brain), 4) if upper_bound else None,
        "seconds_propagated": round(propagated_s, 1),
        "seconds_upper_bound": round(upper_s, 1),
        "slices_segmented_propagated": len(propagated.boxes),
        "slices_segmented_upper_bound": int(len(brain_slices)),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--resolution", type=int, choices=(1, 2, 4), default=2, help="mm (default 2)")
    parser.add_argument("--axis", type=int, choices=(0, 1, 2), default=2, help="slicing axis (default 2: axial)")
    parser.add_argument("--out", default=str(HERE / "results" / "box3d.json"), help="JSON file to write")
    parser.add_argument("--no-upper-bound", action="store_true",
                        help="measure propagation only (the upper bound does not depend on its stopping rules)")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    model = medadapt.create_model("box_segmentation", backbone="litemedsam").eval()
    volume, brain = mni152_volume_and_brain(args.resolution)
    result = {"resolution_mm": args.resolution, "model": "litemedsam (pretrained) + fresh DKA",
              **measure(model, volume, brain, args.axis, upper_bound=not args.no_upper_bound)}
    print(json.dumps(result, indent=1))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
