"""MONAI Label infer tasks for medadapt models: bundle models (volumes, 2D images, classes)
and the box-prompted LiteMedSAM, on images and through volumes.

A bundle model's task runs the bundle's own components (`BundleModel.components`): its
``preprocessing``, its network (pretrained backbone + adapters loaded strictly, never through
MONAI Label's non-strict loader), its ``inferer`` and its ``label_map``, so the served label is
the bundle's prediction. Each task keeps one model per device and rebuilds it when the adapter
folder changes (after training). A check before the transforms turns bad input into
`InvalidInput` (4xx): wrong file type, unreadable file, wrong channel count, missing or
out-of-image box or click. Labels are written by the task (PNG for images, NIfTI with the
input's affine for volumes, or the NRRD / NIfTI a client asks for with ``result_extension``,
see `medadapt.monailabel.formats`) at the input's own size, holding the values ``GET /info/``
lists; a classifier's label paints the whole image with its class's value.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor
from monai.inferers import Inferer, SimpleInferer
from monailabel.interfaces.exception import MONAILabelError, MONAILabelException
from monailabel.interfaces.tasks.infer_v2 import InferType
from monailabel.tasks.infer.basic_infer import BasicInferTask

from medadapt.monailabel.clicks import (
    box_around_click,
    click_points,
    remove_touched_parts,
)
from medadapt.monailabel.errors import InvalidInput
from medadapt.monailabel.formats import result_format, write_label
from medadapt.monailabel.imagefiles import (
    ImageFileError,
    ImageFileInfo,
    inspect_image_file,
    is_upload,
)
from medadapt.monailabel.labelmaps import class_scores, segmentation_label_map
from medadapt.monailabel.limits import MAX_VOLUME_VOXELS
from medadapt.monailabel.specs import (
    AdapterState,
    Box3DModel,
    BoxModel,
    BundleModel,
    ServedModel,
)

logger = logging.getLogger("medadapt.monailabel")

INPUT_INFO = "medadapt_input"  # data key of the checked input's ImageFileInfo
RESULT_FORMAT = "medadapt_result_format"  # data key of the label file format the request asks for
ADAPTERS_USED = "medadapt_adapters"  # data key of the AdapterState (or None) the label came from
# One model is built at a time: models infer in workers of their own, and building goes through
# process-wide registries (MONAI's config parser, timm's) that two threads at once break
# ("dictionary changed size during iteration").
_BUILDING = threading.Lock()


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
        # MONAI Label lists only valid models; a refused one (untrained) is listed as not served.
        return self.model.refusal() is None

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
                with _BUILDING:
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
                    adapters=state.folder if state else None, validation=self.model.validation(),
                    task=self.model.task, source=self.model.source)
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
            wanted = "NIfTI or NRRD volumes" if self.kind == "3d" else "2D PNG/JPG images"
            raise InvalidInput(f"model {self.model.name!r} runs on {wanted}; {name} is not one", 415)
        data[INPUT_INFO] = info
        data[RESULT_FORMAT] = result_format(data, self.kind)
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
        label = np.asarray(data[self.output_label_key])
        path = write_label(label, self.kind, data[INPUT_INFO].affine, data[RESULT_FORMAT])
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
        super().__init__(model, model.kind.served_as)

    def build(self, adapters: str | None) -> dict[str, Any]:
        parts = self.model.components(adapters)
        parts["network"] = parts.pop("network_def")
        return parts

    def check_input(self, data: dict) -> dict:
        data = super().check_input(data)
        info: ImageFileInfo = data[INPUT_INFO]
        if self.kind != "3d":
            return data
        parts, _ = self.parts(data.get("device") or "cpu")
        expected = file_channels(parts["preprocessing"], self.model.in_channels)
        if info.channels != expected:
            layout = (f"a 4D NIfTI with {expected} channels last" if expected > 1
                      else "a single-channel volume (a 3D NIfTI or NRRD)")
            raise InvalidInput(f"model {self.model.name!r} expects {layout}; "
                               f"{Path(info.path).name} has {info.channels} channel(s)", 422)
        check_resampled_size(info, resample_spacing(parts["preprocessing"]), self.model.name)
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
    score}, ...], "class": best}; the scores are softmax outputs, not calibrated. The label
    image (what viewers show, listing the model as a segmentation model) is the whole image
    painted with the best class's value from ``GET /info/``'s labels (1..K)."""

    def __init__(self, model: BundleModel):
        super().__init__(model, model.kind.served_as)

    build = BundleSegmentationTask.build

    def postprocess(self, data: dict) -> dict:
        scores = class_scores(torch.as_tensor(data[self.output_label_key]), self.model.labels)
        best = scores[0]["label"]
        value = self.model.label_values[best]
        data[self.output_label_key] = np.full(data[INPUT_INFO].spatial_shape, value, dtype=np.uint8)
        data[self.output_json_key] = {"prediction": scores, "class": best, "calibrated": False,
                                      "label_values": self.model.label_values}
        return data


