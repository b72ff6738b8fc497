"""``medadapt erf``: compare the effective receptive fields of adapter methods on real images.

Examples::

    medadapt erf --bundle bundles/dka_busi_cls --method dka --method adapter \\
        --images data/busi_val --checkpoint-dir runs/busi --out erf.png
    medadapt erf --task classification --backbone timm:convnext_tiny \\
        --backbone-checkpoint convnext_tiny.safetensors --method dka --method lka \\
        --images pngs/ --out erf.png --num-images 50 --size 224

Every model is built from the same backbone (random backbones from the same seed), so the
ERFs differ only by their adapters. ``--checkpoint-dir`` holds one ``save_adapters`` folder
per method, named after it (a bundle's own ``adapter_checkpoint`` is not used); without it
the adapters are freshly injected and untrained. NIfTI volumes (3D tasks) are min-max scaled
and cut to their central ``num_slices`` slices on the model's slice axis.
"""

from __future__ import annotations

import argparse
import inspect
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from medadapt.analysis.erf import (
    RATIO_SCALES,
    format_ratios,
    high_contribution_area_ratio,
    measure_erfs,
    plot_erfs,
    scaled_for_ratio,
)
from medadapt.models import ChannelMapping, VolumeSegmenter, create_model

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
VOLUME_SUFFIXES = (".nii", ".nii.gz")
BUNDLE_CONFIG = "train.json"
# create_model arguments that describe the network; adapter choices come from the command line.
_NETWORK_KEYS = set(inspect.signature(create_model).parameters) - {"method", "method_options", "adapter_checkpoint"}


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``erf`` subcommand to ``subparsers``."""
    parser = subparsers.add_parser(
        "erf",
        help="effective receptive fields of adapter methods, drawn side by side with area ratios",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    source = parser.add_argument_group("model (a bundle, or the create_model arguments)")
    source.add_argument("--bundle", help=f"bundle folder; its {BUNDLE_CONFIG} network_def gives the network")
    source.add_argument("--task", help="task for create_model (overrides the bundle's)")
    source.add_argument("--backbone", help="backbone name for create_model (overrides the bundle's)")
    source.add_argument("--backbone-option", action="append", default=[], metavar="KEY=VALUE",
                        help="backbone option, VALUE parsed as JSON when it can be (repeatable)")
    source.add_argument("--backbone-checkpoint", help="pretrained backbone weights file")
    source.add_argument("--num-classes", type=int, help="classes (default: the bundle's, else 2)")
    source.add_argument("--num-slices", type=int, help="slices per patch for segmentation3d")
    parser.add_argument("--method", action="append", default=[], help="adapter method (repeatable; "
                        "default: the bundle's method)")
    parser.add_argument("--checkpoint-dir", help="folder with one save_adapters folder per method, named after it")
    parser.add_argument("--images", required=True, help="folder of PNG/JPG images (2D) or NIfTI volumes (3D)")
    parser.add_argument("--out", required=True, help="output PNG")
    parser.add_argument("--num-images", type=int, default=50, help="images to average over (default 50)")
    parser.add_argument("--size", type=int, help="input size in pixels (default: the backbone's, else 224)")
    parser.add_argument("--batch-size", type=int, default=4, help="images per backward pass (default 4)")
    parser.add_argument("--ratio-scale", choices=RATIO_SCALES, default="log",
                        help="area ratios on log10(ERF + 1) as RepLKNet reports them (default) or on the raw ERF")
    parser.add_argument("--seed", type=int, default=0, help="seed for random (non-pretrained) weights (default 0)")
    parser.set_defaults(func=run)
    return parser


# ----------------------------------------------------------------------------- model settings

def read_bundle_network(bundle: str | Path) -> dict[str, Any]:
    """The create_model arguments in ``<bundle>/train.json``'s ``network_def``, references resolved.

    Only the keys of ``network_def`` are parsed; nothing else in the bundle is instantiated.
    """
    from monai.bundle import ConfigParser

    path = Path(bundle) / BUNDLE_CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"bundle config {path} does not exist")
    parser = ConfigParser()
    parser.read_config(str(path))
    if "network_def" not in parser.get():
        raise ValueError(f"{path} has no network_def")
    raw = parser.get("network_def")
    if not isinstance(raw, dict):
        raise ValueError(f"network_def in {path} is not a dict of create_model arguments")
    # Key by key with instantiate=False: "@" references resolve, no component is built.
    return {key: parser.get_parsed_content(f"network_def::{key}", instantiate=False)
            for key in raw if not key.startswith("_")}


def parse_option(text: str) -> tuple[str, Any]:
    """``"key=value"`` with value parsed as JSON where possible (``depths=[1,1,1,1]``, ``img_size=64``)."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise ValueError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key.strip(), json.loads(value)
    except json.JSONDecodeError:
        return key.strip(), value
    except RecursionError:  # not a ValueError: it would reach the user as a traceback
        raise ValueError(f"option {key.strip()!r}: JSON nested too deeply to read") from None


