"""``run_protocol``: the papers' table, methods x data fractions x folds, on one fixed test set.

Every cell is the dataset's bundle, run as a user runs it: its ``train.json`` with overrides
(method and options, fraction, fold, seed, epochs or steps, backbone, learning rates), then
its ``evaluate.json`` on the fixed test set. The runner itself trains nothing; it

1. finds the bundle of the dataset and task (``bundles/<name>/train.json`` whose
   ``dataset_name`` and ``task`` match, or the one given);
2. builds the dataset (the real one under ``root``, else the preset's embedded demo) and
   calls ``make_splits`` ONCE with a fixed seed: one fixed test set and one validation set for
   every cell, and per fraction ``folds`` training subsets of the rest, in ``<out>/splits.json``,
   which every cell reads (``--splits_file``);
3. builds each method's model once through the bundle's ``network_def`` to count its trainable
   parameters (and, with ``iso_params``, to pick the size closest to the budget);
4. runs every (method, fraction, fold) cell not finished yet: the bundle's device (CUDA when
   present), its transforms, losses, schedule, staged fine-tuning and checkpoint choice on the
   validation set; the cell keeps its best adapters in ``<out>/cells/<cell>/adapters/`` and its
   record (settings, the exact overrides, test metrics) in ``<out>/cells/<cell>.json``, written
   atomically, so a rerun skips it. With ``ray`` the cells run as Ray tasks (`medadapt.protocol.ray`);
5. writes the table (mean ± std over folds per method and fraction, with the absolute training
   counts and the trainable parameters) as Markdown and CSV after every cell.

Metrics are the bundle's on the test set: accuracy and balanced accuracy (mean recall) for
classification; mean Dice for segmentation (MONAI's, empty references left out).
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from medadapt.io import atomic_write_text, read_json, read_json_or
from medadapt.protocol import report
from medadapt.protocol.rows import Row, parse_rows, scratch_network

CELL_FORMAT = "medadapt-protocol-cell/2"
PATH_OVERRIDES = ("dataset_dir", "splits_file")  # shown relative to the working folder in the records
DEFAULT_METHODS = ("dka", "lka", "adapter", "lora", "linear")
DEFAULT_FRACTIONS = (0.0063, 0.0125, 1.0)
# Without --root and --backbone: a small random-weight ViT, so the demo table takes minutes.
QUICK_BACKBONE = "timm:vit_tiny_patch16_224"
QUICK_BACKBONE_OPTIONS = {"depth": 4}
DEMO_IMAGE_SIZE = 64
# Test metric of the bundle (after evaluate.json's renaming) -> the table's metric.
TABLE_METRICS = {"test_accuracy": "accuracy", "test_balanced_accuracy": "balanced_accuracy", "test_mean_dice": "dice"}


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


# ----------------------------------------------------------------------------- arguments

def check_arguments(dataset: str, task: str | None, methods, fractions, folds, epochs, steps, iso_params,
                    batch_size, image_size, method_options):
    """Validate everything before any data or model is touched; errors name the option."""
    from medadapt.adapters import list_methods
    from medadapt.data import get_dataset
    from medadapt.data.splits import check_fractions

    try:
        preset = get_dataset(dataset)
    except ValueError as error:
        raise ValueError(f"--dataset: {error}") from None
    try:
        task = preset.check_task(task).name
    except ValueError as error:
        raise ValueError(f"task (--task): {error}") from None
    methods = [str(m) for m in (methods or [])]
    if not methods:
        raise ValueError("methods (--methods): give at least one method")
    rows = parse_rows(methods, list_methods())
    checked = check_fractions(fractions)
    for name, value, low in (("folds", folds, 1), ("epochs", epochs, 1), ("batch_size", batch_size, 1)):
        if value is not None and int(value) < low:
            raise ValueError(f"{name} (--{name.replace('_', '-')}) must be at least {low}, got {value}")
    if steps is not None and int(steps) < 1:
        raise ValueError(f"steps (--steps) must be at least 1, got {steps}")
    if iso_params is not None and int(iso_params) < 1:
        raise ValueError(f"iso_params (--iso-params) must be a positive parameter count, got {iso_params}")
    if image_size is not None and int(image_size) < 8:
        raise ValueError(f"image_size (--image-size) must be at least 8 pixels, got {image_size}")
    by_name = {row.name: row for row in rows}
    for method, options in (method_options or {}).items():
        if method not in by_name or by_name[method].method is None:
            raise ValueError(f"method_options (--method-option): {method!r} is not among the methods {methods}")
        sized = iso_params is not None or by_name[method].iso is not None
        if sized and size_option(by_name[method].method) in (options or {}):
            raise ValueError(f"method_options (--method-option): {method}:{size_option(by_name[method].method)} "
                             "conflicts with iso-parameter sizing, which chooses that size; give one of them")
    return preset, task, rows, checked


def resolved_size(model, option: str | None):
    """The size a built model has: its ``option`` when set, else its bottleneck widths (one
    number when every adapter has the same, else "lowest-highest")."""
    from medadapt.injection import injection_record
    from medadapt.models.scale import adapter_widths

    if option is None:
        return None
    given = injection_record(model)["options"].get(option)
    if given is not None or option != "bottleneck":
        return given
    widths = sorted({b for _, b in adapter_widths(model)})
    if not widths:
        return None
    return widths[0] if len(widths) == 1 else f"{widths[0]}-{widths[-1]}"


def size_option(method: str) -> str | None:
    """The option that sets ``method``'s size (bottleneck, rank, num_tokens), or None."""
    from medadapt.adapters import METHODS

    return getattr(METHODS[method], "size_option", None)


