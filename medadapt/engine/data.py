"""What the bundles' ``data`` and ``datalist`` items call: the datasets, checked and split.

Everything about a dataset comes from its preset (`medadapt.data.get_dataset`); this module
only orders the steps so that every check runs before any training starts.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from pathlib import Path

logger = logging.getLogger("medadapt")

SPLITS_NAME = "splits.json"


# ---------------------------------------------------------------------------- option checks
def check_fraction(fraction, name: str = "fraction") -> float:
    """``fraction`` as a float in (0, 1], or an error naming the option."""
    try:
        value = float(fraction)
    except (TypeError, ValueError):
        raise ValueError(f"option '{name}' must be a number in (0, 1], got {fraction!r}") from None
    if math.isnan(value) or not 0.0 < value <= 1.0:
        raise ValueError(f"option '{name}' must be in (0, 1], got {fraction!r}")
    return value


def check_index(value, name: str, low: int = 0, high: int | None = None) -> int:
    """``value`` as an int in [low, high), or an error naming the option (1.5 is not 1)."""
    if isinstance(value, bool):
        raise ValueError(f"option '{name}' must be a whole number, got {value!r}")
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        value = int(value)
    if not isinstance(value, int):
        raise ValueError(f"option '{name}' must be a whole number, got {value!r}")
    if value < low or (high is not None and value >= high):
        span = f"[{low}, {high})" if high is not None else f">= {low}"
        raise ValueError(f"option '{name}' must be in {span}, got {value}")
    return value


# ---------------------------------------------------------------------------- training data
def prepare_data(
    dataset: str,
    dataset_dir: str | None,
    output_dir: str,
    task: str | None = None,
    fraction: float = 1.0,
    fold: int = 0,
    folds: int = 5,
    seed: int = 0,
    splits_file: str | None = None,
    test_fraction: float = 0.2,
    val_fraction: float = 0.1,
    val_limit: int | str | None = "train",
    demo_options: dict | None = None,
    demo_dir: str | None = None,
    reader_options: dict | None = None,
    check: str = "full",
) -> dict:
    """Datalists of one (fraction, fold) of the low-data protocol, every file checked first.

    With no ``dataset_dir`` the dataset's embedded demo is built in ``demo_dir``. The split (a
    fixed test set, a validation set for choosing checkpoints, stratified and grouped training
    subsets of the rest) is written to ``output_dir/splits.json`` unless ``splits_file`` names
    one made by ``medadapt split`` for the same dataset folder.

    ``val_limit``: how many of the validation samples choose the checkpoint: "train" (default)
    at most as many as the training subset has, since someone with 5 labelled images does not
    have 50 more to validate on (the first ones of the split's validation list, so a smaller
    fraction's are a subset of a larger one's); a number; None for all of them.

    ``check``: "full" reads every voxel of every file the split names (finds truncated files
    and NaNs), "headers" opens them, "none" skips the check (for a caller that checked already).

    Returns {"train", "val", "test": datalists, "root": dataset folder, "counts": {...},
    "demo": bool}. ``counts``: "train", "val", "test" (samples), "fraction" (as requested), "fold",
    and what the training subset really is: "pool" (samples it is drawn from), "actual_fraction"
    (its share of them), "bumped_classes" (class names raised to one sample, the protocol's
    minimum) and "same_count_as" (fractions of the same split with as many training samples).
    """
    from medadapt import data
    from medadapt.data.splits import fraction_record, percent, real_count_notes

    preset = data.get_dataset(dataset)
    task = preset.check_task(task).name
    if check not in ("full", "headers", "none"):
        raise ValueError(f"option 'data_check' must be 'full', 'headers' or 'none', got {check!r}")
    fraction = check_fraction(fraction)
    folds = check_index(folds, "folds", low=1)
    fold = check_index(fold, "fold", 0, folds)
    out = Path(output_dir)
    demo = not dataset_dir
    if demo:
        folder = Path(demo_dir or out / "demo_data") / preset.name
        root = main_process_first(lambda: preset.make_demo(folder, **(demo_options or {})))
        logger.warning("no dataset_dir given: using the embedded %s demo in %s (%s)", preset.name, root,
                       preset.demo_note)
    else:
        root = str(dataset_dir)
        if not Path(root).is_dir():
            raise FileNotFoundError(f"dataset_dir {root} does not exist or is not a folder")
    options = dict(reader_options or {})
    datalist = preset.datalist(root, task=task, **options)

    if splits_file:
        splits = read_splits_file(splits_file, preset.name, task, root, datalist)
        splits_path = Path(splits_file)
    else:
        fixed = preset.fixed_test(datalist)
        pool, test = fixed if fixed is not None else (datalist, None)
        splits = data.make_splits(pool, [fraction], folds=folds, seed=int(seed), test_fraction=test_fraction,
                                  val_fraction=val_fraction, label_key=preset.stratify_key, root=root,
                                  classes=preset.classes, dataset=preset.name, test=test)
        splits["task"] = task
    train = data.load_split(splits, fraction, fold, part="train")
    val = data.load_split(splits, part="val")
    test = data.load_split(splits, part="test")
    if not val:
        raise ValueError(f"the split of {root} has no validation samples: there is nothing to choose a checkpoint "
                         "on; give more data or a larger val_fraction")
    val = limit_validation(val, len(train), val_limit)
    # Every file any part names is checked, the test set included, before training starts.
    if check != "none":
        preset.validate(train + val + test, task, root=root, read_data=check == "full", **options)
    if not splits_file:
        splits_path = main_process_first(lambda: data.save_splits(splits, out / SPLITS_NAME),
                                         others=lambda: out / SPLITS_NAME)
    record = fraction_record(splits, fraction)
    if splits_file:   # a fresh split announced its fractions as it drew them
        for note in real_count_notes(record, preset.unit):
            logger.warning(note)
    counts = {"train": len(train), "val": len(val), "test": len(test), "fraction": fraction, "fold": fold,
              **real_counts(record, fold)}
    logger.info("data: %d training / %d validation / %d test %s (fraction %.4g, fold %d: %s of the pool's %d), "
                "split in %s", len(train), len(val), len(test), preset.unit, fraction, fold,
                percent(counts["actual_fraction"]), counts["pool"], splits_path)
    return {"train": train, "val": val, "test": test, "root": str(root), "counts": counts, "demo": demo}


def real_counts(record: dict, fold: int) -> dict:
    """What fold ``fold`` of a splits file's fraction ``record`` really trains on: the pool it
    is drawn from, its share of it, and the classes raised to one image (by name)."""
    pool = record.get("pool") or 0
    count = record["folds"][fold]["count"]
    return {"pool": pool, "actual_fraction": round(count / pool, 6) if pool else 0.0,
            "bumped_classes": list(record.get("bumped_classes", [])),
            "same_count_as": list(record.get("same_count_as", []))}


def limit_validation(val: list[dict], train_count: int, limit: int | str | None) -> list[dict]:
    """The first ``limit`` of ``val`` ("train": ``train_count``; None: all), at least one."""
    if limit is None:
        return val
    if limit == "train":
        count = train_count
    else:
        count = check_index(limit, "val_limit", low=1)
    count = max(1, count)
    if count < len(val):
        logger.info("validation: the first %d of the split's %d validation samples choose the checkpoint "
                    "(val_limit=%r)", count, len(val), limit)
    return val[:count]


def read_splits_file(path: str, dataset: str, task: str, root: str, datalist: list[dict]) -> dict:
    """A splits file made by ``medadapt split``, checked against the dataset it is used with:
    its dataset, its task and that every file it names is one of ``datalist``."""
    from medadapt.data.splits import FORMAT, load_split

    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"splits_file {file} does not exist")
    try:
        splits = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ValueError(f"splits_file {file} is not a readable JSON file: {error}") from None
    if not isinstance(splits, dict) or splits.get("format") != FORMAT:
        raise ValueError(f"splits_file {file} is not a medadapt splits file (format {FORMAT!r})")
    if splits.get("dataset") not in (None, dataset):
        raise ValueError(f"splits_file {file} was made for dataset {splits.get('dataset')!r}, not {dataset!r}")
    if splits.get("task") not in (None, task):
        raise ValueError(f"splits_file {file} was made for task {splits.get('task')!r}, not {task!r}")
    made_for = Path(str(splits.get("root", ""))).expanduser()
    if made_for.resolve() != Path(root).resolve():
        if made_for.is_dir():
            raise ValueError(f"splits_file {file} was made for the dataset folder {made_for}, not for dataset_dir "
                             f"{root} (another folder); make one for this folder with `medadapt split`")
        logger.warning("splits_file %s was made for %s, which no longer exists: reading its paths under %s",
                       file, made_for, root)
    known = {_image_key(e) for e in datalist}
    parts = [load_split(splits, part="test", root=root), load_split(splits, part="val", root=root)]
    parts += [load_split(splits, r["fraction"], f["fold"], "train", root=root)
              for r in splits.get("fractions", []) for f in r["folds"]]
    foreign = sorted({_image_key(e) for part in parts for e in part} - known)
    if foreign:
        raise ValueError(f"splits_file {file} names {len(foreign)} file(s) that are not cases of dataset_dir {root} "
                         f"(e.g. {foreign[0][0]}); it was made for another folder: make one for this folder with "
                         "`medadapt split`")
    # Paths resolve against this dataset folder from here on.
    splits["root"] = str(Path(root).resolve())
    return splits


def _image_key(entry: dict) -> tuple[str, ...]:
    image = entry["image"]
    paths = image if isinstance(image, (list, tuple)) else [image]
    return tuple(str(Path(p).resolve()) for p in paths)


def main_process_first(fn: Callable, others: Callable | None = None):
    """Run ``fn`` on rank 0 first; then the other ranks run ``others`` (default ``fn``), and
    find rank 0's files in place."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return fn()
    if dist.get_rank() == 0:
        result = fn()
        dist.barrier()
        return result
    dist.barrier()
    return (others or fn)()


