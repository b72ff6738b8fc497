"""What bundle configs call by ``$medadapt.engine...``: data preparation and metric plumbing.

The logic lives here, in Python; the bundle JSON only wires it together.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Callable

import torch

logger = logging.getLogger("medadapt")

SYNTHETIC_NOTE = {
    "brats": "real MNI152 anatomy (nilearn) with SYNTHETIC tumour lesions",
    "busi": "real anatomy images with SYNTHETIC breast-ultrasound-style lesions",
    "isic2018": "real images with SYNTHETIC dermoscopy-style lesions",
    "isic2019": "real images with SYNTHETIC dermoscopy-style lesions",
}


def check_fraction(fraction: float, name: str = "fraction") -> float:
    try:
        value = float(fraction)
    except (TypeError, ValueError):
        raise ValueError(f"option '{name}' must be a number in (0, 1], got {fraction!r}") from None
    if not (0.0 < value <= 1.0) or math.isnan(value):
        raise ValueError(f"option '{name}' must be in (0, 1], got {fraction!r}")
    return value


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
    num_classes: int | None = None,
    demo_options: dict | None = None,
    preset_options: dict | None = None,
    demo_dir: str | None = None,
) -> dict:
    """Datalists for one (fraction, fold) of the low-data protocol, checked before training.

    With no ``dataset_dir`` the dataset's embedded demo is built under ``output_dir``. Every
    file is validated (exists, opens, shapes agree, finite values) before any training starts;
    the split (fixed test set, stratified and grouped training subsets) is written to
    ``output_dir/splits.json`` unless ``splits_file`` names one made by ``medadapt split``.

    Returns {"train": [...], "val": [...], "root": dataset folder, "counts": {...}}.
    """
    from medadapt import data

    fraction = check_fraction(fraction)
    if int(fold) < 0 or int(fold) >= int(folds):
        raise ValueError(f"option 'fold' must be in [0, {folds}), got {fold!r}")
    preset = data.get_preset(dataset)
    out = Path(output_dir)
    if not dataset_dir:
        root = main_process_first(lambda: data.demo.make_demo(
            dataset, Path(demo_dir or out / "demo_data") / dataset, **(demo_options or {})))
        logger.warning("no dataset_dir given: using the embedded %s demo in %s (%s)",
                       dataset, root, SYNTHETIC_NOTE.get(dataset, "demo data"))
    else:
        root = str(dataset_dir)
        if not Path(root).is_dir():
            raise FileNotFoundError(f"dataset_dir {root} does not exist or is not a folder")
    task = task or preset.tasks[0]
    datalist = data.load_datalist(dataset, root, task=task, **(preset_options or {}))
    data.validate_datalist(datalist, preset.validation_task(task), num_classes=num_classes)

    if splits_file:
        splits_path = Path(splits_file)
        if not splits_path.is_file():
            raise FileNotFoundError(f"splits_file {splits_path} does not exist")
        splits = json.loads(splits_path.read_text())
    else:
        label_key = preset.stratify_key if task == "classification" else None
        splits = data.make_splits(datalist, [fraction], folds=int(folds), seed=int(seed),
                                  test_fraction=test_fraction, label_key=label_key,
                                  classes=preset.classes, dataset=dataset)
        splits_path = main_process_first(lambda: data.save_splits(splits, out / "splits.json"),
                                         others=lambda: out / "splits.json")
    train = data.load_split(splits, fraction, int(fold), part="train")
    val = data.load_split(splits, part="val")
    counts = {"train": len(train), "val": len(val), "fraction": fraction, "fold": int(fold)}
    logger.info("data: %d training / %d validation samples (fraction %.4g, fold %d), split in %s",
                len(train), len(val), fraction, int(fold), splits_path)
    return {"train": train, "val": val, "root": str(root), "counts": counts}


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


def select_channel(index: int, keys: tuple[str, str] = ("pred", "label")) -> Callable:
    """An output transform giving one channel of decollated predictions and labels, so MONAI
    metric handlers report a per-region score (TC, WT, ET)."""

    def transform(output):
        items = output if isinstance(output, list) else [output]
        preds = [item[keys[0]][index : index + 1] for item in items]
        labels = [item[keys[1]][index : index + 1] for item in items]
        return preds, labels

    return transform


def class_output(keys: tuple[str, str] = ("pred", "label")) -> Callable:
    """Output transform for ignite's classification metrics: stacked logits and class indices."""

    def transform(output):
        items = output if isinstance(output, list) else [output]
        pred = torch.stack([torch.as_tensor(item[keys[0]]) for item in items])
        label = torch.stack([torch.as_tensor(item[keys[1]]).reshape(-1)[0] for item in items]).long()
        return pred, label

    return transform