class BoxSegmentationTask(AdapterInferTask):
    """MedSAM-style segmentation inside a box given by the client, or by its clicks.

    Request params (see `image_prompts`): ``{"box": [x0, y0, x1, y1]}`` in pixels of the image
    (x = column, y = row, 0 <= x0 < x1 <= width, 0 <= y0 < y1 <= height); or DeepGrow clicks
    ``{"foreground": [[i, j], ...], "background": [...]}`` (i = column, j = row; viewers add
    k = 0), one click standing for the region around it, two or more for a box's corners
    (`medadapt.monailabel.clicks`); or 3D Slicer's ``{"roi": [i0, i1, j0, j1, k0, k1]}``.
    """

    PROMPTS = ("box", "roi", "foreground", "background", "label")

    def __init__(self, model: BoxModel):
        super().__init__(model, model.kind.served_as)
        self._config.update({key: None for key in self.PROMPTS})

    def build(self, adapters: str | None) -> dict[str, Any]:
        return {"network": self.model.build_network(adapters), "preprocessing": self.model.preprocessing()}

    def check_input(self, data: dict) -> dict:
        data = super().check_input(data)
        height, width = data[INPUT_INFO].spatial_shape
        data["prompts"] = image_prompts(data, width, height, self.model.name, lambda: _grey_pixels(data["image"]))
        data["box"] = data["prompts"]["box"]
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
        label = segmentation_label_map(torch.as_tensor(data[self.output_label_key]), info.spatial_shape, multilabel=True)
        prompts = data["prompts"]
        data[self.output_label_key] = remove_touched_parts(label, prompts["background"], prompts["foreground"])
        return data

    def result_json(self, data: dict) -> dict[str, Any]:
        return {**super().result_json(data), "box": data["box"]}


def image_prompts(params: dict, width: int, height: int, model: str, pixels: Callable[[], np.ndarray]) -> dict:
    """{"box": [x0, y0, x1, y1] (pixel edges), "foreground" / "background": [(row, column)]}
    from a 2D box model's params: a "box", else an "roi" (IJK, ends inclusive), else
    "foreground" clicks; ``pixels()`` gives the grey image a single click is read on."""
    usage = (f'send params {{"box": [x0, y0, x1, y1]}} in image pixels (0 <= x0 < x1 <= {width}, 0 <= y0 < y1 <= '
             f'{height}), or clicks {{"foreground": [[i, j], ...]}} (i = column, j = row; one click: the region '
             'around it; two or more: corners of the box), or {"roi": [i0, i1, j0, j1, k0, k1]}')
    shape = (width, height)
    foreground = click_points(params.get("foreground"), "foreground", shape, usage)
    background = click_points(params.get("background"), "background", shape, usage)
    if params.get("box") is not None:
        box = parse_box(params["box"], width, height, model)
    elif params.get("roi") is not None:
        (i0, i1), (j0, j1), _ = _roi_ranges(params["roi"], (width, height, 1), usage)
        box = [float(i0), float(j0), float(i1 + 1), float(j1 + 1)]
    elif len(foreground) == 1:
        x0, y0, x1, y1 = box_around_click(pixels(), row=foreground[0][1], column=foreground[0][0])
        box = [x0, y0, x1 + 1, y1 + 1]
    elif foreground:
        xs, ys = [p[0] for p in foreground], [p[1] for p in foreground]
        box = [min(xs), min(ys), max(xs) + 1, max(ys) + 1]
    else:
        raise InvalidInput(f"model {model!r} needs a box prompt: {usage}", 400)
    return {"box": parse_box(box, width, height, model), "foreground": [(p[1], p[0]) for p in foreground],
            "background": [(p[1], p[0]) for p in background]}