# ---------------------------------------------------------------------------- inference data
def inference_datalist(dataset: str, dataset_dir: str | None, output_dir: str, task: str | None = None,
                       demo_options: dict | None = None, demo_dir: str | None = None) -> list[dict]:
    """Every case to predict: ``dataset_dir`` in the official layout (label files optional),
    a plain folder of images / volumes, or a single file; the embedded demo when it is empty.
    """
    from medadapt import data
    from medadapt.data.errors import DatasetError

    preset = data.get_dataset(dataset)
    task = preset.check_task(task).name
    if not dataset_dir:
        root = preset.make_demo(Path(demo_dir or Path(output_dir) / "demo_data") / preset.name,
                                **(demo_options or {}))
        logger.warning("no dataset_dir given: predicting the embedded %s demo in %s (%s)", preset.name, root,
                       preset.demo_note)
        entries = preset.datalist(root, task=task, require_labels=False)
    else:
        root = str(dataset_dir)
        if not Path(root).exists():
            raise FileNotFoundError(f"dataset_dir {root} does not exist")
        try:
            entries = preset.datalist(root, task=task, require_labels=False) if Path(root).is_dir() else []
        except DatasetError:
            entries = []
        if not entries:
            # Not the official layout: plain images or volumes, or one file.
            entries = preset.plain_datalist(root)
    entries = [{k: v for k, v in e.items() if k != "label"} for e in entries]
    if not entries:
        raise ValueError(f"no {preset.name} cases found in {root}")
    preset.validate(entries, task, require_labels=False)
    logger.info("predicting %d %s %s from %s into %s", len(entries), preset.name, preset.unit, root, output_dir)
    return entries


def existing_folder(path: str, what: str = "trained adapters") -> str:
    """``path`` if it is a folder, else a clear error saying how to produce it."""
    if not Path(path).is_dir():
        raise FileNotFoundError(f"no {what} at {path}: run the bundle's train.json first, or point the "
                                f"config at another run (--output_dir DIR)")
    return str(path)


def existing_file(path: str, what: str = "trained model") -> str:
    """``path`` if it is a file, else a clear error saying how to produce it."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"no {what} at {path}: run the bundle's train.json first (it publishes its best "
                                f"model there), or pass --model_file FILE")
    return str(path)
