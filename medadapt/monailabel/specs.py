"""What the app serves: one `ModelSpec` per model, from bundles, a JSON file or built in.

A spec says how to build the model (``create_model`` keywords), where its trained adapters
live, and how its inputs are prepared. Models are always built as the pretrained backbone
with adapters injected, and trained adapters are loaded strictly on top
(``create_model(..., adapter_checkpoint=DIR)``), never through MONAI Label's non-strict loader.

Two adapter folders are looked at, the newest complete one wins:

- ``adapters``: what the bundle's ``train.json`` wrote (``<runs>/<name>/models/best_adapters``);
- ``<that folder's parent>/monailabel_adapters``: what this app's training task wrote.

A JSON config (``medadapt label --config FILE``) lists models by name::

    {"models": {"busi_tiny": {"task": "segmentation", "labels": ["lesion"], "image_size": 64,
                              "model": {"backbone": "timm:convnext_atto", "num_classes": 1,
                                        "multilabel": true, "method": "dka"}}},
     "include_bundles": false}

Relative ``adapters`` paths resolve against the runs folder.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from medadapt.checkpoint import CONFIG_NAME, WEIGHTS_NAME

logger = logging.getLogger("medadapt.monailabel")

TASKS = ("segmentation3d", "segmentation", "classification", "box_segmentation")
LABEL_ADAPTERS = "monailabel_adapters"
BOX_MODEL = "litemedsam_box"
# Keys of a bundle's network_def that are not create_model keywords we pass through.
_NETWORK_DEF_SKIP = {"_target_", "_requires_", "_disabled_", "_desc_", "_mode_", "task", "adapter_checkpoint"}
_CREATE_MODEL = "medadapt.models.create_model"
# Backbones whose weights ship inside an installed package: pretrained without a checkpoint.
BUNDLED_WEIGHTS = ("litemedsam", "efficientnet_lite0")
_TASK_TEXT = {
    "segmentation3d": "3D segmentation of NIfTI volumes",
    "segmentation": "2D segmentation of PNG/JPG images",
    "classification": "Classification of PNG/JPG images",
    "box_segmentation": "Box-prompted 2D segmentation of PNG/JPG images",
}


@dataclass(frozen=True)
class AdapterState:
    """A complete adapter folder and a stamp that changes whenever it is rewritten."""

    folder: str
    stamp: tuple[int, int, int]


@dataclass
class ModelSpec:
    """One served model.

    Arguments:
      name: the model name in MONAI Label (``/infer/<name>``).
      task: a ``create_model`` task: "segmentation3d", "segmentation", "classification" or
        "box_segmentation".
      model: the other ``create_model`` keywords (backbone, num_classes, method, ...).
      adapters: folder of trained adapters (may not exist yet).
      labels: output names in channel order: classes, or segmented regions.
      description: shown by ``GET /info/``.
      dataset: "brats", "busi", "isic2018" or "isic2019": picks the training augmentations.
      image_size: 2D input size the model sees (images are resized to it and back).
      normalization: 2D normalisation scheme (see ``medadapt.data.NORMALIZATIONS``).
      roi_size, sw_batch_size, sw_overlap: sliding-window settings for volumes.
      pixdim: voxel spacing volumes are resampled to (None keeps theirs).
      release: BraTS label convention of written labels ("auto": from the file name, else 2021).
      preprocessing: a ready MONAI Compose for inputs (a bundle's); None builds one from the
        fields above.
      source: where the spec came from, for messages.
      train: defaults for the training task (max_epochs, fraction, ...).
    """

    name: str
    task: str
    model: dict[str, Any]
    adapters: str
    labels: list[str]
    description: str = ""
    dataset: str | None = None
    image_size: int = 256
    normalization: str = "minmax"
    roi_size: tuple[int, ...] | None = None
    sw_batch_size: int = 1
    sw_overlap: float = 0.25
    pixdim: tuple[float, ...] | None = None
    release: str = "auto"
    preprocessing: Any = None
    source: str = "python"
    train: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"model {self.name!r}: unknown task {self.task!r}; choose one of {TASKS}")
        if "task" in self.model or "adapter_checkpoint" in self.model:
            raise ValueError(f"model {self.name!r}: give 'task' and the adapter folder outside 'model'")
        if self.task == "segmentation3d":
            if not self.roi_size or len(self.roi_size) != 3:
                raise ValueError(f"model {self.name!r}: a volume model needs roi_size (3 numbers)")
            self.roi_size = tuple(int(s) for s in self.roi_size)
            axis = int(self.model.get("slice_axis", 2))
            self.model.setdefault("num_slices", self.roi_size[axis])
            if int(self.model["num_slices"]) != self.roi_size[axis]:
                raise ValueError(f"model {self.name!r}: num_slices={self.model['num_slices']} must equal "
                                 f"roi_size[{axis}]={self.roi_size[axis]} (the patch depth on the slice axis)")
        if self.pixdim is not None:
            self.pixdim = tuple(float(p) for p in self.pixdim)
        if not self.labels:
            raise ValueError(f"model {self.name!r}: labels (output names) are required")
        if not self.description:
            self.description = f"{_TASK_TEXT[self.task]} ({self.model.get('backbone', 'litemedsam')} + {self.method})"

    # ------------------------------------------------------------------ derived facts
    @property
    def dimension(self) -> int:
        return 3 if self.task == "segmentation3d" else 2

    @property
    def multilabel(self) -> bool:
        return bool(self.model.get("multilabel", False))

    @property
    def method(self) -> str:
        return str(self.model.get("method", "dka"))

    @property
    def pretrained(self) -> bool:
        """Whether the backbone starts from real weights (else create_backbone warns: random)."""
        backbone = self.model.get("backbone", "litemedsam")
        return bool(self.model.get("backbone_checkpoint")) or backbone in BUNDLED_WEIGHTS

    @property
    def label_adapters(self) -> str:
        """Where this app's training task writes adapters."""
        return str(Path(self.adapters).parent / LABEL_ADAPTERS)

    @property
    def trainable(self) -> bool:
        """Labels in a MONAI Label datastore are images, so only segmentation models train here."""
        return self.task != "classification"

    def current_adapters(self) -> AdapterState | None:
        """The newest complete adapter folder of this model, or None (serve fresh adapters)."""
        best = None
        for folder in (self.adapters, self.label_adapters):
            config, weights = Path(folder) / CONFIG_NAME, Path(folder) / WEIGHTS_NAME
            try:
                c, w = config.stat(), weights.stat()
            except OSError:
                continue
            state = AdapterState(str(Path(folder).resolve()), (max(c.st_mtime_ns, w.st_mtime_ns), w.st_size, c.st_size))
            if best is None or state.stamp[0] > best.stamp[0]:
                best = state
        return best

    # ------------------------------------------------------------------ builders
    def build_model(self, adapters: str | None = None, method: str | None = None,
                    method_options: dict[str, Any] | None = None):
        """The pretrained backbone with injected adapters, trained ones loaded strictly.

        Arguments:
          adapters: a trained adapter folder; the method and its options then come from the
            folder's config, so a model retrained with another method is served as trained.
          method, method_options: without ``adapters``, inject these instead of the spec's.
        """
        from medadapt.checkpoint import read_adapter_config
        from medadapt.models import create_model

        kwargs = dict(self.model)
        if adapters:
            config = read_adapter_config(adapters)
            kwargs["method"], kwargs["method_options"] = config["method"], config["options"]
        else:
            if method is not None and method != kwargs.get("method"):
                kwargs["method"], kwargs["method_options"] = method, {}
            if method_options is not None:
                kwargs["method_options"] = method_options
        return create_model(self.task, adapter_checkpoint=adapters, **kwargs)

    def build_preprocessing(self):
        """The input transforms for {"image": path} (the bundle's own when it has them)."""
        if self.preprocessing is not None:
            return self.preprocessing
        from medadapt.data import brats_transforms, image2d_transforms

        if self.task == "segmentation3d":
            return brats_transforms(train=False, release=self.release, roi_size=self.roi_size,
                                    pixdim=self.pixdim, with_label=False)
        task = "classification" if self.task == "classification" else "segmentation"
        return image2d_transforms(train=False, task=task, size=self.image_size,
                                  normalization=self.normalization, with_label=False)

    def build_train_transforms(self, release: str):
        """Training transforms for datastore pairs {"image": path, "label": label path}."""
        from medadapt.data import brats_transforms, image2d_transforms

        if self.task == "segmentation3d":
            return brats_transforms(train=True, release=release, roi_size=self.roi_size, pixdim=self.pixdim,
                                    crop="random", with_label=True)
        # Dermoscopy has no up or left; ultrasound and most other images keep their vertical axis.
        isic = str(self.dataset or "").startswith("isic")
        return image2d_transforms(train=True, task="segmentation", size=self.image_size,
                                  normalization=self.normalization, flip_axes=(0, 1) if isic else (1,),
                                  rotate90=isic, with_label=True)

    # ------------------------------------------------------------------ readers
    @classmethod
    def from_dict(cls, name: str, data: dict[str, Any], runs: str | Path) -> ModelSpec:
        """A spec from a JSON config entry; ``adapters`` defaults to the bundle layout."""
        allowed = {f.name for f in fields(cls)} - {"name", "preprocessing", "source"}
        unknown = set(data) - allowed
        if unknown:
            raise ValueError(f"model {name!r}: unknown keys {sorted(unknown)}; allowed: {sorted(allowed)}")
        for key in ("task", "model", "labels"):
            if key not in data:
                raise ValueError(f"model {name!r}: missing {key!r}")
        values = dict(data)
        values["model"] = dict(values["model"])
        values["adapters"] = str(_under(values.get("adapters") or default_adapters(name, runs), runs))
        values["labels"] = list(values["labels"])
        return cls(name=name, source="config", **values)


def default_adapters(name: str, runs: str | Path) -> Path:
    """Where a bundle's training writes its best adapters: ``<runs>/<name>/models/best_adapters``."""
    return Path(runs) / name / "models" / "best_adapters"


def _under(path: str | Path, root: str | Path) -> Path:
    path = Path(path)
    return path if path.is_absolute() else Path(root) / path


def box_model_spec(runs: str | Path) -> ModelSpec:
    """The interactive model: LiteMedSAM with DKA adapters, prompted by a box.

    With no trained adapters this is LiteMedSAM itself (DKA starts as the identity) with its
    pretrained mask decoder, so it segments well from the first request.
    """
    return ModelSpec(
        name=BOX_MODEL,
        task="box_segmentation",
        model={"backbone": "litemedsam", "method": "dka"},
        adapters=str(default_adapters(BOX_MODEL, runs)),
        labels=["object"],
        description='Box-prompted 2D segmentation (LiteMedSAM + DKA) of PNG/JPG images; send params '
                    '{"box": [x0, y0, x1, y1]} in image pixels',
        image_size=256,
    )


# ---------------------------------------------------------------------------- bundles
def spec_from_bundle(folder: str | Path, runs: str | Path) -> ModelSpec:
    """A spec from a bundle folder holding ``inference.json`` and ``metadata.json``.

    ``network_def`` must target ``medadapt.models.create_model``; its keywords (references
    resolved) become the spec's model, except ``adapter_checkpoint``, which the app sets
    itself. The bundle's ``preprocessing`` is used as is, so the server prepares images
    exactly as evaluation does.
    """
    from monai.bundle import ConfigParser

    folder = Path(folder)
    name = folder.name
    parser = ConfigParser()
    parser.read_config(str(folder / "inference.json"))
    if "demo" in parser:
        # The server reads the studies it is given, never the bundle's demo data: settings
        # such as dka_brats' windows follow the real-data branch.
        parser["demo"] = False
    metadata = json.loads((folder / "metadata.json").read_text())
    network_def = parser["network_def"]
    if network_def.get("_target_") != _CREATE_MODEL:
        raise ValueError(f"bundle {name}: network_def must target {_CREATE_MODEL}, got {network_def.get('_target_')!r}")

    def value(key: str, default: Any = None) -> Any:
        return parser.get_parsed_content(key) if key in parser else default

    model = {k: parser.get_parsed_content(f"network_def#{k}") for k in network_def if k not in _NETWORK_DEF_SKIP}
    task = parser.get_parsed_content("network_def#task")
    outputs = metadata.get("network_data_format", {}).get("outputs", {}).get("pred", {})
    channel_def = outputs.get("channel_def") or {}
    labels = [channel_def[k] for k in sorted(channel_def, key=int)] or list(value("class_names", []))
    # The bundle writes <ckpt_dir>/best_adapters; a ckpt_dir under "runs/" follows the runs folder.
    ckpt_dir = Path(str(value("ckpt_dir", f"runs/{name}/models")))
    if not ckpt_dir.is_absolute() and ckpt_dir.parts[:1] == ("runs",):
        ckpt_dir = Path(runs, *ckpt_dir.parts[1:])
    preprocessing_text = str(parser.get("preprocessing", ""))
    normalization = re.search(r"normalization\s*=\s*['\"](\w+)['\"]", preprocessing_text)
    spec = ModelSpec(
        name=name,
        task=task,
        model=model,
        adapters=str(ckpt_dir / "best_adapters"),
        labels=labels,
        description=str(metadata.get("description") or metadata.get("task") or name),
        dataset=value("dataset_name"),
        image_size=int(value("image_size", 256)),
        normalization=normalization.group(1) if normalization else "minmax",
        roi_size=value("roi_size"),
        sw_batch_size=int(value("sw_batch_size", 1)),
        sw_overlap=float(value("sw_overlap", 0.25)),
        pixdim=value("pixdim"),
        release=str(value("release", "auto")),
        preprocessing=value("preprocessing"),
        source=f"bundle {folder}",
    )
    return spec


def bundle_specs(bundle_root: str | Path, runs: str | Path) -> list[ModelSpec]:
    """Specs of every bundle in ``bundle_root``; a broken bundle is logged and skipped so that
    one bad folder does not take the other models down."""
    root = Path(bundle_root)
    if not root.is_dir():
        logger.warning("no bundle folder %s: serving no bundle models", root)
        return []
    specs = []
    for folder in sorted(p for p in root.iterdir() if (p / "inference.json").is_file()):
        try:
            specs.append(spec_from_bundle(folder, runs))
        except Exception as error:  # any config error: report it and keep serving the others
            logger.error("skipping bundle %s: %s", folder, error)
    return specs


def load_specs(config: str | Path | None, bundle_root: str | Path, runs: str | Path) -> list[ModelSpec]:
    """The served models: from ``config`` if given (plus bundles if it says so), else the
    bundles in ``bundle_root`` and the LiteMedSAM box model."""
    if not config:
        return bundle_specs(bundle_root, runs) + [box_model_spec(runs)]
    path = Path(config)
    if not path.is_file():
        raise FileNotFoundError(f"model config {path} does not exist")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"model config {path} is not valid JSON: {error}") from None
    unknown = set(data) - {"models", "include_bundles", "include_box_model"}
    if unknown:
        raise ValueError(f"model config {path}: unknown keys {sorted(unknown)}")
    specs = [ModelSpec.from_dict(name, entry, runs) for name, entry in data.get("models", {}).items()]
    if data.get("include_bundles", False):
        specs += bundle_specs(bundle_root, runs)
    if data.get("include_box_model", False):
        specs.append(box_model_spec(runs))
    names = [s.name for s in specs]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"model config {path}: duplicate model names {duplicates}")
    if not specs:
        raise ValueError(f"model config {path} defines no models")
    return specs