def _grey_pixels(path: str) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as image:
        return np.asarray(image.convert("L"), dtype=np.float32)


def _transforms_of(preprocessing: Any, kind: type) -> Iterator[Any]:
    """The transforms of type ``kind`` in a model's preprocessing (nested Compose included)."""
    from monai.transforms import Compose

    pending = [preprocessing]
    while pending:
        transform = pending.pop()
        if isinstance(transform, kind):
            yield transform
        if isinstance(transform, Compose):
            pending.extend(transform.transforms)


def resample_spacing(preprocessing: Any) -> np.ndarray | None:
    """The voxel spacing (mm) a model's preprocessing resamples volumes to (its ``Spacingd``),
    or None if it keeps the input's."""
    from monai.transforms import Spacingd

    for transform in _transforms_of(preprocessing, Spacingd):
        return np.asarray(transform.spacing_transform.pixdim, dtype=np.float64)
    return None


def file_channels(preprocessing: Any, network_channels: int) -> int:
    """The channels an input file holds for a network of ``network_channels``: fewer where the
    preprocessing repeats them (``RepeatChanneld``: one MR sequence fed to a 3-channel encoder)."""
    from monai.transforms import RepeatChanneld

    channels = network_channels
    for transform in _transforms_of(preprocessing, RepeatChanneld):
        channels //= transform.repeater.repeats
    return channels


def check_resampled_size(info: ImageFileInfo, spacing: np.ndarray | None, model: str) -> None:
    """InvalidInput (413) when resampling the volume to ``spacing`` would make more voxels than
    the server decodes: the header check bounds the file, not what a model's resampling makes
    of it (a tiny volume of huge voxels becomes hundreds of millions)."""
    if spacing is None or info.affine is None:
        return
    import nibabel as nib

    spacing = np.atleast_1d(np.asarray(spacing, dtype=np.float64))
    spacing = np.concatenate([spacing, np.repeat(spacing[-1], 3)])[:3]  # MONAI pads a short pixdim with its last
    sizes = nib.affines.voxel_sizes(info.affine)
    target = np.where(spacing > 0, spacing, sizes)  # MONAI keeps an axis's spacing where pixdim <= 0
    shape = [int(math.ceil(n * size / step - 1e-6)) for n, size, step in zip(info.spatial_shape, sizes, target)]
    voxels = math.prod(shape) * info.channels
    if voxels > MAX_VOLUME_VOXELS:
        raise InvalidInput(f"model {model!r} resamples to {target.round(3).tolist()} mm: {Path(info.path).name} "
                           f"(shape {info.spatial_shape}, voxels of {sizes.round(3).tolist()} mm) would become "
                           f"{shape} x {info.channels} channel(s) = {voxels:,} voxels, over this server's limit of "
                           f"{MAX_VOLUME_VOXELS:,}", 413)


