"""``medadapt bench evidence``: the papers' comparison on real MRI, in 2D and in 3D, rerunnable.

One command runs the protocol (`medadapt.protocol.runner.run_protocol`, every cell the bundle's
own recipe) on the real MNI152 template's grey / white matter, as slices (``mni152_tissue``)
and as 4-slice stacks (``mni152_tissue_3d``), with the papers' rows: DKA, LKA, the Houlsby
adapter at its papers' size and sized to DKA's trainable parameters, LoRA, linear probing,
full fine-tuning and a MONAI U-Net trained from scratch; three training-set sizes, five folds
each (a fold: its own training images and seed). Then the effective receptive fields of DKA and
the Houlsby adapter (and the pretrained encoder, linear probing) at the smallest and the largest size. Everything lands in ``--out``: each
cell's record (``cells/*.json``: settings, exact overrides, test metrics), the tables with 95 %
confidence intervals and paired tests (``protocol.md``, ``.csv``, ``.json``), the plots, and
``evidence.md`` that gathers them. A rerun skips every finished cell, so it resumes across
sessions; ``--only 2d|3d|erf`` runs one part.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path

from medadapt.io import atomic_write_text, read_json

ROWS = ["dka", "lka", "adapter", "adapter@iso:dka", "lora", "linear", "full", "unet"]


@dataclass(frozen=True)
class Part:
    """One half of the evidence: a dataset, its training sizes and the budget of each cell."""

    dataset: str
    fractions: tuple[float, ...]
    batch_size: int
    steps: int
    rows: tuple[str, ...]


# The 2D pool is 39 slices (2, 8 and 39 training slices), the 3D pool 9 stacks of 4 slices
# (1, 3 and 9 training stacks). A 3D step costs about 2.5 2D steps on a CPU: the 3D part takes
# fewer steps and leaves out the iso-parameter row (DKA against Houlsby at DKA's size is the 2D
# part's question), so that the whole runs in about two hours on 2 CPU cores.
PARTS = {
    "2d": Part("mni152_tissue", (0.05, 0.2, 1.0), batch_size=2, steps=100, rows=tuple(ROWS)),
    "3d": Part("mni152_tissue_3d", (0.12, 0.34, 1.0), batch_size=1, steps=60,
               rows=tuple(r for r in ROWS if "@" not in r)),
}
FOLDS = 5
IMAGE_SIZE = 64
ERF_ROWS = ("linear", "adapter", "dka")  # linear probing: the pretrained encoder as it is
# Cells run as local Ray tasks, one thread each, two at a time: two small single-threaded
# trainings use two CPU cores better than one two-threaded training.
WORKERS = "local"


def run_part(part: str, out: Path, image_size: int, folds: int, steps: int | None = None, ray: str | None = WORKERS,
             echo=print) -> list[dict]:
    """The protocol of one part ("2d" or "3d") into ``out/<dataset>``."""
    from medadapt.protocol.runner import run_protocol

    spec = PARTS[part]
    steps = steps or spec.steps
    command = (f"medadapt bench evidence --only {part} --image-size {image_size} --folds {folds}"
               f"{f' --steps {steps}' if steps != spec.steps else ''}{' --no-ray' if not ray else ''} --out {out}")
    return run_protocol(dataset=spec.dataset, methods=list(spec.rows), fractions=list(spec.fractions), folds=folds,
                        steps=steps, batch_size=spec.batch_size, backbone="litemedsam", image_size=image_size,
                        out=str(out / spec.dataset), command=command, ray=ray, echo=echo)


def erf_comparison(out: Path, image_size: int, echo=print) -> dict:
    """Effective receptive fields of the ERF rows' fold-0 models at the smallest and largest size
    of the 2D part, on every usable slice of the template at the size the models were trained
    at; ``out/erf.png`` and the area ratios."""
    import torch

    from medadapt.analysis.erf import compare_erf
    from medadapt.checkpoint import load_adapters
    from medadapt.datasets.mni152 import build_slices, datalist
    from medadapt.engine.bundle import parsed

    dataset, fractions = PARTS["2d"].dataset, PARTS["2d"].fractions
    cells = out / dataset / "cells"
    root = build_slices(out / dataset / "data" / dataset)
    from medadapt.bundles import path as bundle_path

    bundle = bundle_path("dka_mni152_tissue")
    preprocessing = parsed(bundle / "inference.json", "preprocessing", image_size=image_size)
    images = torch.stack([preprocessing({"image": e["image"]})["image"] for e in datalist(root)])
    results = {}
    for fraction in (fractions[0], fractions[-1]):
        models = {}
        for row in ERF_ROWS:
            record = read_json(cells / f"{row}__{fraction:.10g}__fold0.json")
            overrides = {k: v for k, v in record["overrides"].items() if k in (
                "method", "method_options", "backbone", "backbone_options", "image_size")}
            model = parsed(bundle / "train.json", "network_def", **overrides)
            load_adapters(model, record["adapters"])
            models[f"{row} ({record['train_count']} slices)"] = model.eval()
        path, ratios = compare_erf(models, images, out / f"erf_{fraction:g}.png")
        results[str(fraction)] = {"figure": str(path), "ratios": ratios, "images": len(images),
                                  "image_size": image_size}
        echo(f"ERF at fraction {fraction}: {path}")
    atomic_write_text(out / "erf.json", json.dumps(results, indent=1, default=str))
    return results


def summary(out: Path) -> str:
    """``out/evidence.md``: the parts' tables and the ERF ratios, as they stand."""
    parts = [f"# Evidence: the papers' comparison on real MRI ({time.strftime('%Y-%m-%d')})", ""]
    for part, spec in PARTS.items():
        dataset = spec.dataset
        table = out / dataset / "protocol.md"
        if table.is_file():
            parts += [f"## {part.upper()}: {dataset}", "", table.read_text(encoding="utf-8"),
                      f"![Dice against training size]({dataset}/protocol.png)", ""]
    erf = out / "erf.json"
    if erf.is_file():
        results = read_json(erf)
        first = next(iter(results.values()))
        parts += ["## Effective receptive fields (2D, fold 0)", "",
                  f"RepLKNet's recipe measures the ERF on about 50 images of 1024 px. Here: every slice of the "
                  f"template's test band and training pool ({first['images']}) at the {first['image_size']} px the "
                  f"models were trained at (not 512 px or more: the 2D part trains at {first['image_size']} px to "
                  "fit two CPU cores), so each ratio is a share of a "
                  f"{first['image_size']} x {first['image_size']} input.", ""]
        for fraction, result in results.items():
            parts += [f"Fraction {fraction}: ![ERF]({Path(result['figure']).name})", "", "```",
                      json.dumps(result["ratios"], indent=1), "```", ""]
    text = "\n".join(parts)
    atomic_write_text(out / "evidence.md", text)
    return text


