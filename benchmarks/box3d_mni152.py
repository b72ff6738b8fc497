"""3D box propagation on real anatomy: the MNI152 brain from one box, against a box on every slice.

    python benchmarks/box3d_mni152.py                    # 2 mm template, axial, writes results/box3d.json
    python benchmarks/box3d_mni152.py --resolution 4     # the 2 mm template down-sampled to 4 mm
    python benchmarks/box3d_mni152.py --pad 128 128 100  # the 2 mm template in a 128 x 128 x 100 volume
    python benchmarks/box3d_mni152.py --one-call         # the model called whole on each slice, as before
    python benchmarks/box3d_mni152.py --click            # one click instead of the box, as DeepGrow sends

The volume is nilearn's skull-stripped MNI152 T1 template, the target its brain mask (both
offline, from the ``[demo]`` extra); the model is LiteMedSAM with its pretrained weights (DKA
injected, which starts as the identity). Two masks are compared with the brain mask:

- propagated: one box, the brain mask's bounding box on the middle slice of ``--axis``,
  carried through the volume by `medadapt.propagate_boxes`; with ``--click``, the box one
  click stands for instead (`medadapt.monailabel.clicks.box_around_click`, what the served
  model does with a single DeepGrow click), the click on the brain voxel nearest the brain's
  centre of mass on that slice;
- upper bound: the same model given the brain mask's bounding box on every slice that holds
  brain (what a user drawing every slice would get).

Reported: both Dice scores, the slices each covers, where propagation stopped, the slices
encoded and the seconds each took. The upper bound runs after propagation on the same volume, so
it reuses the embeddings propagation kept (`propagate_boxes`' cache) and mostly times the
decoder; ``--one-call`` times it as a box on every slice took before.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from medadapt.models.box_propagation import PRECISIONS, propagate_boxes

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


def pad_to(volume: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """``volume`` centred in zeros of ``shape`` (each side at least the volume's)."""
    if any(s < v for s, v in zip(shape, volume.shape)):
        raise ValueError(f"cannot pad {volume.shape} to the smaller {shape}")
    padded = np.zeros(shape, dtype=volume.dtype)
    start = [(s - v) // 2 for s, v in zip(shape, volume.shape)]
    padded[tuple(slice(a, a + v) for a, v in zip(start, volume.shape))] = volume
    return padded


class OneCallPerSlice(nn.Module):
    """The box model called whole on each slice, as propagation ran before it encoded slices
    apart: no embedding kept, float32."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        return self.model(images, boxes)


def served_box_model() -> nn.Module:
    """The 3D box model as the label server builds it (`Box3DModel.build_network`): LiteMedSAM
    with its pretrained weights and fresh DKA adapters, convolution weights channels-last."""
    from medadapt.monailabel.specs import Box3DModel

    # No trained adapters are looked for: build_network(None) builds fresh ones.
    return Box3DModel.default(runs=HERE / "results").build_network(None).eval()


def reference_box(mask2d: np.ndarray) -> list[float] | None:
    """The inclusive bounding box [x0, y0, x1, y1] of a slice's mask (x = columns)."""
    rows, cols = np.nonzero(mask2d)
    if rows.size == 0:
        return None
    return [float(cols.min()), float(rows.min()), float(cols.max()), float(rows.max())]


def dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a > 0, b > 0
    return float(2 * (a & b).sum() / max(a.sum() + b.sum(), 1))


def slices_holding(mask: np.ndarray, axis: int) -> np.ndarray:
    """The indices of the slices along ``axis`` that hold part of ``mask``, in order."""
    return np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != axis)))


def middle_box(brain: np.ndarray, axis: int) -> tuple[int, list[float]]:
    """The middle slice of the brain along ``axis`` and the brain's bounding box on it."""
    brain_slices = slices_holding(brain, axis)
    middle = int(round((brain_slices[0] + brain_slices[-1]) / 2))
    return middle, reference_box(brain.take(middle, axis=axis))


def central_click(brain2d: np.ndarray) -> tuple[int, int]:
    """(row, column) of the brain voxel nearest the brain's centre of mass on a slice."""
    rows, columns = np.nonzero(brain2d)
    nearest = np.argmin((rows - rows.mean()) ** 2 + (columns - columns.mean()) ** 2)
    return int(rows[nearest]), int(columns[nearest])