def parse_box(box: Any, width: int, height: int, model: str) -> list[float]:
    """A valid [x0, y0, x1, y1] inside a ``width`` x ``height`` image, or InvalidInput."""
    usage = (f'send params {{"box": [x0, y0, x1, y1]}} in image pixels '
             f'(0 <= x0 < x1 <= {width}, 0 <= y0 < y1 <= {height})')
    if box is None:
        raise InvalidInput(f"model {model!r} needs a box prompt: {usage}", 400)
    if isinstance(box, str):
        box = box.replace("[", " ").replace("]", " ").replace(",", " ").split()
    values = _four_numbers(box, "box", usage)
    x0, y0, x1, y1 = values
    if not (x0 < x1 and y0 < y1):
        raise InvalidInput(f"box {values} is empty or reversed: {usage}", 400)
    if x0 < 0 or y0 < 0 or x1 > width or y1 > height:
        raise InvalidInput(f"box {values} lies outside the {width}x{height} image: {usage}", 422)
    return values


class BoxVolumeSegmentationTask(AdapterInferTask):
    """The box model carried through a single-channel volume (`medadapt.propagate_boxes`):
    a box on one slice, more boxes on other slices to correct it.

    Request params, in voxel indices of the stored volume (the NIfTI's own array order):

    - ``{"box": [x0, y0, x1, y1], "slice": k, "axis": a}``: the slice is
      ``volume.take(k, axis=a)``, x indexes its columns (the second remaining axis), y its rows,
      both ends inclusive; ``axis`` defaults to 2. Corrections: ``"boxes": [{"slice": k2,
      "box": [...]}, ...]`` on the same axis.
    - ``{"roi": [i0, i1, j0, j1, k0, k1]}`` (3D Slicer's ROI, IJK): the box is the ROI's extent
      on the middle slice of ``axis`` (default: the ROI's thinnest axis), and propagation stays
      within the ROI's extent on that axis.
    - ``{"foreground": [[i, j, k], ...]}`` (3D Slicer's DeepGrow points, IJK): two or more
      points on one slice of ``axis`` (default 2) are the corners of a box on that slice, one
      point the region around it (`medadapt.monailabel.clicks`); points on several slices give
      several boxes. ``background`` points remove the parts of the answer they lie on, on their
      slice.

    Answer: a uint8 label volume (1 = object) with the input's shape and affine; the JSON says
    which slices hold the object and where propagation stopped.
    """

    PROMPTS = ("box", "slice", "axis", "boxes", "roi", "foreground", "background", "label")

    def __init__(self, model: Box3DModel):
        super().__init__(model, model.kind.served_as)  # 3D Slicer sends its points to DeepGrow models
        self._config.update({key: None for key in self.PROMPTS})

    def build(self, adapters: str | None) -> dict[str, Any]:
        return {"network": self.model.build_network(adapters)}

    def check_input(self, data: dict) -> dict:
        data = super().check_input(data)
        info: ImageFileInfo = data[INPUT_INFO]
        if info.channels != 1:
            raise InvalidInput(f"model {self.model.name!r} segments single-channel volumes; "
                               f"{Path(info.path).name} has {info.channels} channels", 422)
        data["prompts"] = volume_prompts(data, info.spatial_shape, self.model.name)
        return data

    def preprocess(self, data: dict) -> dict:
        import nibabel as nib

        parts, state = self.parts(data.get("device") or "cpu")
        data[ADAPTERS_USED] = state
        # The stored voxel order, untouched: the prompts are indices of it.
        data["image"] = np.asarray(nib.load(data["image"]).dataobj, dtype=np.float32).reshape(
            data[INPUT_INFO].spatial_shape)
        prompts = data["prompts"]
        for k, (row, column) in prompts["clicks"].items():  # one click on a slice: the region around it
            prompts["boxes"].setdefault(k, box_around_click(data["image"].take(k, axis=prompts["axis"]), row, column))
        return data

    def run_inferer(self, data: dict, convert_to_batch: bool = True, device: str = "cpu") -> dict:
        from medadapt.models.box_propagation import propagate_boxes

        parts, _ = self.parts(device)
        prompts = data["prompts"]
        try:
            result = propagate_boxes(parts["network"], data["image"], prompts["boxes"], prompts["axis"],
                                     slice_range=prompts["slice_range"], device=device)
        except ValueError as error:
            raise InvalidInput(f"model {self.model.name!r}: {error}", 422) from None
        data[self.output_label_key] = result.mask
        slices = result.slices
        data[self.output_json_key] = {
            "label_values": self.model.label_values, "axis": result.axis, "prompted_slices": result.prompted,
            "object_slices": [slices[0], slices[-1]] if slices else [],
            "stops": [{"slice": k, "reason": reason} for k, reason in result.stops],
            "slices_segmented": len(result.boxes)}
        return data

    def postprocess(self, data: dict) -> dict:
        prompts = data["prompts"]
        mask = data[self.output_label_key]
        slices = np.moveaxis(mask, prompts["axis"], 0)  # a view: writing a slice writes the mask
        for k, background in prompts["background"].items():
            slices[k] = remove_touched_parts(slices[k], background, prompts["foreground"].get(k, []))
        return data


