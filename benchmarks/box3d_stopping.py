"""Where 3D box propagation stops: the unsure rule's threshold measured on the MNI152 brain.

    python benchmarks/box3d_stopping.py          # all volumes, axes and precisions (~20 min on 2 cores)
    python benchmarks/box3d_stopping.py --volumes 4mm --axes 2 --precisions float32 --out /tmp/one.json   # one row

Only the whole measurement writes results/box3d_stopping.json; a part needs its own --out.

For each volume (nilearn's MNI152 T1 template at 4 mm, at 2 mm, and at 2 mm centred in a
128 x 128 x 100 volume as `benchmarks/run.py --only box3d` uses it), slicing axis and encoder
precision, the brain mask's bounding box on the brain's middle slice is propagated by
`medadapt.propagate_boxes` with the 3D box model as the label server builds it (LiteMedSAM's
pretrained weights, DKA injected as the identity, convolution weights channels-last):

1. with the unsure and vanished rules off, through everything the model finds, giving each
   slice's share of sure voxels (`BoxPropagation.confidence`): the lowest on the brain's own
   slices (those whose mask has Dice >= 0.5 with the brain there) and the value on the first
   slice past the brain's end in each direction that the run reached;
2. with the default rules and ``min_confidence`` of 0.2, 0.1, 0.05 and 0: the slices kept and
   the Dice with the brain mask;
3. from the brain mask's bounding box 24 mm inside each end of the brain, outwards only: the
   share of sure voxels on the first slice past the end (rules off) and, at each threshold, how
   many slices past the end were kept (0: the run stopped at the brain's end).

The runs after the first mostly reuse its embeddings (the decoder alone).

Writes the rows as JSON and prints them as markdown tables (docs/box3d.md summarises them).
The 2 mm volume centred in 128 x 128 x 100 is measured on its axial axis only (axis 2).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from box3d_mni152 import (dice, middle_box, mni152_volume_and_brain, pad_to, reference_box, served_box_model,
                          slices_holding)
from medadapt.models.box_propagation import EmbeddingCache, encoder_precision, propagate_boxes

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "box3d_stopping.json"
THRESHOLDS = (0.2, 0.1, 0.05, 0.0)
VOLUMES = {"4mm": (4, None), "2mm": (2, None), "2mm-128x128x100": (2, (128, 128, 100))}
WELL_SEGMENTED = 0.5  # a slice's Dice with the brain from which it counts as the object's own


def profile(model, volume: np.ndarray, brain: np.ndarray, axis: int, precision: str, resolution: int) -> dict:
    """The free run's confidences and the runs under each threshold (see the module docstring)."""
    brain_slices = slices_holding(brain, axis)
    first, last = int(brain_slices[0]), int(brain_slices[-1])
    holds_brain = set(brain_slices.tolist())
    middle, box = middle_box(brain, axis)
    cache = EmbeddingCache(2**34)
    started = time.perf_counter()
    free = propagate_boxes(model, volume, {middle: box}, axis, min_confidence=0, min_area_fraction=0, cache=cache,
                           precision=precision)
    seconds = time.perf_counter() - started
    own = [k for k, share in free.confidence.items()
           if k in holds_brain and dice(free.mask.take(k, axis=axis), brain.take(k, axis=axis)) >= WELL_SEGMENTED]
    lowest = min(own, key=free.confidence.get) if own else None
    past = {end: round(free.confidence[end], 3) for end in (first - 1, last + 1) if end in free.confidence}
    runs = {}
    for threshold in THRESHOLDS:
        run = propagate_boxes(model, volume, {middle: box}, axis, min_confidence=threshold, cache=cache,
                              precision=precision)
        kept = run.slices
        runs[str(threshold)] = {"dice": round(dice(run.mask, brain), 3), "slices": [kept[0], kept[-1]] if kept else [],
                                "stops": run.stops}
    return {"axis": axis, "precision": free.precision, "shape": list(volume.shape), "box_slice": middle,
            "brain_slices": [first, last],
            "lowest_on_the_brain": None if lowest is None else {"slice": lowest,
                                                                "confidence": round(free.confidence[lowest], 3)},
            "first_slice_past_the_brain": past, "free_run_seconds": round(seconds, 1), "runs": runs,
            "from_near_each_end": near_ends(model, volume, brain, axis, precision, (first, last),
                                            round(24 / resolution), cache)}