def configure(parser: argparse.ArgumentParser) -> None:
    parser.description = __doc__
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--out", default="docs/evidence", help="output folder (default docs/evidence)")
    parser.add_argument("--only", choices=("2d", "3d", "erf"), action="append",
                        help="run only this part (repeatable; default: 2d, 3d and erf)")
    parser.add_argument("--steps", type=int, help="optimiser steps per cell (default: "
                        + ", ".join(f"{k.upper()} {v.steps}" for k, v in PARTS.items()) + ")")
    parser.add_argument("--image-size", type=int, default=IMAGE_SIZE,
                        help=f"slice size in pixels, LiteMedSAM's input (default {IMAGE_SIZE})")
    parser.add_argument("--folds", type=int, default=FOLDS, help=f"folds per size (default {FOLDS})")
    parser.add_argument("--no-ray", action="store_true",
                        help="run the cells one after another in this process (default: two local Ray workers)")
    parser.set_defaults(func=_run)


def _run(args) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    parts = args.only or ["2d", "3d", "erf"]
    for part in ("2d", "3d"):
        if part in parts:
            run_part(part, out, args.image_size, args.folds, steps=args.steps, ray=None if args.no_ray else WORKERS)
    if "erf" in parts:
        erf_comparison(out, args.image_size)
    print(summary(out))
    return 0
