"""``run_protocol``: the papers' table, methods x data fractions x folds, on one fixed test set.

For a dataset preset the runner

1. builds the datalist (the real dataset under ``root``, else the embedded demo) and calls
   ``make_splits`` ONCE with a fixed seed: one fixed test set for every cell, and per fraction
   ``folds`` training subsets of the remaining pool (stratified, grouped, at least one image
   per class), written to ``<out>/splits.json``;
2. builds each method's model once to count its trainable parameters (and, with
   ``iso_params``, to pick its bottleneck / rank / prompt length closest to the budget);
3. runs every (method, fraction, fold) cell: a fresh model (the backbone is loaded once and
   copied; head and adapters seeded by (seed, fold), so all methods of a fold start from the
   same head and see the same batches), AdamW with the adapters at ``lr_adapter`` and the head
   at ``lr_head`` (``medadapt.param_groups``), cosine schedule, the preset's MONAI transforms;
   then evaluates on the fixed test set and stores the cell as one JSON file (atomically), so a
   rerun skips it;
4. writes the table (mean ± std over folds per method and fraction, with the absolute training
   counts and the trainable parameters) as Markdown and CSV after every cell.

Metrics: accuracy and balanced accuracy (mean recall over the classes present in the test
set) for classification; Dice for segmentation (binary masks: sigmoid > 0.5, images whose
reference mask is empty are left out of the mean, as MONAI's ``ignore_empty``; several
classes: argmax, Dice per foreground class averaged).
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from medadapt.io import atomic_write_text
from medadapt.protocol import report
from medadapt.protocol.presets import ProtocolPreset, get_preset, prepare_dataset

CELL_FORMAT = "medadapt-protocol-cell/1"
DEFAULT_METHODS = ("dka", "lka", "adapter", "lora", "linear")
DEFAULT_FRACTIONS = (0.0063, 0.0125, 1.0)
# Options that set a method's size, searched by iso_params (first one the method has).
SIZE_OPTIONS = ("bottleneck", "rank", "num_tokens")
# Without --root and --backbone: a small random-weight ViT, so the demo table takes minutes.
QUICK_BACKBONE = "timm:vit_tiny_patch16_224"
QUICK_BACKBONE_OPTIONS = {"depth": 4}
DEMO_IMAGE_SIZE = 64
# Test sets up to this many samples are transformed once and kept in memory for all cells.
CACHE_TEST_LIMIT = 256
DECODER_CHANNELS = 32  # create_model's default


class ProtocolTable(list):
    """The table rows (a list of dicts, one per method and fraction) plus what the run did.

    Attributes:
        ran: ids of the cells trained in this call.
        skipped: ids of the cells found finished in ``out`` and not run again.
        files: {"markdown", "csv", "json", "splits", "cells"} paths.
        markdown: the Markdown report.
    """

    def __init__(self, rows=(), ran=(), skipped=(), files=None, markdown=""):
        super().__init__(rows)
        self.ran = list(ran)
        self.skipped = list(skipped)
        self.files = dict(files or {})
        self.markdown = markdown


# ----------------------------------------------------------------------------- argument checks

def check_arguments(dataset: str, task: str | None, methods, fractions, folds, epochs, steps, iso_params,
                    batch_size, image_size, method_options) -> tuple[ProtocolPreset, str, list[str], list[float]]:
    """Validate everything before any data or model is touched; errors name the option."""
    from medadapt.adapters import list_methods

    preset = get_preset(dataset)
    task = task or preset.tasks[0]
    if task not in preset.tasks:
        raise ValueError(f"task (--task): dataset {dataset!r} supports {list(preset.tasks)}, not {task!r}")
    methods = [str(m) for m in (methods or [])]
    if not methods:
        raise ValueError("methods (--methods): give at least one method")
    known = list_methods()
    for method in methods:
        if method not in known:
            raise ValueError(f"methods (--methods): unknown method {method!r}; choose from {known}")
    if len(set(methods)) != len(methods):
        raise ValueError(f"methods (--methods): {methods} repeats a method")
    if not fractions:
        raise ValueError("fractions (--fractions): give at least one fraction in (0, 1]")
    checked = []
    for f in fractions:
        try:
            value = float(f)
        except (TypeError, ValueError):
            raise ValueError(f"fractions (--fractions): {f!r} is not a number") from None
        if math.isnan(value) or not 0.0 < value <= 1.0:
            raise ValueError(f"fractions (--fractions): {f} is not in (0, 1]; a fraction is the share of the training pool")
        checked.append(value)
    if len(set(checked)) != len(checked):
        raise ValueError(f"fractions (--fractions): {checked} repeats a value")
    for name, value, low in (("folds", folds, 1), ("epochs", epochs, 1), ("batch_size", batch_size, 1)):
        if int(value) < low:
            raise ValueError(f"{name} (--{name.replace('_', '-')}) must be at least {low}, got {value}")
    if steps is not None and int(steps) < 1:
        raise ValueError(f"steps (--steps) must be at least 1, got {steps}")
    if iso_params is not None and int(iso_params) < 1:
        raise ValueError(f"iso_params (--iso-params) must be a positive parameter count, got {iso_params}")
    if image_size is not None and int(image_size) < 8:
        raise ValueError(f"image_size (--image-size) must be at least 8 pixels, got {image_size}")
    for method, options in (method_options or {}).items():
        if method not in methods:
            raise ValueError(f"method_options (--method-option): {method!r} is not among the methods {methods}")
        if iso_params is not None and size_option(method) in (options or {}):
            raise ValueError(f"method_options (--method-option): {method}:{size_option(method)} conflicts with "
                             "--iso-params, which chooses that size; give one of them")
    return preset, task, methods, checked


def size_option(method: str) -> str | None:
    """The option that sets ``method``'s size (bottleneck, rank, num_tokens), or None."""
    import dataclasses

    from medadapt.adapters import METHODS

    fields = {f.name for f in dataclasses.fields(METHODS[method])}
    return next((name for name in SIZE_OPTIONS if name in fields), None)