def measure(model, volume: np.ndarray, brain: np.ndarray, axis: int, upper_bound: bool = True, click: bool = False,
            **options) -> dict:
    """Propagation from the middle box (or one click, ``click``) and the box-on-every-slice
    upper bound; ``options`` go to `propagate_boxes` (precision, cache)."""
    brain_slices = slices_holding(brain, axis)
    started = time.perf_counter()
    middle, box = middle_box(brain, axis)
    prompt = {"box": box}
    if click:
        from medadapt.monailabel.clicks import box_around_click

        row, column = central_click(brain.take(middle, axis=axis))
        box = box_around_click(volume.take(middle, axis=axis), row, column)
        prompt = {"click": [row, column], "box_from_click": box, "brain_box": prompt["box"]}
    propagated = propagate_boxes(model, volume, {middle: box}, axis, **options)
    propagated_s = time.perf_counter() - started

    # Upper bound: every slice with brain gets its own reference box, nothing is carried.
    started = time.perf_counter()
    upper = np.zeros(volume.shape, dtype=np.uint8)
    for k in brain_slices if upper_bound else []:
        single = propagate_boxes(model, volume, {int(k): reference_box(brain.take(k, axis=axis))}, axis,
                                 slice_range=(int(k), int(k)), **options)  # only the boxed slice
        index = [slice(None)] * 3
        index[axis] = k
        upper[tuple(index)] = single.mask.take(k, axis=axis)
    upper_s = time.perf_counter() - started
    kept = propagated.slices
    return {
        "axis": axis,
        "shape": list(volume.shape),
        "box_slice": middle,
        **prompt,
        "brain_slices": [int(brain_slices[0]), int(brain_slices[-1])],
        "propagated_slices": [kept[0], kept[-1]] if kept else [],
        "stops": propagated.stops,
        "dice_propagated": round(dice(propagated.mask, brain), 4),
        "dice_on_the_prompted_slice": round(dice(propagated.mask.take(middle, axis=axis), brain.take(middle, axis=axis)), 4),
        "dice_upper_bound": round(dice(upper, brain), 4) if upper_bound else None,
        "seconds_propagated": round(propagated_s, 1),
        "seconds_upper_bound": round(upper_s, 1),
        "slices_segmented_propagated": len(propagated.boxes),
        "slices_segmented_upper_bound": int(len(brain_slices)),
        "slices_encoded_propagated": len(propagated.encoded),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--resolution", type=int, choices=(1, 2, 4), default=2, help="mm (default 2)")
    parser.add_argument("--axis", type=int, choices=(0, 1, 2), default=2, help="slicing axis (default 2: axial)")
    parser.add_argument("--out", default=str(HERE / "results" / "box3d.json"), help="JSON file to write")
    parser.add_argument("--no-upper-bound", action="store_true",
                        help="measure propagation only (the upper bound does not depend on its stopping rules)")
    parser.add_argument("--pad", type=int, nargs=3, metavar=("X", "Y", "Z"),
                        help="centre the template and its mask in zeros of this shape, e.g. 128 128 100")
    parser.add_argument("--precision", choices=PRECISIONS, default="auto", help="the image encoder's (default auto)")
    parser.add_argument("--one-call", action="store_true",
                        help="call the model whole on each slice, in float32, as propagation ran before")
    parser.add_argument("--click", action="store_true",
                        help="one click on the brain's centre on the middle slice instead of the brain's box")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    model = served_box_model()
    volume, brain = mni152_volume_and_brain(args.resolution)
    if args.pad:
        volume, brain = pad_to(volume, tuple(args.pad)), pad_to(brain, tuple(args.pad))
    path = "one call per slice, float32" if args.one_call else f"encoded apart, precision {args.precision}"
    result = {"resolution_mm": args.resolution, "model": "litemedsam (pretrained) + fresh DKA, as served (channels-last)",
              "path": path,
              **measure(OneCallPerSlice(model) if args.one_call else model, volume, brain, args.axis,
                        upper_bound=not args.no_upper_bound, click=args.click,
                        **({} if args.one_call else {"precision": args.precision}))}
    print(json.dumps(result, indent=1))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