def onehot_output(num_classes: int, keys: tuple[str, str] = ("pred", "label")) -> Callable:
    """Output transform for MONAI's confusion-matrix metrics: one-hot argmax and one-hot label."""

    def transform(output):
        pred, label = class_output(keys)(output)
        eye = torch.eye(num_classes, device=pred.device)
        return list(eye[pred.argmax(dim=1)]), list(eye[label])

    return transform


def probability_output(num_classes: int, keys: tuple[str, str] = ("pred", "label")) -> Callable:
    """Output transform for MONAI's ROCAUC: softmax probabilities and one-hot labels."""

    def transform(output):
        pred, label = class_output(keys)(output)
        return list(pred.softmax(dim=1)), list(torch.eye(num_classes, device=pred.device)[label])

    return transform


def report_outputs(output_dir: str, metrics: dict | None = None) -> None:
    """Tell the user where the run's outputs went (called from the bundle's ``finalize``)."""
    out = Path(output_dir).resolve()
    lines = [f"outputs in {out}:"]
    for name in ("models/best_adapters", "models/adapters", "models/model.pt", "models/training_state.pt",
                 "splits.json", "metrics.json", "logs"):
        if (out / name).exists():
            lines.append(f"  {out / name}")
    if metrics:
        lines.append("final metrics: " + ", ".join(f"{k}={float(v):.4f}" for k, v in metrics.items()))
    logger.info("\n".join(lines))


def inference_datalist(dataset: str, dataset_dir: str | None, output_dir: str, task: str | None = None,
                       demo_options: dict | None = None, demo_dir: str | None = None) -> list[dict]:
    """Every case in ``dataset_dir`` (official layout; label files optional) for prediction.

    With no ``dataset_dir`` the embedded demo is used, so the inference config runs as is.
    """
    from medadapt import data

    preset = data.get_preset(dataset)
    task = task or preset.tasks[0]
    if not dataset_dir:
        root = data.demo.make_demo(dataset, Path(demo_dir or Path(output_dir) / "demo_data") / dataset,
                                   **(demo_options or {}))
        logger.warning("no dataset_dir given: predicting the embedded %s demo in %s (%s)",
                       dataset, root, SYNTHETIC_NOTE.get(dataset, "demo data"))
    else:
        root = str(dataset_dir)
        if not Path(root).is_dir():
            raise FileNotFoundError(f"dataset_dir {root} does not exist or is not a folder")
    # Cases without label files are normal at inference.
    datalist = data.load_datalist(dataset, root, task=task, require_labels=False)
    entries = [{k: v for k, v in e.items() if k != "label"} for e in datalist]
    if not entries:
        raise ValueError(f"no {dataset} cases found in {root}")
    logger.info("predicting %d %s cases from %s into %s", len(entries), dataset, root, output_dir)
    return entries


def existing_folder(path: str, what: str = "trained adapters") -> str:
    """``path`` if it is a folder, else a clear error saying how to produce it."""
    if not Path(path).is_dir():
        raise FileNotFoundError(f"no {what} at {path}: run the bundle's train.json first, or point the "
                                f"config at another folder (e.g. --adapter_dir DIR)")
    return str(path)


def setup_logging(output_dir: str) -> None:
    """Log medadapt's and MONAI's messages to the console and to ``output_dir/train.log``."""
    from medadapt.engine.distributed import is_main_process

    if not is_main_process():
        return
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(out / "train.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s: %(message)s"))
    for name in ("medadapt", "ignite.engine.engine.SupervisedTrainer", "ignite.engine.engine.SupervisedEvaluator"):
        log = logging.getLogger(name)
        log.setLevel(logging.INFO)
        if not any(isinstance(h, logging.FileHandler) and h.baseFilename == handler.baseFilename for h in log.handlers):
            log.addHandler(handler)


def prediction_writer(*args, **kwargs):
    """See :func:`medadapt.engine.writers.prediction_writer`."""
    from medadapt.engine.writers import prediction_writer as build

    return build(*args, **kwargs)


def report_predictions(output_dir: str) -> None:
    out = Path(output_dir).resolve()
    files = sorted(p for p in out.glob("*") if p.is_file() and not p.name.startswith("."))
    logger.info("wrote %d prediction file(s) to %s", len(files), out)