def resolved_options(method: str, options: dict) -> dict:
    """The method's full options (defaults filled in), JSON-ready."""
    from medadapt.adapters import make_config

    return make_config(method, dict(options)).options()


# ----------------------------------------------------------------------------- models

class ModelFactory:
    """Task models around ONE loaded backbone: it is built once and deep-copied per model.

    Mirrors ``medadapt.create_model`` for "classification", "segmentation" (2D) and
    "segmentation3d": a Classifier, a Segmenter or a VolumeSegmenter of ``num_slices`` slices
    (decoder width 32, sigmoid for one channel), then ``inject`` (3D adapter variants for
    "segmentation3d", see :meth:`method_options`).
    """

    def __init__(self, task: str, backbone: str, backbone_options: dict, backbone_checkpoint: str | None,
                 num_classes: int, multilabel: bool, seed: int, num_slices: int | None = None):
        if task == "segmentation3d" and not num_slices:
            raise ValueError("task 'segmentation3d' needs the preset's num_slices")
        self.task, self.backbone, self.backbone_options = task, backbone, dict(backbone_options)
        self.backbone_checkpoint, self.num_classes, self.multilabel, self.seed = (
            backbone_checkpoint, num_classes, multilabel, seed)
        self.num_slices = num_slices
        self._pristine: nn.Module | None = None

    def method_options(self, options: dict) -> dict:
        """``options`` with the task's defaults: 3D adapters over the stack for "segmentation3d"."""
        if self.task == "segmentation3d":
            from medadapt.models.volume import stack_adapter_options

            return stack_adapter_options(options, self.num_slices)
        return dict(options)

    def pristine(self) -> nn.Module:
        if self._pristine is None:
            from medadapt.backbones import create_backbone

            # Random (not pretrained) backbones are then the same in every run of the protocol.
            torch.manual_seed(self.seed)
            self._pristine = create_backbone(self.backbone, checkpoint=self.backbone_checkpoint,
                                             **self.backbone_options)
        return self._pristine

    def build(self, method: str, options: dict, seed: int) -> nn.Module:
        from medadapt.injection import inject
        from medadapt.models import Classifier, Segmenter, VolumeSegmenter

        encoder = copy.deepcopy(self.pristine())
        torch.manual_seed(seed)
        if self.task == "classification":
            model = Classifier(encoder, self.num_classes, in_channels=3)
        elif self.task == "segmentation3d":
            model = VolumeSegmenter(encoder, self.num_classes, self.num_slices, in_channels=3,
                                    decoder_channels=DECODER_CHANNELS, multilabel=self.multilabel)
        else:
            model = Segmenter(encoder, self.num_classes, in_channels=3, decoder_channels=DECODER_CHANNELS,
                              multilabel=self.multilabel)
        return inject(model, method, **self.method_options(options))

    def trainable(self, method: str, options: dict) -> dict[str, int]:
        from medadapt.injection import count_parameters

        return count_parameters(self.build(method, options, self.seed))


