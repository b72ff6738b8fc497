"""MONAI Label infer tasks for medadapt models: bundle models (volumes, 2D images, classes)
and the box-prompted LiteMedSAM.

A bundle model's task runs the bundle's own components (`BundleModel.components`): its
``preprocessing``, its network (pretrained backbone + adapters loaded strictly, never through
MONAI Label's non-strict loader), its ``inferer`` and its ``label_map``, so the served label is
the bundle's prediction. Each task keeps one model per device and rebuilds it when the adapter
folder changes (after training). A check before the transforms turns bad input into
`InvalidInput` (4xx): wrong file type, unreadable file, wrong channel count, missing or
out-of-image box. Labels are written by the task (PNG for images, NIfTI with the input's
affine for volumes) at the input's own size, holding the values ``GET /info/`` lists.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor
from monai.inferers import Inferer, SimpleInferer
from monailabel.interfaces.exception import MONAILabelError, MONAILabelException
from monailabel.interfaces.tasks.infer_v2 import InferType
from monailabel.tasks.infer.basic_infer import BasicInferTask

from medadapt.monailabel.errors import InvalidInput
from medadapt.monailabel.imagefiles import (
    ImageFileError,
    ImageFileInfo,
    inspect_image_file,
    is_upload,
    write_nifti_label,
    write_png_label,
)
from medadapt.monailabel.labelmaps import class_scores, segmentation_label_map
from medadapt.monailabel.specs import AdapterState, BoxModel, BundleModel, ServedModel

logger = logging.getLogger("medadapt.monailabel")

INPUT_INFO = "medadapt_input"  # data key of the checked input's ImageFileInfo
ADAPTERS_USED = "medadapt_adapters"  # data key of the AdapterState (or None) the label came from


class AdapterInferTask(BasicInferTask):
    """Shared machinery: model building and caching, input checks, description, writing.

    Arguments:
      model: the served model.
      infer_type: MONAI Label's type of the task.
    """

    def __init__(self, model: ServedModel, infer_type: InferType):
        super().__init__(path=None, network=None, type=infer_type, labels=model.label_values,
                         dimension=model.dimension, description=model.description, load_strict=True)
        self.model = model
        self.kind = "3d" if model.dimension == 3 else "2d"  # the input kind this task accepts
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ model
    def is_valid(self) -> bool:
        return True  # always servable: without trained adapters the fresh model is served

    def build(self, adapters: str | None) -> dict[str, Any]:
        """{"network": ..., and whatever else the task runs} for an adapter folder (or None)."""
        raise NotImplementedError

    def parts(self, device: str) -> tuple[dict[str, Any], AdapterState | None]:
        """The built parts for ``device`` and the adapter state they hold; rebuilt when the
        adapter folder changed."""
        state = self.model.current_adapters()
        with self._lock:  # MONAI Label may run requests in a thread pool; build each model once
            cached = self._networks.get(device)
            if cached is not None and cached[1] == state:
                return cached[0], state
            folder = state.folder if state else None
            try:
                parts = self.build(folder)
            except (ValueError, FileNotFoundError, KeyError, RuntimeError) as error:
                raise MONAILabelException(
                    MONAILabelError.INFERENCE_ERROR,
                    f"model {self.model.name!r}: cannot build it with the adapters in {folder}: {error}",
                ) from error
            parts["network"] = parts["network"].to(torch.device(device)).eval()
            self._networks[device] = (parts, state)
            logger.info("model %s built on %s with %s", self.model.name, device,
                        f"adapters {folder}" if folder else "fresh adapters (none trained yet)")
            return parts, state

    def _get_network(self, device: str, data: dict | None) -> torch.nn.Module:
        return self.parts(device)[0]["network"]

    # ------------------------------------------------------------------ info
    def describe(self, state: AdapterState | None) -> str:
        model = self.model
        backbone = (f"pretrained {model.backbone}" if model.pretrained
                    else f"{model.backbone} (random weights: no backbone_checkpoint)")
        if state is not None:
            method = _adapter_method(state.folder) or model.method
            return (f"{model.description}. Serving the {backbone} with the trained {method} "
                    f"adapters in {state.folder} (loaded strictly).")
        return (f"{model.description}. No trained adapters yet (looked in {model.adapters} and "
                f"{model.label_adapters}): serving the {backbone} with freshly injected "
                f"{model.method} adapters (the identity for zero-initialised methods such as DKA); "
                f"{model.untrained_note()}.")

    def info(self) -> dict[str, Any]:
        info = super().info()
        state = self.model.current_adapters()
        info.update(description=self.describe(state), trained=state is not None,
                    adapters=state.folder if state else None, task=self.model.task, source=self.model.source)
        return info

    # ------------------------------------------------------------------ steps
    def pre_transforms(self, data: dict | None = None) -> list[Callable]:
        return [self.check_input, self.preprocess]

    def preprocess(self, data: dict) -> dict:
        """The model's input transforms on {"image": path} alone: the request dict carries
        other "image_*" keys (image_path) that MONAI's Spacingd would try to update as
        metadata dictionaries."""
        parts, state = self.parts(data.get("device") or "cpu")
        data[ADAPTERS_USED] = state
        data["image"] = parts["preprocessing"]({"image": data["image"]})["image"]
        return data

    def check_input(self, data: dict) -> dict:
        """The pre-step: refuse what this model cannot run on, before any transform reads it."""
        path = data.get("image")
        if not isinstance(path, str) or not path:
            raise InvalidInput(f"model {self.model.name!r} needs an image: a datastore id or an uploaded file", 400)
        name = "the uploaded file" if is_upload(path) else Path(path).name
        try:
            info = inspect_image_file(path, name=name)
        except ImageFileError as error:
            raise InvalidInput(str(error), error.status) from None
        if info.kind != self.kind:
            wanted = "NIfTI volumes (.nii/.nii.gz)" if self.kind == "3d" else "2D PNG/JPG images"
            raise InvalidInput(f"model {self.model.name!r} runs on {wanted}; {name} is not one", 415)
        data[INPUT_INFO] = info
        return data

    def run_inferer(self, data: dict, convert_to_batch: bool = True, device: str = "cpu") -> dict:
        parts, _ = self.parts(device)
        # Plain tensors into the network: the metadata stays on data["image"] for inversion,
        # and custom ops need not handle MONAI's MetaTensor.
        image = data[self.input_key]
        image = image.as_tensor() if isinstance(image, MetaTensor) else torch.as_tensor(image)
        with torch.no_grad():
            output = self.forward(parts, image[None].to(torch.device(device)), data)
        data[self.output_label_key] = output[0].detach().cpu()
        return data

    def forward(self, parts: dict[str, Any], batch: torch.Tensor, data: dict) -> torch.Tensor:
        """The network on a batch of one input, through the model's inferer."""
        return parts["inferer"](batch, parts["network"])

    def inferer(self, data: dict | None = None) -> Inferer:
        return SimpleInferer()  # unused: forward runs the model's own inferer

    def post_transforms(self, data: dict | None = None) -> list[Callable]:
        return [self.postprocess]

    def postprocess(self, data: dict) -> dict:  # overridden by each task
        raise NotImplementedError

    def result_json(self, data: dict) -> dict[str, Any]:
        state: AdapterState | None = data.get(ADAPTERS_USED)
        info: ImageFileInfo = data[INPUT_INFO]
        return {"model": self.model.name, "trained": state is not None,
                "adapters": state.folder if state else None, "input_shape": list(info.spatial_shape)}

    def writer(self, data: dict, extension=None, dtype=None) -> tuple[Any, dict]:
        label = data[self.output_label_key]
        suffix = ".nii.gz" if self.kind == "3d" else ".png"
        handle, path = tempfile.mkstemp(suffix=suffix, prefix="medadapt_label_")
        os.close(handle)  # MONAI Label deletes the file after sending it
        if self.kind == "3d":
            write_nifti_label(label, data[INPUT_INFO].affine, path)
        else:
            write_png_label(label, path)
        result = self.result_json(data)
        result.update(data.get(self.output_json_key, {}))
        result["label_shape"] = list(label.shape)
        return path, result