def volume_prompts(params: dict, shape: Sequence[int], model: str) -> dict[str, Any]:
    """{"boxes": {slice: box}, "clicks": {slice: (row, column)}, "axis": a, "slice_range": (first,
    last) or None, "foreground" / "background": {slice: [(row, column), ...]}} from a 3D box
    model's request params (see `BoxVolumeSegmentationTask`), or InvalidInput naming the input.
    A single click becomes a box once the volume is read (``clicks``)."""
    usage = ('send params {"box": [x0, y0, x1, y1], "slice": k, "axis": a} (voxel indices; x = columns, y = rows '
             'of volume.take(k, axis=a), both ends inclusive), or {"roi": [i0, i1, j0, j1, k0, k1]}, or '
             '{"foreground": [[i, j, k], ...]} (one point: the region around it; two or more on one slice: the '
             'corners of its box)')
    axis = params.get("axis")
    if axis is not None and (isinstance(axis, bool) or axis not in (0, 1, 2)):
        raise InvalidInput(f"axis must be 0, 1 or 2, got {axis!r}: {usage}", 400)
    slice_range = None
    boxes: dict[int, list[float]] = {}
    clicks: dict[int, tuple[float, float]] = {}
    if params.get("box") is not None:
        axis = 2 if axis is None else axis
        boxes[_slice_index(params.get("slice"), shape[axis], "slice", usage)] = _four_numbers(params["box"], "box",
                                                                                            usage)
        for n, extra in enumerate(params.get("boxes") or []):
            if not isinstance(extra, dict):
                raise InvalidInput(f"boxes[{n}] must be an object with 'slice' and 'box', got {extra!r}: {usage}", 400)
            k = _slice_index(extra.get("slice"), shape[axis], f"boxes[{n}].slice", usage)
            boxes[k] = _four_numbers(extra.get("box"), f"boxes[{n}].box", usage)
    elif params.get("roi") is not None:
        ranges = _roi_ranges(params["roi"], shape, usage)
        if axis is None:  # the axis the ROI is thinnest along: the view it was drawn in
            axis = min((2, 1, 0), key=lambda a: ranges[a][1] - ranges[a][0])
        rows, cols = (ranges[a] for a in range(3) if a != axis)
        boxes[int(round(sum(ranges[axis]) / 2))] = [float(cols[0]), float(rows[0]), float(cols[1]), float(rows[1])]
        if ranges[axis][1] > ranges[axis][0]:
            slice_range = ranges[axis]
    elif params.get("foreground"):
        axis = 2 if axis is None else axis
        boxes, clicks = _boxes_from_points(params["foreground"], shape, axis, usage)
    else:
        raise InvalidInput(f"model {model!r} needs a prompt: {usage}", 400)
    rows, cols = (s for a, s in enumerate(shape) if a != axis)
    from medadapt.models.box_propagation import check_box

    for k, box in boxes.items():
        try:
            check_box(box, rows, cols, where=f"box on slice {k} of axis {axis}")
        except ValueError as error:
            raise InvalidInput(f"{error}: {usage}", 422) from None
    return {"boxes": boxes, "clicks": clicks, "axis": axis, "slice_range": slice_range,
            "foreground": _points_by_slice(params.get("foreground"), "foreground", shape, axis, usage),
            "background": _points_by_slice(params.get("background"), "background", shape, axis, usage)}


