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
from pathlib import Path

ROWS = ["dka", "lka", "adapter", "adapter@iso:dka", "lora", "linear", "full", "unet"]
# (dataset, fractions, batch size): the 2D pool is 39 slices (2, 8, 39 training slices), the
# 3D pool 9 stacks of 4 slices (1, 3, 9 training stacks).
PARTS = {
    "2d": ("mni152_tissue", [0.05, 0.2, 1.0], 2),
    "3d": ("mni152_tissue_3d", [0.12, 0.34, 1.0], 1),
}
FOLDS = 5
STEPS = 40  # optimiser steps per cell: the earlier published runs' budget (see docs/protocol.md)
IMAGE_SIZE = 64
ERF_ROWS = ("linear", "adapter", "dka")  # linear probing: the pretrained encoder as it is


def run_part(part: str, out: Path, steps: int, image_size: int, folds: int, echo=print) -> list[dict]:
    """The protocol of one part ("2d" or "3d") into ``out/<dataset>``."""
    from medadapt.protocol.runner import run_protocol

    dataset, fractions, batch_size = PARTS[part]
    command = (f"medadapt bench evidence --only {part} --steps {steps} --image-size {image_size} --folds {folds} "
               f"--out {out}")
    return run_protocol(dataset=dataset, methods=ROWS, fractions=fractions, folds=folds, steps=steps,
                        batch_size=batch_size, backbone="litemedsam", image_size=image_size,
                        out=str(out / dataset), command=command, echo=echo)


def erf_comparison(out: Path, image_size: int, echo=print) -> dict:
    """Effective receptive fields of the ERF rows' fold-0 models at the smallest and largest size
    of the 2D part, on every usable slice of the template at the size the models were trained
    at; ``out/erf.png`` and the area ratios."""
    import torch

    from medadapt.analysis.erf import compare_erf
    from medadapt.checkpoint import load_adapters
    from medadapt.datasets.mni152 import build_slices, datalist
    from medadapt.engine.bundle import parsed

    dataset, fractions, _ = PARTS["2d"]
    cells = out / dataset / "cells"
    root = build_slices(out / dataset / "data" / dataset)
    bundle = Path(__file__).resolve().parents[2] / "bundles" / "dka_mni152_tissue"
    preprocessing = parsed(bundle / "inference.json", "preprocessing", image_size=image_size)
    images = torch.stack([preprocessing({"image": e["image"]})["image"] for e in datalist(root)])
    results = {}
    for fraction in (fractions[0], fractions[-1]):
        models = {}
        for row in ERF_ROWS:
            record = json.loads((cells / f"{row}__{fraction:.10g}__fold0.json").read_text(encoding="utf-8"))
            overrides = {k: v for k, v in record["overrides"].items() if k in (
                "method", "method_options", "backbone", "backbone_options", "image_size")}
            model = parsed(bundle / "train.json", "network_def", **overrides)
            load_adapters(model, record["adapters"])
            models[f"{row} ({record['train_count']} slices)"] = model.eval()
        path, ratios = compare_erf(models, images, out / f"erf_{fraction:g}.png")
        results[str(fraction)] = {"figure": str(path), "ratios": ratios}
        echo(f"ERF at fraction {fraction}: {path}")
    (out / "erf.json").write_text(json.dumps(results, indent=1, default=str), encoding="utf-8")
    return results


def summary(out: Path) -> str:
    """``out/evidence.md``: the parts' tables and the ERF ratios, as they stand."""
    parts = [f"# Evidence: the papers' comparison on real MRI ({time.strftime('%Y-%m-%d')})", ""]
    for part, (dataset, _, _) in PARTS.items():
        table = out / dataset / "protocol.md"
        if table.is_file():
            parts += [f"## {part.upper()}: {dataset}", "", table.read_text(encoding="utf-8"),
                      f"![Dice against training size]({dataset}/protocol.png)", ""]
    erf = out / "erf.json"
    if erf.is_file():
        parts += ["## Effective receptive fields (2D, fold 0)", ""]
        for fraction, result in json.loads(erf.read_text(encoding="utf-8")).items():
            parts += [f"Fraction {fraction}: ![ERF]({Path(result['figure']).name})", "", "```",
                      json.dumps(result["ratios"], indent=1), "```", ""]
    text = "\n".join(parts)
    (out / "evidence.md").write_text(text, encoding="utf-8")
    return text


def configure(parser: argparse.ArgumentParser) -> None:
    parser.description = __doc__
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--out", default="docs/evidence", help="output folder (default docs/evidence)")
    parser.add_argument("--only", choices=("2d", "3d", "erf"), action="append",
                        help="run only this part (repeatable; default: 2d, 3d and erf)")
    parser.add_argument("--steps", type=int, default=STEPS, help=f"optimiser steps per cell (default {STEPS})")
    parser.add_argument("--image-size", type=int, default=IMAGE_SIZE,
                        help=f"slice size in pixels, LiteMedSAM's input (default {IMAGE_SIZE})")
    parser.add_argument("--folds", type=int, default=FOLDS, help=f"folds per size (default {FOLDS})")
    parser.set_defaults(func=_run)


def _run(args) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    parts = args.only or ["2d", "3d", "erf"]
    for part in ("2d", "3d"):
        if part in parts:
            run_part(part, out, args.steps, args.image_size, args.folds)
    if "erf" in parts:
        erf_comparison(out, args.image_size)
    print(summary(out))
    return 0