def network_settings(args: argparse.Namespace) -> tuple[dict[str, Any], str | None, dict[str, Any]]:
    """(create_model network kwargs, the bundle's method, the bundle's method options)."""
    bundle = read_bundle_network(args.bundle) if args.bundle else {}
    settings = {k: v for k, v in bundle.items() if k in _NETWORK_KEYS}
    overrides = {"task": args.task, "backbone": args.backbone, "backbone_checkpoint": args.backbone_checkpoint,
                 "num_classes": args.num_classes, "num_slices": args.num_slices}
    settings.update({k: v for k, v in overrides.items() if v is not None})
    if args.backbone_option:
        settings["backbone_options"] = {**(settings.get("backbone_options") or {}),
                                        **dict(parse_option(o) for o in args.backbone_option)}
    if "task" not in settings:
        raise ValueError("give --task (and --backbone), or --bundle with a network_def naming the task")
    return settings, bundle.get("method"), dict(bundle.get("method_options") or {})


def build_model(settings: dict[str, Any], method: str, options: dict[str, Any],
                checkpoint_dir: str | None, seed: int) -> nn.Module:
    """One model for ``method``, with its trained adapters from ``checkpoint_dir/<method>`` if given."""
    from medadapt.checkpoint import load_adapters, read_adapter_config
    from medadapt.injection import set_stage

    folder = None
    if checkpoint_dir:
        folder = Path(checkpoint_dir) / method
        if not folder.is_dir():
            raise FileNotFoundError(f"no adapter folder {folder} for method {method!r} in --checkpoint-dir")
        config = read_adapter_config(folder)
        if config["method"] != method:
            raise ValueError(f"{folder} holds {config['method']!r} adapters, not {method!r}")
        options = config["options"]
    # The same seed for every method: a random backbone is then the same backbone in each model.
    torch.manual_seed(seed)
    try:
        model = create_model(method=method, method_options=options, **settings)
    except TypeError as error:  # an option the backbone or model does not take
        raise ValueError(f"cannot build the {method!r} model with these options: {error}") from None
    if folder is not None:
        if config.get("stage", 1) != 1:
            set_stage(model, config["stage"])
        load_adapters(model, folder)
    return model.eval()


# ----------------------------------------------------------------------------- images

def _input_channels(model: nn.Module) -> int:
    stem = model.stem if hasattr(model, "stem") else None
    return stem.in_channels if isinstance(stem, ChannelMapping) else model.backbone.in_channels


def _files(folder: str | Path, suffixes: tuple[str, ...], limit: int) -> list[Path]:
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist")
    files = sorted(p for p in root.iterdir() if p.is_file() and p.name.lower().endswith(suffixes))
    if not files:
        raise FileNotFoundError(f"no {'/'.join(suffixes)} files in {root}")
    return files[:limit]


def load_images(folder: str | Path, size: int, limit: int, channels: int = 3) -> torch.Tensor:
    """(N, channels, size, size) images in [0, 1] from PNG/JPG files (RGB, or grey for 1 channel)."""
    from PIL import Image

    if channels not in (1, 3):
        raise ValueError(f"PNG/JPG images give 1 or 3 channels; the model takes {channels}")
    mode = "L" if channels == 1 else "RGB"
    images = []
    for path in _files(folder, IMAGE_SUFFIXES, limit):
        try:
            with Image.open(path) as image:
                array = np.asarray(image.convert(mode).resize((size, size), Image.BILINEAR), dtype=np.float32)
        except (OSError, SyntaxError, ValueError) as error:  # PIL's errors for unreadable files
            raise ValueError(f"{path} is not a readable image: {error}") from None
        images.append(torch.from_numpy(array / 255.0).reshape(size, size, channels).permute(2, 0, 1))
    return torch.stack(images)