def iso_size(factory: ModelFactory, method: str, options: dict, budget: int,
             counter: Callable[[str, dict], int] | None = None) -> tuple[int, int]:
    """The size (bottleneck / rank / num_tokens) whose trainable-parameter count is closest to
    ``budget``, counted with ``count_parameters`` on the built model (head included).

    The count is close to affine in the size, so two builds give the slope and the estimate;
    a local search over neighbours then settles on the closest exact count (ties: smaller).
    Returns (size, trainable count).
    """
    option = size_option(method)
    if option is None:
        raise ValueError(f"{method} has no size option to fit --iso-params to")
    count = counter or (lambda m, o: factory.trainable(m, o)["trainable"])
    memo: dict[int, int] = {}

    def at(size: int) -> int:
        if size not in memo:
            memo[size] = count(method, {**options, option: size})
        return memo[size]

    slope = at(2) - at(1)
    start = 1 if slope <= 0 else max(1, round((budget - (at(1) - slope)) / slope))
    best = start
    while True:
        candidates = [s for s in (best - 1, best, best + 1) if s >= 1]
        choice = min(candidates, key=lambda s: (abs(at(s) - budget), s))
        if choice == best:
            return best, at(best)
        best = choice


# ----------------------------------------------------------------------------- data

def _plain(t):
    return t.as_tensor() if hasattr(t, "as_tensor") else torch.as_tensor(t)


class TestSet:
    """The fixed test set as batches; transformed once and cached when small."""

    def __init__(self, entries: list[dict], transform, batch_size: int, num_workers: int = 0):
        from monai.data import DataLoader, Dataset

        self.size = len(entries)
        self.loader = DataLoader(Dataset(entries, transform), batch_size=batch_size, shuffle=False,
                                 num_workers=num_workers)
        self.cached = None
        if self.size <= CACHE_TEST_LIMIT:
            self.cached = [(_plain(b["image"]), _plain(b["label"])) for b in self.loader]

    def __iter__(self):
        if self.cached is not None:
            return iter(self.cached)
        return ((_plain(b["image"]), _plain(b["label"])) for b in self.loader)


def _loss(task: str, multilabel: bool) -> nn.Module:
    if task == "classification":
        return nn.CrossEntropyLoss()
    from monai.losses import DiceCELoss

    if multilabel:
        return DiceCELoss(sigmoid=True, smooth_nr=0, smooth_dr=1e-5)
    return DiceCELoss(softmax=True, to_onehot_y=True, smooth_nr=0, smooth_dr=1e-5)


def _target(task: str, y: torch.Tensor) -> torch.Tensor:
    return y.reshape(-1).long() if task == "classification" else y


# ----------------------------------------------------------------------------- one cell