def _four_numbers(value: Any, what: str, usage: str) -> list[float]:
    try:
        numbers = [float(v) for v in value]
    except (TypeError, ValueError, OverflowError):
        raise InvalidInput(f"{what} {value!r} is not four numbers: {usage}", 400) from None
    if len(numbers) != 4 or not all(math.isfinite(v) for v in numbers):
        raise InvalidInput(f"{what} {value!r} is not four finite numbers: {usage}", 400)
    return numbers


def _slice_index(value: Any, depth: int, what: str, usage: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidInput(f"{what} must be an integer slice index, got {value!r}: {usage}", 400)
    if not 0 <= value < depth:
        raise InvalidInput(f"{what} {value} lies outside the volume: that axis has slices 0..{depth - 1}", 422)
    return value


def _roi_ranges(roi: Any, shape: Sequence[int], usage: str) -> list[tuple[int, int]]:
    """Per axis the (low, high) voxel range of a Slicer ROI [i0, i1, j0, j1, k0, k1] (each pair
    in either order, as Slicer's RAS-to-IJK turn gives it), clipped to the volume."""
    try:
        values = [float(v) for v in roi]
    except (TypeError, ValueError, OverflowError):
        raise InvalidInput(f"roi {roi!r} is not six numbers: {usage}", 400) from None
    if len(values) != 6 or not all(math.isfinite(v) for v in values):
        raise InvalidInput(f"roi {roi!r} is not six finite numbers [i0, i1, j0, j1, k0, k1]: {usage}", 400)
    ranges = []
    for a in range(3):
        low, high = sorted(values[2 * a: 2 * a + 2])
        low, high = max(0, int(round(low))), min(shape[a] - 1, int(round(high)))
        if low > high:
            raise InvalidInput(f"roi {values} lies outside the volume of shape {tuple(shape)}", 422)
        ranges.append((low, high))
    return ranges


def _points_by_slice(points: Any, what: str, shape: Sequence[int], axis: int,
                     usage: str) -> dict[int, list[tuple[float, float]]]:
    """Click points [i, j, k] grouped by their slice of ``axis``, as (row, column) on it."""
    row_axis, col_axis = (a for a in range(3) if a != axis)
    by_slice: dict[int, list[tuple[float, float]]] = {}
    for coords in click_points(points, what, tuple(shape), usage):
        by_slice.setdefault(int(round(coords[axis])), []).append((coords[row_axis], coords[col_axis]))
    return by_slice


def _boxes_from_points(points: Any, shape: Sequence[int], axis: int,
                       usage: str) -> tuple[dict[int, list[float]], dict[int, tuple[float, float]]]:
    """The boxes of slices with two or more points (their corners), and the single clicks of
    the others (row, column)."""
    boxes, clicks = {}, {}
    for k, corners in _points_by_slice(points, "foreground", shape, axis, usage).items():
        rows, columns = [c[0] for c in corners], [c[1] for c in corners]
        if len(corners) >= 2:
            boxes[k] = [min(columns), min(rows), max(columns), max(rows)]
        else:
            clicks[k] = corners[0]
    return boxes, clicks


def make_infer_task(model: ServedModel) -> AdapterInferTask:
    """The infer task for a served model."""
    if isinstance(model, Box3DModel):
        return BoxVolumeSegmentationTask(model)
    if isinstance(model, BoxModel):
        return BoxSegmentationTask(model)
    return BundleSegmentationTask(model) if model.kind.dense else BundleClassificationTask(model)