# ----------------------------------------------------------------------------- the bundle

def find_bundle(dataset: str, task: str, bundles: str | Path | None = None) -> Path:
    """The bundle folder whose ``train.json`` trains ``dataset`` for ``task``."""
    from medadapt import bundles as shipped

    root = Path(bundles) if bundles else shipped.ROOT
    found = []
    for train in sorted(root.glob("*/train.json")):
        config = read_json_or(train, {})
        if not isinstance(config, dict):
            continue
        if config.get("dataset_name") == dataset and config.get("task") == task:
            found.append(train.parent)
    if not found:
        raise ValueError(f"--dataset: no bundle in {root} trains {dataset!r} for {task!r} (a bundle's train.json names "
                         "its dataset_name and task); pass --bundle DIR")
    return found[0]


def bundle_settings(bundle: Path) -> set[str]:
    """The top-level settings of a bundle's train config."""
    return set(json.loads((bundle / "train.json").read_text(encoding="utf-8")))


def build_network(bundle: Path, overrides: dict):
    """The model the bundle's ``network_def`` builds with ``overrides`` (not moved to a device)."""
    from medadapt.engine.bundle import parsed

    return parsed(bundle / "train.json", "network_def", **overrides)


def trainable_counts(bundle: Path, overrides: dict) -> dict[str, int]:
    from medadapt.injection import count_parameters

    return count_parameters(build_network(bundle, overrides))


def iso_size(count: Callable[[dict], int], method: str, options: dict, budget: int) -> tuple[int, int]:
    """The size (bottleneck / rank / num_tokens) whose trainable-parameter count is closest to
    ``budget``; ``count(options)`` counts the built model's trainable parameters (head included).

    The count is close to affine in the size, so two builds give the slope and the estimate;
    a local search over neighbours then settles on the closest exact count (ties: smaller).
    Returns (size, trainable count).
    """
    option = size_option(method)
    if option is None:
        raise ValueError(f"{method} has no size option to fit --iso-params to")
    memo: dict[int, int] = {}

    def at(size: int) -> int:
        if size not in memo:
            memo[size] = count({**options, option: size})
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


# ----------------------------------------------------------------------------- one cell

def cell_id(method: str, fraction: float, fold: int) -> str:
    return f"{Row(method, None).file_name}__{fraction:.10g}__fold{fold}"