def train_cell(model: nn.Module, method: str, train_entries: list[dict], transform, task: str, multilabel: bool,
               settings: dict, seed: int) -> dict:
    """Train ``model`` in place on ``train_entries``; returns {"steps", "epochs", "final_loss"}.

    AdamW over ``medadapt.param_groups`` (adapters at ``lr_adapter``, head at ``lr_head``),
    cosine annealing over all steps. ``settings["steps"]`` fixes the number of optimiser steps;
    otherwise ``settings["epochs"]`` passes over the training subset. CLAdapter runs its two
    stages: the second half of the steps trains the whole model at a tenth of the rates.
    """
    from monai.data import DataLoader, Dataset

    from medadapt.injection import param_groups, set_stage

    transform.set_random_state(seed=seed % (2**32))
    generator = torch.Generator().manual_seed(seed)
    batch_size = min(int(settings["batch_size"]), len(train_entries))
    loader = DataLoader(Dataset(train_entries, transform), batch_size=batch_size, shuffle=True,
                        generator=generator, num_workers=int(settings.get("num_workers", 0)))
    total = int(settings["steps"] or int(settings["epochs"]) * len(loader))
    loss_fn = _loss(task, multilabel)

    def optimiser(scale: float = 1.0):
        groups = param_groups(model, lr_adapter=settings["lr_adapter"] * scale, lr_head=settings["lr_head"] * scale)
        opt = torch.optim.AdamW(groups, weight_decay=settings["weight_decay"])
        return opt, torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(total, 1))

    optimizer, scheduler = optimiser()
    stage_two = total // 2 if method == "cladapter" and total >= 2 else None
    model.train()
    step, losses = 0, []
    while step < total:
        for batch in loader:
            if step == stage_two:
                set_stage(model, 2)
                optimizer, scheduler = optimiser(0.1)
            x, y = _plain(batch["image"]), _target(task, _plain(batch["label"]))
            loss = loss_fn(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            losses.append(float(loss.detach()))
            step += 1
            if step >= total:
                break
    return {"steps": total, "epochs": round(total / max(len(loader), 1), 3),
            "final_loss": losses[-1] if losses else None}


@torch.no_grad()
def evaluate(model: nn.Module, test: TestSet, task: str, num_classes: int, multilabel: bool) -> dict:
    """Metrics on the fixed test set (see the module docstring)."""
    model.eval()
    if task == "classification":
        preds, labels = [], []
        for x, y in test:
            preds.append(model(x).argmax(dim=1))
            labels.append(_target(task, y))
        pred, label = torch.cat(preds), torch.cat(labels)
        recalls = {int(c): float((pred[label == c] == c).float().mean()) for c in label.unique()}
        return {"accuracy": float((pred == label).float().mean()),
                "balanced_accuracy": float(np.mean(list(recalls.values()))),
                "recall_per_class": {str(c): r for c, r in sorted(recalls.items())}, "n": int(label.numel())}
    from monai.metrics import DiceMetric

    scores = []
    for x, y in test:
        logits = model(x)
        if multilabel:
            pred, ref = (torch.sigmoid(logits) > 0.5).float(), (y > 0.5).float()
            metric = DiceMetric(include_background=True, reduction="none", ignore_empty=True)
        else:
            eye = torch.eye(num_classes, device=logits.device)
            pred = eye[logits.argmax(dim=1)].movedim(-1, 1)
            ref = eye[y[:, 0].long()].movedim(-1, 1)
            metric = DiceMetric(include_background=False, reduction="none", ignore_empty=True)
        scores.append(metric(pred, ref))
    per_image = torch.cat(scores)  # (N, classes)
    per_class = torch.nanmean(per_image, dim=0)
    dice = float(torch.nanmean(per_class))
    return {"dice": None if math.isnan(dice) else dice,
            "dice_per_class": [None if math.isnan(float(v)) else float(v) for v in per_class],
            "n": int(per_image.shape[0]), "n_scored": int((~torch.isnan(per_image)).any(dim=1).sum())}


# ----------------------------------------------------------------------------- the run

def cell_id(method: str, fraction: float, fold: int) -> str:
    return f"{method}__{fraction:.10g}__fold{fold}"


def _digest(value: Any) -> str:
    return hashlib.sha1(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]


def _fold_seed(seed: int, fold: int) -> int:
    return int(np.random.SeedSequence([int(seed), int(fold)]).generate_state(1)[0])


def _echo_default(message: str) -> None:
    from tqdm import tqdm

    tqdm.write(message, file=sys.stderr)


def _json_ready(value: Any) -> Any:
    """``value`` as it reads back from JSON (tuples become lists), so stored settings compare equal."""
    return json.loads(json.dumps(value, default=str))


def _differences(old: dict, new: dict) -> list[str]:
    return sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))