def near_ends(model, volume: np.ndarray, brain: np.ndarray, axis: int, precision: str, extent: tuple[int, int],
              inside: int, cache: EmbeddingCache) -> dict:
    """Part 3 of the module docstring: from a box ``inside`` slices within the brain's low and
    high end (``extent``, its first and last slice along ``axis``)."""
    first, last = extent
    ends = {}
    for name, end, step in (("low", first, -1), ("high", last, +1)):
        start = end - step * inside
        box = reference_box(brain.take(start, axis=axis))
        outwards = (0, start) if step < 0 else (start, volume.shape[axis] - 1)
        free = propagate_boxes(model, volume, {start: box}, axis, slice_range=outwards, min_confidence=0,
                               min_area_fraction=0, cache=cache, precision=precision)
        past = free.confidence.get(end + step)
        beyond = {}
        for threshold in THRESHOLDS:
            kept = propagate_boxes(model, volume, {start: box}, axis, slice_range=outwards,
                                   min_confidence=threshold, cache=cache, precision=precision).slices
            reached = (kept[0] if step < 0 else kept[-1]) if kept else end - step  # nothing kept: none past
            beyond[str(threshold)] = max(0, (reached - end) * step)
        ends[name] = {"end": end, "box_slice": start,
                      "first_past_confidence": None if past is None else round(past, 3), "slices_past_kept": beyond}
    return ends


def table(rows: list[dict]) -> str:
    head = ("| volume | axis | encoder | brain slices | lowest share on the brain | first slice past it | "
            + " | ".join(f"Dice (slices) at {t:g}" for t in THRESHOLDS) + " |")
    lines = [head, "|" + "---|" * (6 + len(THRESHOLDS))]
    for row in rows:
        past = ", ".join(f"{k}: {v:.3f}" for k, v in row["first_slice_past_the_brain"].items()) or "not reached"
        cells = [f"{r['dice']:.3f} ({'-'.join(map(str, r['slices'])) or 'nothing kept'})" for r in row["runs"].values()]
        lowest = row["lowest_on_the_brain"]
        lowest = "no slice with Dice >= 0.5" if lowest is None else f"{lowest['confidence']:.3f} (slice {lowest['slice']})"
        lines.append(f"| {row['volume']} | {row['axis']} | {row['precision']} | {row['brain_slices'][0]}-"
                     f"{row['brain_slices'][1]} | {lowest} | {past} | " + " | ".join(cells) + " |")
    lines += ["", "| volume | axis | encoder | end (box slice) | share on the first slice past it | "
              + " | ".join(f"slices past kept at {t:g}" for t in THRESHOLDS) + " |", "|" + "---|" * (5 + len(THRESHOLDS))]
    for row in rows:
        for name, end in row["from_near_each_end"].items():
            share = "not reached" if end["first_past_confidence"] is None else f"{end['first_past_confidence']:.3f}"
            lines.append(f"| {row['volume']} | {row['axis']} | {row['precision']} | {name} {end['end']} "
                         f"({end['box_slice']}) | {share} | "
                         + " | ".join(str(v) for v in end["slices_past_kept"].values()) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--volumes", nargs="+", choices=sorted(VOLUMES), default=list(VOLUMES))
    parser.add_argument("--axes", type=int, nargs="+", choices=(0, 1, 2), default=[0, 1, 2])
    parser.add_argument("--precisions", nargs="+", choices=("float32", "auto"), default=["float32", "auto"],
                        help="the encoder's; auto is measured only where it is not float32 on this machine")
    parser.add_argument("--out", help=f"JSON file to write (default {RESULTS}, for the whole measurement only)")
    args = parser.parse_args(argv)
    whole = set(args.volumes) == set(VOLUMES) and set(args.axes) == {0, 1, 2} and set(args.precisions) == {
        "float32", "auto"}
    if args.out is None and not whole:
        parser.error(f"--out: give a file for a part of the measurement ({RESULTS} holds the whole one)")
    torch.manual_seed(0)
    model = served_box_model()
    precisions = [p for p in args.precisions
                  if p == "float32" or encoder_precision(p, torch.device("cpu")) != "float32"]
    if not precisions:
        parser.error("--precisions: auto runs in float32 on this machine; measure float32")
    if all(VOLUMES[name][1] for name in args.volumes) and 2 not in args.axes:
        parser.error("--axes: the 2 mm volume in 128 x 128 x 100 is measured on axis 2 only")
    rows = []
    for name in args.volumes:
        resolution, shape = VOLUMES[name]
        volume, brain = mni152_volume_and_brain(resolution)
        if shape:
            volume, brain = pad_to(volume, shape), pad_to(brain, shape)
        for axis in ([a for a in args.axes if a == 2] if shape else args.axes):
            for precision in precisions:
                row = {"volume": name, **profile(model, volume, brain, axis, precision, resolution)}
                print(json.dumps(row), flush=True)
                rows.append(row)
    out = Path(args.out or RESULTS)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=1) + "\n")
    print(table(rows))
    return rows


if __name__ == "__main__":
    main()
