"""``medadapt.predict``: one image through a bundle's own inference.

The preprocessing, the inferer (a sliding window for volumes) and the post-processing that
turns logits into a label map on the input's grid are built from the bundle's
``inference.json`` (its ``preprocessing``, ``inferer`` and ``label_map``), so a prediction in
Python is the one the bundle writes to disk, and an edit to the bundle reaches both::

    prediction = medadapt.predict("bundles/dka_busi_seg", "case.png")          # its models/model.pt
    prediction = medadapt.predict("runs/x/models/best_adapters", "case.png", bundle="dka_busi_seg")
    prediction = medadapt.predict(model, "volume.nii.gz", bundle="dka_brats")
    prediction.labels, prediction.affine          # segmentation: the label map on the input's grid
    prediction.probabilities, prediction.label    # classification: class -> probability
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from medadapt.tasks import get_task

ImagePath = str | os.PathLike | list[str | os.PathLike]


@dataclass
class Prediction:
    """What :func:`predict` returns.

    Attributes:
      task: the bundle's task.
      class_names: the bundle's output names, in the model's output order.
      labels: segmentation: the label map as the bundle writes it, on the input's grid, in
        the file's array order (PNG: rows, columns; NIfTI: its voxel axes); several channels
        only for independent masks the bundle leaves as channels. None for classification.
      affine: volumes: the input's voxel-to-world matrix, which ``labels`` shares.
      probabilities: classification: class name -> softmax probability (uncalibrated).
    """

    task: str
    class_names: list[str]
    labels: np.ndarray | None = None
    affine: np.ndarray | None = None
    probabilities: dict[str, float] | None = None

    @property
    def label(self) -> str | None:
        """Classification: the most probable class."""
        return max(self.probabilities, key=self.probabilities.get) if self.probabilities else None


def predict(model_or_folder: nn.Module | str | os.PathLike, image: ImagePath, bundle: str | os.PathLike | None = None,
            device: str | torch.device | None = None, **settings: Any) -> Prediction:
    """Predict ``image`` with the bundle's inference preprocessing, inferer and post-processing.

    Arguments:
      model_or_folder: a task model (``create_model``, ``load_model``); an adapter folder
        written by training or ``save_adapters`` (rebuilt by ``load_model``); or a bundle, by
        name or folder, whose published ``models/model.pt`` is loaded strictly.
      image: an image or volume file, or a list of files, one per channel (nnU-Net style).
      bundle: the bundle whose inference the model goes through; needed for a model, and for
        an adapter folder outside a bundle's folder (one inside it, such as
        ``bundles/X/runs/.../models/best_adapters``, names its bundle).
      device: where to run (default: the model's device; for a folder, the bundle's ``device``).
      settings: bundle settings the model was trained with (``image_size``, ``backbone``,
        ``backbone_checkpoint`` (an adapter folder is rebuilt on it), ``dataset_name``,
        ``model_file``...), as on the bundle's command line.
    """
    from medadapt.engine.bundle import bundle_folder, config_dir, parsed

    files = _image_files(image)   # before any model is built
    network, bundle = _network_and_bundle(model_or_folder, bundle, settings)
    config = config_dir(bundle_folder(bundle)) / "inference.json"
    if device is not None:
        settings["device"] = torch.device(device)
    elif isinstance(model_or_folder, nn.Module):
        settings["device"] = _device_of(network)
    task, class_names, dataset, device, preprocessing, inferer, label_map = parsed(
        config, ["task", "class_names", "dataset_name", "device", "preprocessing", "inferer", "label_map"], **settings)
    _check_task(network, task, bundle)
    entry = _checked_entry(files, dataset, task)
    network = network.to(device).eval()
    output = _run(network, preprocessing, inferer, label_map, entry, device)
    if get_task(task).label_kind == "class":
        from medadapt.engine.writers import class_probabilities

        probabilities = class_probabilities(output["pred"]).tolist()
        return Prediction(task, list(class_names), probabilities=dict(zip(class_names, probabilities)))
    return _label_map(output, task, list(class_names))


def _device_of(network: nn.Module) -> torch.device:
    parameter = next(iter(network.parameters()), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def _network_and_bundle(source, bundle, settings: dict) -> tuple[nn.Module, str]:
    """The network to run and the bundle whose inference it goes through."""
    from medadapt.checkpoint import adapter_files
    from medadapt.engine.bundle import bundle_folder, is_bundle
    from medadapt.models.loading import load_model

    if isinstance(source, nn.Module):
        if bundle is None:
            raise ValueError("predict(model, image) needs the bundle whose preprocessing the model was trained with: "
                             "predict(model, image, bundle='dka_busi_seg')")
        return source, bundle
    folder = Path(source)
    if bundle is None and _names_a_bundle(source):
        return _published_network(bundle_folder(source), settings), str(source)
    if folder.is_dir() and adapter_files(folder)[0].is_file():
        bundle = bundle or _bundle_above(folder)
        if bundle is None:
            raise ValueError(f"{folder} lies in no bundle's folder: pass the bundle it was trained with, "
                             "predict(folder, image, bundle='dka_busi_seg')")
        return load_model(folder, backbone_checkpoint=settings.get("backbone_checkpoint")), bundle
    if bundle is not None and is_bundle(folder):
        raise ValueError(f"{folder} is a bundle: predict({str(folder)!r}, image) uses its published model")
    raise FileNotFoundError(f"{source} is neither a bundle (a name or a folder with inference.json) nor an adapter "
                            "folder (with medadapt_config.json)")


def _names_a_bundle(source) -> bool:
    from medadapt import bundles
    from medadapt.engine.bundle import is_bundle

    return str(source) in bundles.names() or (Path(source).is_dir() and is_bundle(source))


def _bundle_above(folder: Path) -> str | None:
    """The bundle folder an adapter folder lies in (its ``models/`` or ``runs/``), if any."""
    from medadapt.engine.bundle import is_bundle

    return next((str(parent) for parent in folder.resolve().parents if is_bundle(parent)), None)


def _published_network(folder: Path, settings: dict) -> nn.Module:
    """The bundle's network with its published model file (``model_file``, default
    ``models/model.pt``) loaded strictly, as its inference.json's CheckpointLoader loads it."""
    from medadapt.engine.bundle import config_dir, parsed
    from medadapt.engine.data import existing_file

    config = config_dir(folder) / "inference.json"
    network, model_file = parsed(config, ["network_def", "model_file"], **settings)
    network.load_state_dict(torch.load(existing_file(model_file), map_location="cpu", weights_only=True))
    return network