def _make_run_splits(preset: ProtocolPreset, task: str, datalist: list[dict], root: str, fractions, folds, seed,
                     test_fraction) -> dict:
    """make_splits once for every fraction and fold; a preset's own fixed test set if it has one."""
    from medadapt.data.splits import check_no_leakage, make_splits

    label_key = preset.stratify_key if task == "classification" else None
    if preset.partition is None:
        splits = make_splits(datalist, fractions, folds=folds, seed=seed, test_fraction=test_fraction,
                             label_key=label_key, root=root, classes=preset.classes, dataset=preset.name)
    else:
        pool, test = preset.partition(datalist)
        splits = make_splits(pool, fractions, folds=folds, seed=seed, test_fraction=preset.pool_holdout,
                             label_key=label_key, root=root, classes=preset.classes, dataset=preset.name)
        base = Path(splits["root"])
        splits["val"] = splits["test"]
        splits["test"] = [{**e, "image": str(Path(e["image"]).resolve().relative_to(base)),
                           "label": str(Path(e["label"]).resolve().relative_to(base))} for e in test]
        splits["counts"] = {**splits["counts"], "val": len(splits["val"]), "test": len(test),
                            "total": splits["counts"]["total"] + len(test)}
        splits["notes"].append(f"the test set is fixed by the {preset.name} preset; the {len(splits['val'])} "
                               "sample(s) make_splits held out of the pool are kept as 'val' and not used")
        check_no_leakage(splits)
    splits["task"] = task
    return splits