def _adapter_method(folder: str) -> str | None:
    from medadapt.checkpoint import read_adapter_config

    try:
        return read_adapter_config(folder)["method"]
    except (OSError, ValueError, KeyError):
        return None


class BundleSegmentationTask(AdapterInferTask):
    """2D or 3D segmentation with a bundle's model: the bundle's label map (thresholds or
    argmax, inverted to the input's grid, the dataset's label values) as a PNG or NIfTI."""

    def __init__(self, model: BundleModel):
        super().__init__(model, InferType.SEGMENTATION)

    def build(self, adapters: str | None) -> dict[str, Any]:
        parts = self.model.components(adapters)
        parts["network"] = parts.pop("network_def")
        return parts

    def check_input(self, data: dict) -> dict:
        data = super().check_input(data)
        info: ImageFileInfo = data[INPUT_INFO]
        expected = self.model.in_channels
        if self.kind == "3d" and info.channels != expected:
            layout = f"a 4D NIfTI with {expected} channels last" if expected > 1 else "a 3D NIfTI"
            raise InvalidInput(f"model {self.model.name!r} expects {layout}; "
                               f"{Path(info.path).name} has {info.channels} channel(s)", 422)
        return data

    def postprocess(self, data: dict) -> dict:
        parts, _ = self.parts(data.get("device") or "cpu")
        pred = data[self.output_label_key]
        pred = pred if isinstance(pred, MetaTensor) else MetaTensor(pred)
        labelled = parts["label_map"]({"image": data["image"], "pred": pred})
        label = np.asarray(torch.as_tensor(labelled["pred"]).detach().cpu())[0]
        info: ImageFileInfo = data[INPUT_INFO]
        if tuple(label.shape) != tuple(info.spatial_shape):
            raise MONAILabelException(MONAILabelError.INFERENCE_ERROR,
                                      f"the label map has shape {tuple(label.shape)}, the input {info.spatial_shape}")
        data[self.output_label_key] = np.rint(label).astype(np.uint8)
        data[self.output_json_key] = {"label_values": self.model.label_values}
        return data