def _check_task(network: nn.Module, task: str, bundle) -> None:
    """Refuse a model built for another task than the bundle's (a classifier through a
    segmentation bundle's post-processing would give nonsense, not an error)."""
    from medadapt.checkpoint import BUILD_ATTR

    built = (getattr(network, BUILD_ATTR, None) or {}).get("arguments", {}).get("task")
    if built is not None and get_task(built).name != get_task(task).name:
        raise ValueError(f"the model was built for task {built!r}, and bundle {bundle} predicts {task!r}: pass the "
                         "bundle it was trained with")


def _image_files(image: ImagePath) -> list[str]:
    """The file(s) of ``image``, each of which must exist."""
    files = [str(f) for f in image] if isinstance(image, (list, tuple)) else [str(image)]
    missing = [f for f in files if not Path(f).is_file()]
    if not files or missing:
        raise FileNotFoundError(f"no image file {missing[0] if missing else '(an empty list)'}")
    return files


def _checked_entry(files: list[str], dataset: str, task: str) -> dict:
    """The image files as a datalist entry, checked as the bundle checks what it predicts
    (files open, finite values, the dataset's own checks) before the model runs."""
    from medadapt.data import get_dataset
    from medadapt.data.dataset import case_name

    entry = {"image": files if len(files) > 1 else files[0], "case": case_name(files[0])}
    get_dataset(dataset).validate([entry], task, require_labels=False)
    return entry


def _run(network, preprocessing, inferer, label_map, entry: dict, device) -> dict:
    """One case as the bundle's evaluator runs it: preprocessing, a batch of one, the inferer,
    then the post-processing on the decollated case."""
    from monai.data import decollate_batch, list_data_collate

    batch = list_data_collate([preprocessing(dict(entry))])
    with torch.no_grad():
        batch["pred"] = inferer(batch["image"].to(device), network)
    return label_map(decollate_batch(batch)[0])


def _label_map(output: dict, task: str, class_names: list[str]) -> Prediction:
    from medadapt.engine.writers import label_affine

    pred = np.asarray(torch.as_tensor(output["pred"]).detach().cpu())
    labels = (pred[0] if pred.shape[0] == 1 else pred).astype(np.uint8)
    affine = label_affine(output, "pred") if get_task(task).spatial_dims == 3 else None
    return Prediction(task, class_names, labels=labels, affine=affine)