def run_protocol(
    dataset: str = "busi",
    task: str | None = None,
    root: str | None = None,
    methods: Sequence[str] = DEFAULT_METHODS,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    folds: int = 3,
    epochs: int = 2,
    steps: int | None = None,
    backbone: str | None = None,
    backbone_options: dict | None = None,
    backbone_checkpoint: str | None = None,
    method_options: dict[str, dict] | None = None,
    iso_params: int | None = None,
    image_size: int | None = None,
    batch_size: int = 4,
    lr_adapter: float = 1e-3,
    lr_head: float = 1e-4,
    weight_decay: float = 1e-4,
    seed: int = 0,
    test_fraction: float = 0.2,
    demo_options: dict | None = None,
    demo_dir: str | None = None,
    out: str = "results",
    overwrite: bool = False,
    progress: bool = True,
    num_workers: int = 0,
    command: str | None = None,
    echo: Callable[[str], None] | None = None,
) -> ProtocolTable:
    """Run (or resume) every (method, fraction, fold) cell and return the table rows.

    Arguments:
        dataset, task: a preset of :mod:`medadapt.protocol.presets` and one of its tasks.
        root: the dataset folder; None builds the embedded demo (``mni152_tissue``: the
            folder to write its slices into, default ``<out>/data``).
        methods, fractions, folds: the grid (fractions in (0, 1] of the training pool).
        epochs, steps: passes over each training subset, or a fixed number of optimiser steps.
        backbone, backbone_options, backbone_checkpoint: see ``medadapt.create_backbone``.
            Default: "litemedsam" on real data; on the demo a small random-weight ViT
            (``QUICK_BACKBONE``) so the demo runs in minutes.
        method_options: {method: {option: value}}.
        iso_params: fit each method's size option to this many trainable parameters.
        image_size: input size (default 64 on the demo, else the preset's 256).
        batch_size, lr_adapter, lr_head, weight_decay: the recipe (AdamW, cosine schedule).
        seed: seed of the splits, backbones and every cell.
        test_fraction: share of each class held out as the fixed test set.
        demo_options, demo_dir: demo generator options and folder (default ``<out>/data``).
        out: output folder (cells/, splits.json, protocol.md, protocol.csv, protocol.json).
        overwrite: re-run finished cells that were computed with other settings (otherwise
            that is an error: use another ``out``).
        progress: show a progress bar over the cells.
        num_workers: DataLoader workers.
        command: the command line, recorded in the report.
        echo: where messages go (default: above the progress bar, on stderr).

    Returns a :class:`ProtocolTable`: the rows, plus ``ran`` / ``skipped`` cell ids and ``files``.
    """
    from tqdm import tqdm

    from medadapt.data.splits import load_split

    echo = echo or _echo_default
    preset, task, methods, fractions = check_arguments(dataset, task, methods, fractions, folds, epochs, steps,
                                                       iso_params, batch_size, image_size, method_options)
    folds = int(folds)
    out = Path(out)
    (out / "cells").mkdir(parents=True, exist_ok=True)
    work_dir = Path(demo_dir) if demo_dir else out / "data"

    # Data and the one split.
    data_root, datalist, is_demo = prepare_dataset(preset, root, work_dir, task, demo_options)
    if is_demo:
        echo(f"no --root: using the embedded {preset.name} demo in {data_root} "
             "(real anatomy, SYNTHETIC lesions: a smoke test of the protocol, not a result)")
    splits = _make_run_splits(preset, task, datalist, data_root, fractions, folds, seed, test_fraction)
    atomic_write_text(out / "splits.json", json.dumps(splits, indent=1))
    test_entries = load_split(splits, part="test")
    fraction_counts = {}
    for record in splits["fractions"]:
        fraction_counts[record["fraction"]] = [f["count"] for f in record["folds"]]

    # Backbone and image size.
    backbone_options = dict(backbone_options or {})
    if backbone is None:
        if is_demo:
            backbone = QUICK_BACKBONE
            size = int(image_size or DEMO_IMAGE_SIZE)
            backbone_options = {**QUICK_BACKBONE_OPTIONS, "img_size": size, **backbone_options}
            echo(f"no --backbone on the demo: using the quick {backbone} {backbone_options} with RANDOM weights; "
                 "pass --backbone litemedsam for the papers' medical-pretrained encoder")
        else:
            backbone = "litemedsam"
    image_size = int(image_size or (DEMO_IMAGE_SIZE if is_demo else preset.default_size))
    num_classes = preset.num_classes(task)
    multilabel = preset.multilabel(task)
    factory = ModelFactory(task, backbone, backbone_options, backbone_checkpoint, num_classes, multilabel, seed,
                           num_slices=preset.num_slices)

    # Each method once: options, size, trainable parameters (and errors before any training).
    method_info: dict[str, dict] = {}
    for method in methods:
        options = dict((method_options or {}).get(method) or {})
        option = size_option(method)
        if iso_params is not None and option is not None:
            size, _ = iso_size(factory, method, options, int(iso_params))
            options[option] = size
        counts = factory.trainable(method, options)
        full = resolved_options(method, factory.method_options(options))
        method_info[method] = {"options": full, "size_option": option, "size": full.get(option) if option else None,
                               "trainable": counts["trainable"], "total": counts["total"]}
        if iso_params is not None:
            note = (f"{option} {full[option]}" if option else "no size option, left as is")
            echo(f"iso-params {iso_params:,}: {method} -> {note}, {counts['trainable']:,} trainable")

    common = {
        "dataset": preset.name, "task": task, "backbone": backbone, "backbone_options": backbone_options,
        "backbone_checkpoint": str(backbone_checkpoint) if backbone_checkpoint else None,
        "image_size": image_size, "epochs": int(epochs), "steps": int(steps) if steps else None,
        "batch_size": int(batch_size), "lr_adapter": float(lr_adapter), "lr_head": float(lr_head),
        "weight_decay": float(weight_decay), "seed": int(seed), "test_fraction": float(test_fraction),
        "demo_options": dict(demo_options or {}), "iso_params": int(iso_params) if iso_params else None,
        "test_digest": _digest(splits["test"]),
    }
    common = _json_ready(common)
    records = {record["fraction"]: record for record in splits["fractions"]}

    files = {"markdown": out / "protocol.md", "csv": out / "protocol.csv", "json": out / "protocol.json",
             "splits": out / "splits.json", "cells": out / "cells"}
    cells: dict[tuple, dict] = {}
    unit = preset.unit
    header = [
        f"# medadapt bench protocol: {preset.name} {task}",
        "",
        f"- command: `{command}`" if command else "- command: run_protocol(...) (Python API)",
        f"- data: {data_root}{' (embedded demo, SYNTHETIC lesions)' if is_demo else ''}; {preset.note}",
        f"- fixed test set: {len(test_entries)} samples (seed {seed}); training pool {records[fractions[0]]['pool']}",
        f"- backbone: {backbone}{' ' + json.dumps(backbone_options) if backbone_options else ''}; input {image_size} px"
        f"{f' x {preset.num_slices} slices' if preset.num_slices else ''}; "
        f"{'steps ' + str(steps) if steps else 'epochs ' + str(epochs)}, batch {batch_size}, AdamW "
        f"(adapters {lr_adapter:g}, head {lr_head:g}, weight decay {weight_decay:g}), cosine schedule",
        f"- folds: {folds}; ± is the sample standard deviation over folds"
        + (f"; iso-params budget {int(iso_params):,} trainable parameters" if iso_params else ""),
    ]

    def write_tables() -> tuple[list[dict], str]:
        rows = report.build_rows(methods, fractions, folds, method_info, cells, fraction_counts, task, unit)
        seconds = sum(c.get("seconds", 0.0) for c in cells.values())
        notes = [f"{len(cells)} of {len(methods) * len(fractions) * folds} cells finished; "
                 f"{seconds / 60:.1f} min of cell time (training + test) in total",
                 "trainable parameters include the task head (and decoder)",
                 *splits.get("notes", [])]
        markdown = report.markdown_report(rows, task, header, notes)
        atomic_write_text(files["markdown"], markdown)
        atomic_write_text(files["csv"], report.csv_text(rows, task))
        atomic_write_text(files["json"], json.dumps({"settings": common, "methods": method_info, "rows": rows,
                                                     "command": command}, indent=1, default=str))
        return rows, markdown

    grid = [(m, f, k) for f in fractions for k in range(folds) for m in methods]
    ran, skipped = [], []
    test_set = None
    bar = tqdm(grid, desc="protocol cells", unit="cell", disable=not progress, file=sys.stderr)
    for method, fraction, fold in bar:
        ident = cell_id(method, fraction, fold)
        path = out / "cells" / f"{ident}.json"
        train_rel = records[fraction]["folds"][fold]["train"]
        settings = _json_ready({**common, "method_options": method_info[method]["options"],
                                "train_digest": _digest(train_rel)})
        if path.is_file():
            stored = json.loads(path.read_text())
            if stored.get("settings") == settings:
                cells[(method, fraction, fold)] = stored
                skipped.append(ident)
                echo(f"skipping finished cell {method} / {report.percent_label(fraction)} / fold {fold} ({path})")
                continue
            if not overwrite:
                raise ValueError(
                    f"out (--out): {path} holds a finished cell computed with other settings "
                    f"({', '.join(_differences(stored.get('settings', {}), settings))}); use another --out, "
                    "or --overwrite to recompute such cells")
        bar.set_postfix_str(f"{method} {report.percent_label(fraction)} fold {fold}")
        if test_set is None:
            test_set = TestSet(test_entries, preset.transforms(False, task, image_size), int(batch_size), num_workers)
        start = time.perf_counter()
        cell_seed = _fold_seed(seed, fold)
        model = factory.build(method, method_info[method]["options"], cell_seed)
        train_entries = load_split(splits, fraction, fold, part="train")
        training = train_cell(model, method, train_entries, preset.transforms(True, task, image_size), task,
                              multilabel, {**settings, "num_workers": num_workers}, cell_seed)
        trained = time.perf_counter()
        metrics = evaluate(model, test_set, task, num_classes, multilabel)
        done = time.perf_counter()
        record = {
            "format": CELL_FORMAT, "method": method, "fraction": fraction, "fold": fold, "settings": settings,
            "train_count": len(train_entries), "train": train_rel, "test_count": len(test_entries),
            "trainable": method_info[method]["trainable"], "total": method_info[method]["total"],
            "metrics": metrics, "training": training, "seconds": round(done - start, 2),
            "train_seconds": round(trained - start, 2), "test_seconds": round(done - trained, 2),
            "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        atomic_write_text(path, json.dumps(record, indent=1))
        cells[(method, fraction, fold)] = record
        ran.append(ident)
        write_tables()
    bar.close()
    rows, markdown = write_tables()
    if skipped:
        echo(f"{len(skipped)} finished cell(s) skipped, {len(ran)} run")
    return ProtocolTable(rows, ran=ran, skipped=skipped, files={k: str(v) for k, v in files.items()},
                         markdown=markdown)