def run_cell(cell: dict) -> dict:
    """Run one cell: the bundle's train config with the cell's overrides, then its evaluate
    config on the fixed test set; keep the best adapters and write the cell's record.

    ``cell`` holds "bundle", "overrides", "folder" (the cell's output folder), "record_path",
    "record" (the record's fields known before training) and optionally "threads". Plain data,
    so that a Ray worker can run it. Returns the finished record.
    """
    from medadapt.engine.bundle import run_workflow

    bundle, folder = Path(cell["bundle"]), Path(cell["folder"])
    if cell.get("threads"):
        import torch

        torch.set_num_threads(int(cell["threads"]))  # a Ray task's share of the machine
    checkpoints = folder / "checkpoints"
    if folder.exists():
        shutil.rmtree(folder)  # a cell killed half-way starts again from scratch
    overrides = {**cell["overrides"], "output_dir": str(folder), "ckpt_dir": str(checkpoints)}
    start = time.perf_counter()
    run_workflow(bundle / "train.json", **overrides)
    trained = time.perf_counter()
    run_workflow([bundle / "train.json", bundle / "evaluate.json"], **overrides)
    done = time.perf_counter()
    metrics = read_json(folder / "metrics.json")
    run_settings = metrics.get("run", {}).get("settings", {})
    for key in PATH_OVERRIDES:
        if run_settings.get(key):
            run_settings[key] = shown_path(run_settings[key], cell.get("root"))
    if (checkpoints / "best_adapters").is_dir():
        (checkpoints / "best_adapters").replace(folder / "adapters")
    else:  # a network trained from scratch: its whole best model
        (checkpoints / "model.pt").replace(folder / "model.pt")
    shutil.rmtree(checkpoints)
    record = {
        **cell["record"],
        "metrics": {**{name: metrics.get(key) for key, name in TABLE_METRICS.items() if key in metrics},
                    "bundle": metrics},
        "adapters": shown_path(folder / "adapters", cell.get("root")) if (folder / "adapters").is_dir() else None,
        "seconds": round(done - start, 2), "train_seconds": round(trained - start, 2),
        "test_seconds": round(done - trained, 2),
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    atomic_write_text(Path(cell["record_path"]), json.dumps(record, indent=1))
    return record


# ----------------------------------------------------------------------------- the run

def _digest(value: Any) -> str:
    return hashlib.sha1(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _echo_default(message: str) -> None:
    from tqdm import tqdm

    tqdm.write(message, file=sys.stderr)


def _json_ready(value: Any) -> Any:
    """``value`` as it reads back from JSON (tuples become lists), so stored settings compare equal."""
    return json.loads(json.dumps(value, default=str))


def shown_path(path: str | Path, root: str | Path | None = None) -> str:
    """``path`` as the records show it: relative to ``root`` (the working folder) when inside it,
    so that the records of a run inside a repository read, compare and rerun the same in every
    clone of it; absolute otherwise."""
    path = Path(path).resolve()
    try:
        return str(path.relative_to(Path(root or Path.cwd()).resolve()))
    except ValueError:
        return str(path)


def _differences(old: dict, new: dict) -> list[str]:
    return sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))


def describe_row(row: Row, bundle_dir: Path, common: dict, options: dict, iso_params: int | None,
                 done: dict[str, dict], echo: Callable[[str], None]) -> dict:
    """What a row trains: its overrides of the bundle, its options and size, its trainable and
    total parameters (sized to ``iso_params``, or to the row it names, when it says so)."""
    from medadapt.engine.bundle import parsed
    from medadapt.injection import count_parameters, injection_record

    if row.scratch is not None:
        network = scratch_network(row.scratch, 3 if "roi_size" in bundle_settings(bundle_dir) else 2,
                                  int(parsed(bundle_dir / "train.json", "network_def#in_channels", **common)),
                                  int(parsed(bundle_dir / "train.json", "num_classes", **common)))
        # The bundle's recipe with this network: every parameter at the head's rate (it starts from scratch).
        overrides = {"network_def": network, "optimizer#params": "$@network.parameters()",
                     "optimizer#lr": "@lr_head", "feature_cache": False, "export_full_model": True}
        counts = count_parameters(parsed(bundle_dir / "train.json", "network_def", **{**common, **overrides}))
        return {"overrides": overrides, "options": {}, "resolved_options": {}, "network": network,
                "size_option": None, "size": None, **counts}
    option = size_option(row.method)
    base = {**common, "method": row.method}
    budget = done[row.iso]["trainable"] if row.iso is not None else iso_params
    if budget is not None and option is not None:
        size, _ = iso_size(lambda o: trainable_counts(bundle_dir, {**base, "method_options": o})["trainable"],
                           row.method, options, int(budget))
        options[option] = size
    model = build_network(bundle_dir, {**base, "method_options": options})
    counts = count_parameters(model)
    full = injection_record(model)["options"]
    if budget is not None:
        note = f"{option} {full[option]}" if option else "no size option, left as is"
        echo(f"iso-params {int(budget):,}: {row.name} -> {note}, {counts['trainable']:,} trainable")
    return {"overrides": {"method": row.method, "method_options": options}, "options": options,
            "resolved_options": full, "size_option": option, "size": resolved_size(model, option), **counts}


