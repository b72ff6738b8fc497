"""MONAI Label infer tasks for medadapt models: volumes, 2D images, classes and box prompts.

Each task builds its model through its `ModelSpec` (pretrained backbone + adapters loaded
strictly) instead of MONAI Label's own checkpoint loading, keeps one model per device, and
rebuilds it when the adapter folder changes (after training). A check before the transforms
turns bad input into `InvalidInput` (4xx): wrong file type, unreadable file, wrong channel
count, missing or out-of-image box. Labels are written by the task itself (PNG for images,
NIfTI with the input's affine for volumes) at the input's own size.
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
from monai.inferers import Inferer, SimpleInferer, SlidingWindowInferer
from monai.transforms import Invertd
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
from medadapt.monailabel.labelmaps import (
    brats_label_map,
    brats_label_names,
    class_scores,
    resolve_release,
    segmentation_label_map,
    segmentation_label_names,
)
from medadapt.monailabel.specs import AdapterState, ModelSpec

logger = logging.getLogger("medadapt.monailabel")

INPUT_INFO = "medadapt_input"  # data key of the checked input's ImageFileInfo
ADAPTERS_USED = "medadapt_adapters"  # data key of the AdapterState (or None) the label came from
_HEAD = {
    "classification": "the classification head is untrained, so its classes mean nothing until training",
    "segmentation": "the segmentation decoder is untrained, so its masks mean nothing until training",
    "segmentation3d": "the segmentation decoder is untrained, so its masks mean nothing until training",
    "box_segmentation": "the SAM prompt encoder and mask decoder are the pretrained ones, so it segments as is",
}


class AdapterInferTask(BasicInferTask):
    """Shared machinery: model building and caching, input checks, description, writing.

    Arguments:
      spec: the served model.
      infer_type: MONAI Label's type of the task.
      labels: MONAI Label labels (names, or {name: label value}).
    """

    kind = "2d"  # the input kind this task accepts ("2d" image or "3d" volume)

    def __init__(self, spec: ModelSpec, infer_type: InferType, labels: Sequence[str] | dict[str, int]):
        super().__init__(path=None, network=None, type=infer_type, labels=labels, dimension=spec.dimension,
                         description=spec.description, load_strict=True)
        self.spec = spec
        self.preprocessing = spec.build_preprocessing()
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ model
    def is_valid(self) -> bool:
        return True  # always servable: without trained adapters the fresh model is served

    def _get_network(self, device: str, data: dict | None) -> torch.nn.Module:
        state = self.spec.current_adapters()
        with self._lock:  # MONAI Label may run requests in a thread pool; build each model once
            cached = self._networks.get(device)
            if cached is not None and cached[1] == state:
                return cached[0]
            folder = state.folder if state else None
            try:
                model = self.spec.build_model(folder)
            except (ValueError, FileNotFoundError, KeyError) as error:
                raise MONAILabelException(
                    MONAILabelError.INFERENCE_ERROR,
                    f"model {self.spec.name!r}: cannot build it with the adapters in {folder}: {error}",
                ) from error
            model = model.to(torch.device(device)).eval()
            self._networks[device] = (model, state)
            logger.info("model %s built on %s with %s", self.spec.name, device,
                        f"adapters {folder}" if folder else "fresh adapters (none trained yet)")
            return model

    # ------------------------------------------------------------------ info
    def describe(self, state: AdapterState | None) -> str:
        backbone = self.spec.model.get("backbone", "litemedsam")
        if self.spec.pretrained:
            backbone = f"pretrained {backbone}"
        else:
            backbone = f"{backbone} (random weights: no backbone_checkpoint)"
        if state is not None:
            method = _adapter_method(state.folder) or self.spec.method
            return (f"{self.spec.description}. Serving the {backbone} with the trained {method} "
                    f"adapters in {state.folder} (loaded strictly).")
        return (f"{self.spec.description}. No trained adapters yet (looked in {self.spec.adapters} and "
                f"{self.spec.label_adapters}): serving the {backbone} with freshly injected "
                f"{self.spec.method} adapters (the identity for zero-initialised methods such as DKA); "
                f"{_HEAD[self.spec.task]}.")

    def info(self) -> dict[str, Any]:
        info = super().info()
        state = self.spec.current_adapters()
        info.update(description=self.describe(state), trained=state is not None,
                    adapters=state.folder if state else None, task=self.spec.task, source=self.spec.source)
        return info

    # ------------------------------------------------------------------ steps
    def pre_transforms(self, data: dict | None = None) -> list[Callable]:
        return [self.check_input, self.preprocess]

    def preprocess(self, data: dict) -> dict:
        """The model's input transforms on {"image": path} alone: the request dict carries
        other "image_*" keys (image_path) that MONAI's Spacingd would try to update as
        metadata dictionaries."""
        data["image"] = self.preprocessing({"image": data["image"]})["image"]
        return data

    def check_input(self, data: dict) -> dict:
        """The pre-step: refuse what this model cannot run on, before any transform reads it."""
        path = data.get("image")
        if not isinstance(path, str) or not path:
            raise InvalidInput(f"model {self.spec.name!r} needs an image: a datastore id or an uploaded file", 400)
        name = "the uploaded file" if is_upload(path) else Path(path).name
        try:
            info = inspect_image_file(path, name=name)
        except ImageFileError as error:
            raise InvalidInput(str(error), error.status) from None
        if info.kind != self.kind:
            wanted = "NIfTI volumes (.nii/.nii.gz)" if self.kind == "3d" else "2D PNG/JPG images"
            raise InvalidInput(f"model {self.spec.name!r} runs on {wanted}; {name} is not one", 415)
        data[INPUT_INFO] = info
        return data

    def run_inferer(self, data: dict, convert_to_batch: bool = True, device: str = "cpu") -> dict:
        network = self._get_network(device, data)
        data[ADAPTERS_USED] = self._networks[device][1]
        # Plain tensors into the network: the metadata stays on data["image"] for inversion,
        # and custom ops need not handle MONAI's MetaTensor.
        image = data[self.input_key]
        image = image.as_tensor() if isinstance(image, MetaTensor) else torch.as_tensor(image)
        with torch.no_grad():
            output = self.forward(network, image[None].to(torch.device(device)), data)
        data[self.output_label_key] = output[0].detach().cpu()
        return data

    def forward(self, network: torch.nn.Module, batch: torch.Tensor, data: dict) -> torch.Tensor:
        """The network on a batch of one input, through the task's inferer."""
        return self.inferer(data)(batch, network)

    def post_transforms(self, data: dict | None = None) -> list[Callable]:
        return [self.postprocess]

    def postprocess(self, data: dict) -> dict:  # overridden by each task
        raise NotImplementedError

    def result_json(self, data: dict) -> dict[str, Any]:
        state: AdapterState | None = data.get(ADAPTERS_USED)
        info: ImageFileInfo = data[INPUT_INFO]
        return {"model": self.spec.name, "trained": state is not None,
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


class VolumeSegmentationTask(AdapterInferTask):
    """3D segmentation by sliding window; BraTS TC/WT/ET outputs become BraTS label values.

    Input: a NIfTI volume, 4D with channels last for multi-sequence models (BraTS: t1, t1ce,
    t2, flair). Output: a uint8 NIfTI label map of the input's shape and affine.
    """

    kind = "3d"

    def __init__(self, spec: ModelSpec):
        self.brats = spec.dataset == "brats" or (spec.multilabel and int(spec.model.get("num_classes", 0)) == 3)
        if self.brats:
            labels: dict[str, int] | list[str] = brats_label_names(resolve_release(spec.release))
        else:
            labels = segmentation_label_names(spec.labels, spec.multilabel)
        super().__init__(spec, InferType.SEGMENTATION, labels)

    def check_input(self, data: dict) -> dict:
        data = super().check_input(data)
        info: ImageFileInfo = data[INPUT_INFO]
        expected = int(self.spec.model.get("in_channels") or 3)
        if info.channels != expected:
            layout = f"a 4D NIfTI with {expected} channels last" if expected > 1 else "a 3D NIfTI"
            if self.brats and expected == 4:
                layout += " (t1, t1ce, t2, flair)"
            raise InvalidInput(f"model {self.spec.name!r} expects {layout}; "
                               f"{Path(info.path).name} has {info.channels} channel(s)", 422)
        return data

    def inferer(self, data: dict | None = None) -> Inferer:
        device = data.get("device") if data else None
        return SlidingWindowInferer(roi_size=self.spec.roi_size, sw_batch_size=self.spec.sw_batch_size,
                                    overlap=self.spec.sw_overlap, mode="gaussian", sw_device=device, device="cpu")

    def postprocess(self, data: dict) -> dict:
        pred = data[self.output_label_key]
        pred = pred if isinstance(pred, MetaTensor) else MetaTensor(pred)
        pred = pred.sigmoid() if (self.spec.multilabel or pred.shape[0] == 1) else pred.softmax(dim=0)
        data[self.output_label_key] = pred.float().cpu()
        # Back through the spacing and orientation of the preprocessing, to the input's own grid.
        data = Invertd(keys=self.output_label_key, transform=self.preprocessing, orig_keys="image",
                       nearest_interp=False)(data)
        probabilities = torch.as_tensor(data[self.output_label_key])
        info: ImageFileInfo = data[INPUT_INFO]
        if tuple(probabilities.shape[1:]) != info.spatial_shape:
            raise MONAILabelException(MONAILabelError.INFERENCE_ERROR,
                                      f"inverted prediction has shape {tuple(probabilities.shape[1:])}, "
                                      f"the input {info.spatial_shape}")
        if self.brats:
            release = resolve_release(self.spec.release, info.path)
            data[self.output_label_key] = brats_label_map(probabilities, release)
            data[self.output_json_key] = {"release": release, "label_values": brats_label_names(release)}
        else:
            if self.spec.multilabel or probabilities.shape[0] == 1:
                label = np.zeros(info.spatial_shape, dtype=np.uint8)
                for i, channel in enumerate(probabilities.numpy() > 0.5):
                    label[channel] = i + 1
            else:
                label = probabilities.argmax(dim=0).numpy().astype(np.uint8)
            data[self.output_label_key] = label
        return data


class ImageSegmentationTask(AdapterInferTask):
    """Prompt-free 2D segmentation of a PNG/JPG image; a PNG label map of the image's size."""

    def __init__(self, spec: ModelSpec, infer_type: InferType = InferType.SEGMENTATION):
        super().__init__(spec, infer_type, segmentation_label_names(spec.labels, spec.multilabel))

    def inferer(self, data: dict | None = None) -> Inferer:
        return SimpleInferer()

    def postprocess(self, data: dict) -> dict:
        info: ImageFileInfo = data[INPUT_INFO]
        data[self.output_label_key] = segmentation_label_map(
            torch.as_tensor(data[self.output_label_key]), info.spatial_shape, self.spec.multilabel)
        return data


class ClassificationTask(AdapterInferTask):
    """Classes of a PNG/JPG image: JSON {"prediction": [{idx, label, score}, ...], "class": best}."""

    def __init__(self, spec: ModelSpec):
        super().__init__(spec, InferType.CLASSIFICATION, list(spec.labels))

    def inferer(self, data: dict | None = None) -> Inferer:
        return SimpleInferer()

    def postprocess(self, data: dict) -> dict:
        scores = class_scores(torch.as_tensor(data[self.output_label_key]), self.spec.labels, self.spec.multilabel)
        data[self.output_json_key] = {"prediction": scores, "class": scores[0]["label"]}
        return data

    def writer(self, data: dict, extension=None, dtype=None) -> tuple[Any, dict]:
        result = self.result_json(data)
        result.update(data[self.output_json_key])
        return None, result


class BoxSegmentationTask(ImageSegmentationTask):
    """MedSAM-style segmentation inside a box given by the client.

    Request params: ``{"box": [x0, y0, x1, y1]}`` in pixels of the image (x = column,
    y = row, 0 <= x0 < x1 <= width, 0 <= y0 < y1 <= height).
    """

    def __init__(self, spec: ModelSpec):
        super().__init__(spec, InferType.ANNOTATION)
        self._config.update({"box": None})

    def check_input(self, data: dict) -> dict:
        data = super().check_input(data)
        height, width = data[INPUT_INFO].spatial_shape
        data["box"] = parse_box(data.get("box"), width, height, self.spec.name)
        return data

    def forward(self, network: torch.nn.Module, batch: torch.Tensor, data: dict) -> torch.Tensor:
        # The box is in pixels of the original image; the model sees the resized one.
        height, width = data[INPUT_INFO].spatial_shape
        size_y, size_x = batch.shape[-2:]
        scale = torch.tensor([size_x / width, size_y / height, size_x / width, size_y / height])
        boxes = (torch.tensor([data["box"]], dtype=torch.float32) * scale).to(batch.device)
        return network(batch, boxes)

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
    except (TypeError, ValueError):
        raise InvalidInput(f"box {box!r} is not four numbers: {usage}", 400) from None
    if len(values) != 4 or not all(math.isfinite(v) for v in values):
        raise InvalidInput(f"box {box!r} is not four finite numbers: {usage}", 400)
    x0, y0, x1, y1 = values
    if not (x0 < x1 and y0 < y1):
        raise InvalidInput(f"box {values} is empty or reversed: {usage}", 400)
    if x0 < 0 or y0 < 0 or x1 > width or y1 > height:
        raise InvalidInput(f"box {values} lies outside the {width}x{height} image: {usage}", 422)
    return values


def make_infer_task(spec: ModelSpec) -> AdapterInferTask:
    """The infer task class for a spec's task."""
    builders: dict[str, Callable[[ModelSpec], AdapterInferTask]] = {
        "segmentation3d": VolumeSegmentationTask,
        "segmentation": ImageSegmentationTask,
        "classification": ClassificationTask,
        "box_segmentation": BoxSegmentationTask,
    }
    return builders[spec.task](spec)
