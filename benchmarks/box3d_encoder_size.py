"""Can 3D box propagation encode its slices at 128 x 128 instead of LiteMedSAM's 256 x 256?

    python benchmarks/box3d_encoder_size.py      # ~20 min on 2 cores, writes results/box3d_encoder_size.json

The image encoder is nearly all of a propagation's time, and at 128 x 128 it does about a
quarter of the work. Its weights do not depend on the input size (TinyViT's token grids scale
with it, `medadapt.backbones.litemedsam.set_input_size`), and SAM's prompt encoder and mask
decoder work on any embedding grid once the prompt encoder is told the grid and the input size.
LiteMedSAM was trained at 256 only, so `build_prompt_parts` refuses other sizes; this benchmark
builds the 128 model by hand to measure whether accuracy allows the shortcut.

For nilearn's MNI152 brain at 4 mm, at 2 mm and at 2 mm centred in 128 x 128 x 100 (the volume
of `benchmarks/run.py --only box3d`), on each slicing axis, both encoder sizes propagate the
brain mask's box on the brain's middle slice with the default rules (as
benchmarks/box3d_mni152.py does), and the upper bound gives the brain's box on every slice.
Reported per row: Dice propagated, on the prompted slice and of the upper bound, the slices
kept and the seconds (2 CPU threads, default precision).
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import torch

import medadapt
from box3d_mni152 import measure, mni152_volume_and_brain, pad_to
from medadapt.models.box_prompt import BoxPromptSegmenter

HERE = Path(__file__).resolve().parent
VOLUMES = {"4mm": (4, None), "2mm": (2, None), "2mm-128x128x100": (2, (128, 128, 100))}


def box_model_at(size: int, full: BoxPromptSegmenter) -> BoxPromptSegmenter:
    """``full`` (LiteMedSAM at 256 with DKA) with its encoder built for ``size`` x ``size`` and
    its prompt encoder told the smaller grid; the prompt encoder and mask decoder keep their weights."""
    if size == full.backbone.img_size:
        return full
    encoder = medadapt.create_model("segmentation", backbone="litemedsam", num_classes=2, method="dka",
                                    backbone_options={"img_size": size}).backbone
    encoder.load_state_dict(full.backbone.state_dict())
    prompt_encoder = copy.deepcopy(full.prompt_encoder)
    prompt_encoder.image_embedding_size = (size // 4, size // 4)
    prompt_encoder.input_image_size = (size, size)
    return BoxPromptSegmenter(encoder, prompt_encoder, full.mask_decoder).eval()


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(HERE / "results" / "box3d_encoder_size.json"), help="JSON file to write")
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 128], help="encoder input sizes")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    full = medadapt.create_model("box_segmentation", backbone="litemedsam").eval()
    models = {size: box_model_at(size, full) for size in args.sizes}
    rows = []
    for name, (resolution, pad) in VOLUMES.items():
        volume, brain = mni152_volume_and_brain(resolution)
        if pad:
            volume, brain = pad_to(volume, pad), pad_to(brain, pad)
        for axis in (2, 0, 1):
            for size, model in models.items():
                result = measure(model, volume, brain, axis)
                row = {"volume": name, "shape": list(volume.shape), "axis": axis, "encoder_size": size,
                       "dice_propagated": result["dice_propagated"],
                       "dice_on_the_prompted_slice": result["dice_on_the_prompted_slice"],
                       "dice_upper_bound": result["dice_upper_bound"],
                       "propagated_slices": result["propagated_slices"], "brain_slices": result["brain_slices"],
                       "seconds_propagated": result["seconds_propagated"]}
                print(json.dumps(row), flush=True)
                rows.append(row)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"command": "python benchmarks/box3d_encoder_size.py", "threads": torch.get_num_threads(),
                               "rows": rows}, indent=1) + "\n")
    print("\n| volume | axis | encoder | Dice propagated | prompted slice | upper bound | slices (brain) | s |")
    print("|---|---|---|---:|---:|---:|---|---:|")
    for r in rows:
        print(f"| {r['volume']} | {r['axis']} | {r['encoder_size']} | {r['dice_propagated']:.3f} | "
              f"{r['dice_on_the_prompted_slice']:.3f} | {r['dice_upper_bound']:.3f} | "
              f"{r['propagated_slices'][0]}-{r['propagated_slices'][1]} ({r['brain_slices'][0]}-{r['brain_slices'][1]}) | "
              f"{r['seconds_propagated']:.1f} |")
    return rows


if __name__ == "__main__":
    main()