def make_run_splits(preset, task: str, datalist: list[dict], root: str, fractions, folds, seed, test_fraction,
                    val_fraction) -> dict:
    """make_splits once for every fraction and fold (the preset's own test set if it fixes one)."""
    from medadapt.data.splits import make_splits

    fixed = preset.fixed_test(datalist)
    pool, test = fixed if fixed is not None else (datalist, None)
    splits = make_splits(pool, fractions, folds=folds, seed=seed, test_fraction=test_fraction,
                         val_fraction=val_fraction, label_key=preset.stratify_key, root=root, classes=preset.classes,
                         dataset=preset.name, test=test)
    splits["task"] = task
    return splits


def run_protocol(
    dataset: str = "busi",
    task: str | None = None,
    root: str | None = None,
    methods: Sequence[str] = DEFAULT_METHODS,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    folds: int = 3,
    epochs: int | None = None,
    steps: int | None = None,
    backbone: str | None = None,
    backbone_options: dict | None = None,
    backbone_checkpoint: str | None = None,
    method_options: dict[str, dict] | None = None,
    iso_params: int | None = None,
    image_size: int | None = None,
    batch_size: int | None = None,
    lr_adapter: float | None = None,
    lr_head: float | None = None,
    weight_decay: float | None = None,
    seed: int = 0,
    test_fraction: float = 0.2,
    val_fraction: float = 0.1,
    demo_options: dict | None = None,
    demo_dir: str | None = None,
    out: str = "results",
    overwrite: bool = False,
    progress: bool = True,
    num_workers: int = 0,
    bundle: str | None = None,
    ray: str | None = None,
    command: str | None = None,
    echo: Callable[[str], None] | None = None,
) -> ProtocolTable:
    """Run (or resume) every (method, fraction, fold) cell and return the table rows.

    Arguments:
        dataset, task: a dataset (`medadapt.data.datasets()`) and one of its tasks.
        root: the dataset folder; None builds the preset's embedded demo in ``demo_dir``.
        methods, fractions, folds: the grid (fractions in (0, 1] of the training pool); methods
            are table rows (`medadapt.protocol.rows`): a method at its papers' size, a method
            sized to another row (``adapter@iso:dka``), or ``unet`` trained from scratch.
        epochs, steps: passes over each training subset (None: the bundle's ``max_epochs``),
            or a fixed number of optimiser steps (two epochs of half the steps each, so the
            validation set chooses between them).
        backbone, backbone_options, backbone_checkpoint: see ``medadapt.create_backbone``.
            Default: the bundle's (LiteMedSAM) on real data; on a synthetic demo a small
            random-weight ViT (``QUICK_BACKBONE``) so the demo runs in minutes.
        method_options: {method: {option: value}}.
        iso_params: fit each method's size option to this many trainable parameters.
        image_size: input size (default 64 on a synthetic demo, else the bundle's).
        batch_size, lr_adapter, lr_head, weight_decay: the recipe's settings (None: the bundle's).
        seed: seed of the splits; fold k's cells run with seed + k, so that folds that share
            their training images (the whole pool) still differ in initialisation and augmentation.
        test_fraction, val_fraction: shares held out as the fixed test set and as the
            validation set that chooses each cell's checkpoint.
        demo_options, demo_dir: demo generator options and folder (default ``<out>/data``).
        out: output folder (cells/, splits.json, protocol.md, protocol.csv, protocol.json).
        overwrite: re-run finished cells that were computed with other settings (otherwise
            that is an error: use another ``out``).
        progress: show a progress bar over the cells.
        num_workers: DataLoader workers.
        bundle: the bundle folder to run (default: the repository's bundle for the dataset).
        ray: run the cells as Ray tasks: a cluster address, or "local" for a local runtime.
        command: the command line, recorded in the report.
        echo: where messages go (default: above the progress bar, on stderr).

    Returns a :class:`ProtocolTable`: the rows, plus ``ran`` / ``skipped`` cell ids and ``files``.
    """
    from tqdm import tqdm

    echo = echo or _echo_default
    preset, task, rows, fractions = check_arguments(dataset, task, methods, fractions, folds, epochs, steps,
                                                    iso_params, batch_size, image_size, method_options)
    methods = [row.name for row in rows]
    folds = int(folds)
    bundle_dir = Path(bundle) if bundle else find_bundle(preset.name, task)
    settings_known = bundle_settings(bundle_dir)
    out = Path(out)
    (out / "cells").mkdir(parents=True, exist_ok=True)

    # Data and the one split.
    is_demo = not root
    if is_demo:
        data_root = preset.make_demo(Path(demo_dir or out / "data") / preset.name, **(demo_options or {}))
        echo(f"no --root: using the embedded {preset.name} demo in {data_root} ({preset.demo_note})")
    else:
        if not Path(root).is_dir():
            raise FileNotFoundError(f"--root {root} does not exist or is not a folder")
        data_root = str(root)
    synthetic = is_demo and "SYNTHETIC" in preset.demo_note
    datalist = preset.datalist(data_root, task=task)
    splits = make_run_splits(preset, task, datalist, data_root, fractions, folds, seed, test_fraction, val_fraction)
    # Every file read once here; each cell then only opens the files of its split.
    preset.validate(datalist, task, root=data_root)
    atomic_write_text(out / "splits.json", json.dumps(splits, indent=1))
    records = {record["fraction"]: record for record in splits["fractions"]}
    fraction_counts = {f: [k["count"] for k in records[f]["folds"]] for f in fractions}

    # Backbone and image size.
    backbone_options = dict(backbone_options or {})
    if backbone is None and synthetic:
        backbone = QUICK_BACKBONE
        size = int(image_size or DEMO_IMAGE_SIZE)
        backbone_options = {**QUICK_BACKBONE_OPTIONS, "img_size": size, **backbone_options}
        image_size = size
        echo(f"no --backbone on the demo: using the quick {backbone} {backbone_options} with RANDOM weights; "
             "pass --backbone litemedsam for the papers' medical-pretrained encoder")
    common = {"dataset_dir": data_root, "splits_file": str((out / "splits.json").resolve()),
              "folds": folds, "num_workers": int(num_workers),
              "progress": False, "export_full_model": False, "publish": False, "data_check": "headers"}
    # What the command sets; the rest is the bundle's recipe.
    recipe = {"batch_size": batch_size, "lr_adapter": lr_adapter, "lr_head": lr_head, "weight_decay": weight_decay}
    common.update({k: (int(v) if k == "batch_size" else float(v)) for k, v in recipe.items() if v is not None})
    from medadapt.engine.bundle import parsed

    bundle_values = {k: parsed(bundle_dir / "train.json", k) for k in (*recipe, "max_epochs", "val_limit")}
    batch_size, lr_adapter, lr_head, weight_decay = (common.get(k, bundle_values[k]) for k in recipe)
    if backbone is not None:
        common["backbone"] = backbone
        common["backbone_options"] = backbone_options
    if backbone_checkpoint:
        common["backbone_checkpoint"] = str(backbone_checkpoint)
    if image_size is not None:
        if "image_size" not in settings_known:
            raise ValueError(f"image_size (--image-size): bundle {bundle_dir} has no image_size setting")
        common["image_size"] = int(image_size)
    if steps:
        half = math.ceil(int(steps) / 2)
        common.update({"max_epochs": 2, "train#trainer#epoch_length": half, "total_steps": 2 * half,
                       "val_interval": 1, "stage2_epoch": 2})
    else:
        epochs = int(epochs or bundle_values["max_epochs"])
        common.update({"max_epochs": epochs, "val_interval": 1})

    # Each row once: options, size, trainable parameters (and errors before any training);
    # rows sized to another row after the rows they are sized to.
    method_info: dict[str, dict] = {}
    for row in sorted(rows, key=lambda r: r.iso is not None):
        method_info[row.name] = describe_row(row, bundle_dir, common, dict((method_options or {}).get(row.name) or {}),
                                             iso_params, method_info, echo)

    settings = _json_ready({
        "dataset": preset.name, "task": task, "bundle": shown_path(bundle_dir), "backbone": backbone,
        "backbone_options": backbone_options, "backbone_checkpoint": backbone_checkpoint, "image_size": image_size,
        "epochs": int(epochs) if epochs else None, "steps": int(steps) if steps else None,
        "batch_size": int(batch_size), "seeds": "seed + fold", "val_limit": bundle_values["val_limit"],
        "lr_adapter": float(lr_adapter), "lr_head": float(lr_head), "weight_decay": float(weight_decay),
        "seed": int(seed), "test_fraction": float(test_fraction), "val_fraction": float(val_fraction),
        "demo_options": dict(demo_options or {}), "iso_params": int(iso_params) if iso_params else None,
        "test_digest": _digest(splits["test"]), "val_digest": _digest(splits["val"]),
    })

    files = {"markdown": out / "protocol.md", "csv": out / "protocol.csv", "json": out / "protocol.json",
             "plot": out / "protocol.png", "splits": out / "splits.json", "cells": out / "cells"}
    cells: dict[tuple, dict] = {}
    header = [
        f"# medadapt bench protocol: {preset.name} {task}",
        "",
        f"- command: `{command}`" if command else "- command: run_protocol(...) (Python API)",
        f"- data: {data_root}{' (embedded demo: ' + preset.demo_note + ')' if is_demo else ''}",
        f"- bundle: {shown_path(bundle_dir)} (every cell is its train.json with overrides, then its evaluate.json)",
        f"- fixed test set: {len(splits['test'])} {preset.unit}, validation set {len(splits['val'])} (seed {seed}); "
        f"training pool {records[fractions[0]]['pool']}",
        f"- backbone: {backbone or 'the bundle default'}"
        f"{' ' + json.dumps(backbone_options) if backbone_options else ''}"
        f"{f'; input {image_size} px' if image_size else ''}; "
        f"{'steps ' + str(steps) if steps else 'epochs ' + str(epochs)}, batch {batch_size}, AdamW "
        f"(adapters {lr_adapter:g}, head {lr_head:g}, weight decay {weight_decay:g}), cosine schedule",
        f"- folds: {folds} (fold k: training subset k, seed {seed} + k); mean ± sample standard deviation over "
        "folds, and the 95 % confidence interval of the mean (Student's t)"
        + (f"; iso-params budget {int(iso_params):,} trainable parameters" if iso_params else ""),
        "- checkpoint: the best epoch on "
        + ("at most as many validation samples as the training subset has" if bundle_values["val_limit"] == "train"
           else f"the validation set (val_limit {bundle_values['val_limit']})"),
    ]

    def write_tables() -> tuple[list[dict], str]:
        rows = report.build_rows(methods, fractions, folds, method_info, cells, fraction_counts, task, preset.unit)
        seconds = sum(c.get("seconds", 0.0) for c in cells.values())
        notes = [f"{len(cells)} of {len(methods) * len(fractions) * folds} cells finished; "
                 f"{seconds / 60:.1f} min of cell time (training + test) in total",
                 "trainable parameters include the task head (and decoder)",
                 "each cell's checkpoint is chosen on the validation set; the table is the fixed test set",
                 *splits.get("notes", [])]
        if synthetic:
            notes.append(f"embedded demo ({preset.demo_note}): a smoke test of the protocol, not a result")
        markdown = report.markdown_report(rows, task, header, notes, reference=methods[0])
        atomic_write_text(files["markdown"], markdown)
        if any(len(c) for c in cells.values()):
            report.plot(rows, task, files["plot"], f"{preset.name}: {report.task_metrics(task)[0][1]} against training "
                                                    "samples, mean and 95 % CI over folds")
        atomic_write_text(files["csv"], report.csv_text(rows, task))
        atomic_write_text(files["json"], json.dumps({"settings": settings, "methods": method_info, "rows": rows,
                                                     "command": command}, indent=1, default=str))
        return rows, markdown

    pending, skipped = [], []
    for fraction in fractions:
        for fold in range(folds):
            for method in methods:
                ident = cell_id(method, fraction, fold)
                path = out / "cells" / f"{ident}.json"
                train_rel = records[fraction]["folds"][fold]["train"]
                cell_settings = _json_ready({**settings, "method_options": method_info[method]["resolved_options"],
                                             "network": method_info[method].get("network"),
                                             "train_digest": _digest(train_rel)})
                # A cell file that cannot be read (edited, torn by a full disk) is run again.
                stored = read_json_or(path, None) if path.is_file() else None
                if path.is_file() and not isinstance(stored, dict):
                    echo(f"running cell {ident} again: {path} is not a readable cell record")
                elif stored is not None:
                    if stored.get("settings") == cell_settings:
                        cells[(method, fraction, fold)] = stored
                        skipped.append(ident)
                        echo(f"skipping finished cell {method} / {report.percent_label(fraction)} / fold {fold} "
                             f"({path})")
                        continue
                    if not overwrite:
                        raise ValueError(
                            f"out (--out): {path} holds a finished cell computed with other settings "
                            f"({', '.join(_differences(stored.get('settings', {}), cell_settings))}); use another "
                            "--out, or --overwrite to recompute such cells")
                overrides = _json_ready({**common, **method_info[method]["overrides"], "fraction": fraction,
                                         "fold": fold, "seed": int(seed) + fold})
                pending.append({
                    "key": (method, fraction, fold), "bundle": str(bundle_dir.resolve()), "overrides": overrides,
                    "folder": str((out / "cells" / ident).resolve()), "record_path": str(path.resolve()),
                    "root": str(Path.cwd().resolve()),
                    "record": {"format": CELL_FORMAT, "method": method, "fraction": fraction, "fold": fold,
                               "settings": cell_settings,
                               "overrides": {k: shown_path(v) if k in PATH_OVERRIDES and v else v
                                             for k, v in overrides.items()},
                               "train_count": len(train_rel), "train": train_rel, "test_count": len(splits["test"]),
                               "trainable": method_info[method]["trainable"], "total": method_info[method]["total"]},
                })

    bar = tqdm(total=len(pending), desc="protocol cells", unit="cell", disable=not progress, file=sys.stderr)
    ran = []

    def finished(record: dict) -> None:
        key = (record["method"], record["fraction"], record["fold"])
        cells[key] = record
        ran.append(cell_id(*key))
        bar.update(1)
        write_tables()

    if ray:
        from medadapt.protocol.distributed import run_cells_on_ray

        run_cells_on_ray(pending, ray, finished, echo)
    else:
        for cell in pending:
            method, fraction, fold = cell["key"]
            bar.set_postfix_str(f"{method} {report.percent_label(fraction)} fold {fold}")
            finished(run_cell({k: v for k, v in cell.items() if k != "key"}))
    bar.close()
    rows, markdown = write_tables()
    if skipped:
        echo(f"{len(skipped)} finished cell(s) skipped, {len(ran)} run")
    return ProtocolTable(rows, ran=ran, skipped=skipped, files={k: str(v) for k, v in files.items()},
                         markdown=markdown)