class BundleClassificationTask(AdapterInferTask):
    """Classes of a PNG/JPG image with a bundle's model: JSON {"prediction": [{idx, label,
    score}, ...], "class": best}; the scores are softmax outputs, not calibrated."""

    def __init__(self, model: BundleModel):
        super().__init__(model, InferType.CLASSIFICATION)

    build = BundleSegmentationTask.build

    def postprocess(self, data: dict) -> dict:
        scores = class_scores(torch.as_tensor(data[self.output_label_key]), self.model.labels)
        data[self.output_json_key] = {"prediction": scores, "class": scores[0]["label"], "calibrated": False}
        return data

    def writer(self, data: dict, extension=None, dtype=None) -> tuple[Any, dict]:
        result = self.result_json(data)
        result.update(data[self.output_json_key])
        return None, result


class BoxSegmentationTask(AdapterInferTask):
    """MedSAM-style segmentation inside a box given by the client.

    Request params: ``{"box": [x0, y0, x1, y1]}`` in pixels of the image (x = column,
    y = row, 0 <= x0 < x1 <= width, 0 <= y0 < y1 <= height).
    """

    def __init__(self, model: BoxModel):
        super().__init__(model, InferType.ANNOTATION)
        self._config.update({"box": None})

    def build(self, adapters: str | None) -> dict[str, Any]:
        return {"network": self.model.build_network(adapters), "preprocessing": self.model.preprocessing()}

    def check_input(self, data: dict) -> dict:
        data = super().check_input(data)
        height, width = data[INPUT_INFO].spatial_shape
        data["box"] = parse_box(data.get("box"), width, height, self.model.name)
        return data

    def forward(self, parts: dict[str, Any], batch: torch.Tensor, data: dict) -> torch.Tensor:
        # The box is in pixels of the original image; the model sees the resized one.
        height, width = data[INPUT_INFO].spatial_shape
        size_y, size_x = batch.shape[-2:]
        scale = torch.tensor([size_x / width, size_y / height, size_x / width, size_y / height])
        boxes = (torch.tensor([data["box"]], dtype=torch.float32) * scale).to(batch.device)
        return parts["network"](batch, boxes)

    def postprocess(self, data: dict) -> dict:
        info: ImageFileInfo = data[INPUT_INFO]
        data[self.output_label_key] = segmentation_label_map(
            torch.as_tensor(data[self.output_label_key]), info.spatial_shape, multilabel=True)
        return data

    def result_json(self, data: dict) -> dict[str, Any]:
        return {**super().result_json(data), "box": data["box"]}


def parse_box(box: Any, width: int, height: int, model: str) -> list[float]:
    """A valid [x0, y0, x1, y1] inside a ``width`` x ``height`` image, or InvalidInput."""
    usage = (f'send params {{"box": [x0, y0, x1, y1]}} in image pixels '
             f'(0 <= x0 < x1 <= {width}, 0 <= y0 < y1 <= {height})')
    if box is None:
        raise InvalidInput(f"model {model!r} needs a box prompt: {usage}", 400)
    if isinstance(box, str):
        box = box.replace("[", " ").replace("]", " ").replace(",", " ").split()
    try:
        values = [float(v) for v in box]
    except (TypeError, ValueError, OverflowError):
        raise InvalidInput(f"box {box!r} is not four numbers: {usage}", 400) from None
    if len(values) != 4 or not all(math.isfinite(v) for v in values):
        raise InvalidInput(f"box {box!r} is not four finite numbers: {usage}", 400)
    x0, y0, x1, y1 = values
    if not (x0 < x1 and y0 < y1):
        raise InvalidInput(f"box {values} is empty or reversed: {usage}", 400)
    if x0 < 0 or y0 < 0 or x1 > width or y1 > height:
        raise InvalidInput(f"box {values} lies outside the {width}x{height} image: {usage}", 422)
    return values


def make_infer_task(model: ServedModel) -> AdapterInferTask:
    """The infer task for a served model."""
    if isinstance(model, BoxModel):
        return BoxSegmentationTask(model)
    return BundleClassificationTask(model) if model.task == "classification" else BundleSegmentationTask(model)