def _volume_patch(data: np.ndarray, num_slices: int, slice_axis: int, size: int) -> torch.Tensor:
    """(C, X, Y, Z) in [0, 1]: the central ``num_slices`` slices, resized in-plane to ``size``."""
    volume = torch.from_numpy(np.asarray(data, dtype=np.float32))
    volume = volume.movedim(-1, 0) if volume.ndim == 4 else volume[None]  # NIfTI keeps channels last
    low, high = volume.min(), volume.max()
    volume = (volume - low) / (high - low).clamp_min(1e-8)
    stack = volume.movedim(1 + slice_axis, 1)
    depth = stack.shape[1]
    if depth < num_slices:
        raise ValueError(f"volume has {depth} slices on axis {slice_axis}, fewer than num_slices={num_slices}")
    start = (depth - num_slices) // 2
    stack = F.interpolate(stack[None, :, start:start + num_slices], size=(num_slices, size, size),
                          mode="trilinear", align_corners=False)[0]
    return stack.movedim(1, 1 + slice_axis)


def load_volumes(folder: str | Path, size: int, limit: int, num_slices: int, slice_axis: int,
                 channels: int) -> torch.Tensor:
    """(N, channels, X, Y, Z) patches in [0, 1] from NIfTI volumes (one channel repeated if needed)."""
    import nibabel as nib

    patches = []
    for path in _files(folder, VOLUME_SUFFIXES, limit):
        try:
            data = nib.load(str(path)).get_fdata()
        except Exception as error:  # nibabel, gzip and zlib raise many types for bad files
            raise ValueError(f"{path} is not a readable NIfTI volume ({type(error).__name__}: {error})") from None
        patch = _volume_patch(data, num_slices, slice_axis, size)
        if patch.shape[0] != channels:
            if patch.shape[0] != 1:
                raise ValueError(f"{path} has {patch.shape[0]} channels; the model takes {channels}")
            patch = patch.expand(channels, *patch.shape[1:])
        patches.append(patch)
    return torch.stack(patches)


def load_inputs(model: nn.Module, args: argparse.Namespace) -> torch.Tensor:
    """The images (or volume patches) from ``--images`` that ``model`` takes."""
    size = args.size or model.backbone.img_size or 224
    channels = _input_channels(model)
    if isinstance(model, VolumeSegmenter):
        return load_volumes(args.images, size, args.num_images, model.num_slices, model.slice_axis, channels)
    return load_images(args.images, size, args.num_images, channels)


# ----------------------------------------------------------------------------- command

def run(args: argparse.Namespace) -> int:
    """Run ``medadapt erf`` with parsed ``args``."""
    settings, bundle_method, bundle_options = network_settings(args)
    methods = args.method or ([bundle_method] if bundle_method else [])
    if not methods:
        raise ValueError("give at least one --method (or a bundle whose network_def names one)")
    for option in ("num_images", "batch_size", "size", "num_slices"):
        value = getattr(args, option)
        if value is not None and value < 1:
            raise ValueError(f"--{option.replace('_', '-')} must be >= 1, got {value}")
    models = {m: build_model(settings, m, bundle_options if m == bundle_method else {}, args.checkpoint_dir, args.seed)
              for m in dict.fromkeys(methods)}
    images = load_inputs(next(iter(models.values())), args)
    try:
        erfs, profiles = measure_erfs(models, images, args.batch_size)
    except RuntimeError as error:  # torch's error for inputs the network cannot take
        raise ValueError(f"the model cannot run on inputs of shape {tuple(images.shape[1:])} (--size): "
                         f"{str(error).splitlines()[0]}") from None
    ratios = {m: high_contribution_area_ratio(scaled_for_ratio(erf, args.ratio_scale)) for m, erf in erfs.items()}
    path = plot_erfs(erfs, args.out, ratios, profiles or None)
    if not args.checkpoint_dir:
        print("note: no --checkpoint-dir: the adapters are freshly injected and untrained; methods whose "
              "update starts at zero show the backbone's own ERF")
    print(f"high-contribution area ratios ({args.ratio_scale} scale, {len(images)} images of "
          f"{'x'.join(str(n) for n in images.shape[2:])}; central square side / share of the image):")
    print(format_ratios(ratios))
    for method, profile in profiles.items():
        offsets = range(-(len(profile) // 2), len(profile) - len(profile) // 2)
        print(f"{method}: through-slice profile (slice offset: share) "
              + ", ".join(f"{o:+d}: {share:.3f}" for o, share in zip(offsets, profile)))
    print(f"wrote {path}")
    return 0
