"""What the app serves: the bundles' models, exactly as their ``inference.json`` builds them.

A `BundleModel` reads a bundle's ``inference.json`` with MONAI's ``ConfigParser`` and takes
its components as they are: ``preprocessing``, ``network_def`` (the pretrained backbone with
the adapters loaded strictly, ``adapter_checkpoint``), ``inferer`` and ``label_map`` (the
prediction turned into a label map on the input's own grid). So the served model is the
bundle's model and its labels are the bundle's predictions; training runs the bundle's
``train.json`` on the labelled studies. `BoxModel` is the interactive LiteMedSAM, prompted
by a box on an image; `Box3DModel` carries it through a volume slice by slice.

Two adapter folders are looked at, the newest complete one wins:

- ``<bundle>/models/adapters``: what the bundle's ``train.json`` published (its best model),
  with ``<bundle>/models/run.json`` naming the run whose ``metrics.json`` holds its validation;
- ``<runs>/<name>/monailabel_adapters``: what this app's training task wrote, with its
  ``train_stats.json``.

A bundle model without trained adapters is not served (its head or decoder would answer
noise) unless the server is told to (``serve_untrained``); the box models' prompt encoder and
mask decoder are LiteMedSAM's own, so they are served as they are.

A JSON config (``medadapt label --config FILE``) chooses the served models and may override
bundle settings (for example a smaller backbone)::

    {"models": {"busi_small": {"bundle": "dka_busi_seg",
                               "overrides": {"backbone": "timm:convnext_atto", "image_size": 64}}},
     "include_bundles": false, "include_box_model": true, "include_box3d_model": true}
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from medadapt.checkpoint import adapter_files
from medadapt.io import read_json

logger = logging.getLogger("medadapt.monailabel")

LABEL_ADAPTERS = "monailabel_adapters"
TRAIN_STATS = "train_stats.json"  # in LABEL_ADAPTERS: what this app's training measured
BOX_MODEL = "litemedsam_box"
BOX3D_MODEL = "litemedsam_box3d"
TRAINING_BUNDLE = "dka_busi_seg"  # the box model trains through this bundle's recipe
@dataclass(frozen=True)
class AdapterState:
    """A complete adapter folder and a stamp that changes whenever it is rewritten."""

    folder: str
    stamp: tuple[int, int, int]


def recorded_validation(state: AdapterState | None) -> dict[str, Any] | None:
    """The validation recorded for the adapters of ``state``: {"metric": key metric, "best":
    its best value, "epoch": when, "record": the file}, or None when none was recorded.

    This app's training keeps its run's metrics in the adapter folder's `TRAIN_STATS`; a
    bundle's published model (``<bundle>/models/adapters``) names its run in
    ``<bundle>/models/run.json``, whose ``metrics.json`` holds ``best_<key metric>``."""
    from medadapt.engine.runs import RUN_RECORD

    if state is None:
        return None
    folder = Path(state.folder)
    try:
        if (folder / TRAIN_STATS).is_file():
            record = folder / TRAIN_STATS
            metrics = read_json(record).get("metrics") or {}
        else:
            record = Path(read_json(folder.parent / RUN_RECORD)["run"]) / "metrics.json"
            metrics = read_json(record)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    best = {k: v for k, v in metrics.items() if k.startswith("best_") and k != "best_epoch"}
    if len(best) != 1:
        return None
    (key, value), = best.items()
    return {"metric": key[len("best_"):], "best": value, "epoch": metrics.get("best_epoch"), "record": str(record)}


def bundle_adapters(bundle: str | Path) -> Path:
    """Where a bundle's training publishes its best adapters: ``<bundle>/models/adapters``."""
    return Path(bundle) / "models" / "adapters"


def newest_adapters(folders: list[str | Path]) -> AdapterState | None:
    """The newest complete adapter folder among ``folders`` (config and weights present)."""
    best = None
    for folder in folders:
        config, weights = adapter_files(Path(folder))
        try:
            c, w = config.stat(), weights.stat()
        except OSError:
            continue
        state = AdapterState(str(Path(folder).resolve()), (max(c.st_mtime_ns, w.st_mtime_ns), w.st_size, c.st_size))
        if best is None or state.stamp[0] > best.stamp[0]:
            best = state
    return best


@dataclass
class ServedModel:
    """What the infer and train tasks need of a served model.

    Arguments:
      name: the model name in MONAI Label (``/infer/<name>``).
      task: "segmentation3d", "segmentation", "classification", "box_segmentation" or
        "box_segmentation3d".
      labels: output names in channel order (classes, or segmented regions).
      label_values: MONAI Label ``labels``: {name: value written in label maps}.
      adapters: folder of trained adapters (may not exist yet).
      runs: this server's own folder for the model: what its training task writes.
      description: shown by ``GET /info/``.
      source: where the model came from, for messages.
      sequences: the input channels' names when they are separate series of one study (BraTS:
        t1, t1ce, t2, flair); empty for single-image input.
    """

    name: str
    task: str
    labels: list[str]
    label_values: dict[str, int] | list[str]
    adapters: str
    description: str = ""
    source: str = "python"
    method: str = "dka"
    backbone: str = "litemedsam"
    pretrained: bool = True
    in_channels: int = 3
    sequences: list[str] = field(default_factory=list)
    runs: str = "runs"
    serve_untrained: bool = False  # serve it without trained adapters (the server's --serve-untrained)
    # Whether the model without trained adapters answers sensibly (a pretrained head).
    useful_untrained: ClassVar[bool] = False

    @property
    def kind(self):
        """The task object (`medadapt.tasks`) of ``task``."""
        from medadapt.tasks import get_task

        return get_task(self.task)

    @property
    def dimension(self) -> int:
        return self.kind.spatial_dims

    @property
    def label_adapters(self) -> str:
        """Where this app's training task writes adapters: ``<runs>/<name>/monailabel_adapters``."""
        return str(Path(self.runs) / self.name / LABEL_ADAPTERS)

    @property
    def trainable(self) -> bool:
        """Labels in a MONAI Label datastore are images, so only segmentation models train here."""
        return self.kind.dense

    def training(self, options: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        """The bundle folder whose ``train.json`` trains this model, and the settings it runs
        with (``options``: the training request's, see `train_task.DEFAULTS`)."""
        raise NotImplementedError(f"model {self.name!r} does not train here")

    def current_adapters(self) -> AdapterState | None:
        """The newest complete adapter folder of this model, or None (serve fresh adapters)."""
        return newest_adapters([self.adapters, self.label_adapters])

    def untrained_note(self) -> str:
        return self.kind.untrained_note

    def validation(self) -> dict[str, Any] | None:
        """The validation recorded for the served adapters (`recorded_validation`)."""
        return recorded_validation(self.current_adapters())

    def refusal(self) -> str | None:
        """Why the model is not served now (no trained adapters), or None when it is."""
        if self.useful_untrained or self.serve_untrained or self.current_adapters() is not None:
            return None
        return (f"model {self.name!r} has no trained adapters yet (looked in {self.adapters} and {self.label_adapters}), "
                f"so it is not served: {self.untrained_note()}; train it (POST /train/{self.name}) or start the "
                "server with --serve-untrained")


@dataclass
class BundleModel(ServedModel):
    """A bundle's model, built from its ``inference.json`` (see the module docstring).

    Arguments (beyond `ServedModel`'s):
      bundle: the bundle folder.
      overrides: bundle settings that replace the config's (MONAI's ``#`` ids allowed).
    """

    bundle: str = ""
    overrides: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_bundle(cls, folder: str | Path, runs: str | Path, name: str | None = None,
                    overrides: dict[str, Any] | None = None) -> BundleModel:
        """The served model of the bundle in ``folder`` (named ``name``, default the folder's).

        Its trained adapters: those the bundle published (``<bundle>/models/adapters``) when it
        is served as it is; a model with its own name or settings has its own folder,
        ``<runs>/<name>/adapters`` (the bundle's would not fit another backbone)."""
        from medadapt.backbones import ships_weights
        from medadapt.data import get_dataset

        folder = Path(folder).resolve()
        overrides = dict(overrides or {})
        own = (name or folder.name) == folder.name and not overrides
        name = name or folder.name
        adapters = bundle_adapters(folder) if own else Path(runs) / name / "adapters"
        model = cls(name=name, task="", labels=[], label_values={}, adapters=str(adapters),
                    bundle=str(folder), overrides=overrides, source=f"bundle {folder}", runs=str(runs))
        parser = model.parser()
        value = parser.get_parsed_content
        model.task = value("task")
        model.labels = list(value("class_names"))
        dataset = get_dataset(value("dataset_name"))
        settings = {key: value(key) for key in dataset.label_settings if key in parser}
        # A classifier's label image paints the image with its class: values 1..K (0 shows nothing).
        model.label_values = ({name: i + 1 for i, name in enumerate(model.labels)} if model.kind.label_kind == "class"
                              else dataset.label_values(model.task, **settings))
        network = parser["network_def"]
        model.method = value("network_def#method") if "method" in network else "dka"
        model.backbone = value("network_def#backbone")
        model.in_channels = int(value("network_def#in_channels"))
        model.pretrained = bool(value("network_def#backbone_checkpoint")) or ships_weights(model.backbone)
        if dataset.sequences and model.in_channels == len(dataset.sequences):
            model.sequences = list(dataset.sequences)  # served from the series of a DICOMweb study
        metadata = read_json(folder / "metadata.json") if (folder / "metadata.json").is_file() else {}
        model.description = str(metadata.get("description") or f"{model.kind.description} ({name})")
        return model

    def parser(self, config: str = "inference.json", **extra: Any):
        """A MONAI ConfigParser of the bundle's ``config`` as the server runs it: settings for
        the studies it is given (never the bundle's demo) and this model's adapter folder."""
        from monai.bundle import ConfigParser

        parser = ConfigParser()
        parser.read_config(str(Path(self.bundle) / config))
        parser.update({"bundle_root": self.bundle, "dataset_dir": "served studies", "progress": False,
                       **self.overrides, **extra})
        return parser

    def training(self, options: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        """The bundle and settings that train this model: its own, with its overrides."""
        return self.bundle, dict(self.overrides)

    def components(self, adapters: str | None) -> dict[str, Any]:
        """The bundle's preprocessing, network (adapters from ``adapters`` loaded strictly, or
        freshly injected ones for None), inferer and label map, from one parser, so that the
        label map inverts exactly the preprocessing that prepared the input."""
        parser = self.parser(**{"network_def#adapter_checkpoint": adapters})
        try:
            return {key: parser.get_parsed_content(key)
                    for key in ("preprocessing", "network_def", "inferer", "label_map")}
        except RuntimeError as error:
            raise config_error_cause(error) from None


def config_error_cause(error: BaseException) -> BaseException:
    """The error a MONAI config component raised, from under MONAI's "Failed to instantiate"
    wrappers, so that messages name the real problem (a refused adapter folder, say)."""
    while isinstance(error, RuntimeError) and error.__cause__ is not None:
        error = error.__cause__
    return error


@dataclass
class BoxModel(ServedModel):
    """The interactive model: LiteMedSAM with DKA adapters, prompted by a box.

    With no trained adapters this is LiteMedSAM itself (DKA starts as the identity) with its
    pretrained mask decoder, so it segments well from the first request.
    """

    image_size: int = 256
    bundle: str = ""  # the 2D segmentation bundle whose train.json trains it (see `training`)
    useful_untrained: ClassVar[bool] = True

    @classmethod
    def default(cls, runs: str | Path, bundle_root: str | Path = "bundles") -> BoxModel:
        return cls(name=BOX_MODEL, task="box_segmentation", labels=["object"], label_values={"object": 1},
                   adapters=str(Path(runs) / BOX_MODEL / "adapters"), runs=str(runs),
                   bundle=str(Path(bundle_root) / TRAINING_BUNDLE),
                   description='Box-prompted 2D segmentation (LiteMedSAM + DKA) of PNG/JPG images; send params '
                               '{"box": [x0, y0, x1, y1]} in image pixels, or DeepGrow clicks {"foreground": [[i, j, '
                               '0]]} (one click: the region around it; two or more: the corners of a box; '
                               '"background" clicks remove what they touch), or an "roi"')

    @property
    def trainable(self) -> bool:
        return (Path(self.bundle) / "train.json").is_file()

    def training(self, options: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        """The bundle and settings that train this model: the 2D segmentation recipe (its
        transforms, loss, schedule, validation and checkpoint choice) with this network and box
        prompts drawn around each reference mask, moved by up to ``box_jitter`` pixels in
        training and not at all for validation, as MedSAM trains."""
        if options["method"] != self.method or options["method_options"]:
            from medadapt.monailabel.errors import InvalidInput

            # The served model is built with its own method and options; other adapters would not load.
            raise InvalidInput(f"model {self.name!r} trains {self.method} adapters with their default options "
                               "only (no method or method_options)", 400)
        prompts = "medadapt.engine.prompts.BoxPromptsFromLabels"
        return self.bundle, {
            "backbone": self.backbone, "image_size": self.image_size, "network_def#task": self.task,
            "train#trainer#prepare_batch": {"_target_": prompts, "jitter": int(options["box_jitter"])},
            "validate#evaluator#prepare_batch": {"_target_": prompts, "jitter": 0},
        }

    def build_network(self, adapters: str | None = None):
        """The served network: LiteMedSAM with this model's adapters, its convolution weights
        channels-last. Served networks only infer, and on a CPU oneDNN runs TinyViT's
        convolutions channels-last without reordering the weights at each call: the encoder
        takes a fifth less time under bfloat16 on 2 CPU cores (`python benchmarks/run.py
        --only box3d`; docs/box3d.md, "Speed")."""
        import torch

        from medadapt.models import create_model

        network = create_model("box_segmentation", backbone=self.backbone, method=self.method,
                               adapter_checkpoint=adapters)
        return network.to(memory_format=torch.channels_last)

    def preprocessing(self):
        """The 2D segmentation bundle's own preprocessing (inference.json's), at this model's size."""
        from medadapt.engine.bundle import parsed

        return parsed(Path(self.bundle) / "inference.json", "preprocessing", image_size=self.image_size)


@dataclass
class Box3DModel(BoxModel):
    """The interactive 3D model: the box model carried through a volume slice by slice
    (`medadapt.models.box_propagation`). It shares the box model's adapter folders, so
    training ``litemedsam_box`` improves both; it has no training task of its own.
    """

    @classmethod
    def default(cls, runs: str | Path, bundle_root: str | Path = "bundles") -> Box3DModel:
        return cls(name=BOX3D_MODEL, task="box_segmentation3d", labels=["object"], label_values={"object": 1},
                   adapters=str(Path(runs) / BOX_MODEL / "adapters"), runs=str(runs),
                   bundle=str(Path(bundle_root) / TRAINING_BUNDLE),
                   description='Box-prompted 3D segmentation (LiteMedSAM + DKA) of single-channel NIfTI volumes: a '
                               'box on one slice, carried slice by slice; send params {"box": [x0, y0, x1, y1], '
                               '"slice": k, "axis": a} in voxel indices, or a 3D "roi", or DeepGrow clicks '
                               '{"foreground": [[i, j, k]]} (one click: the region around it; two or more on a slice: '
                               'the corners of its box; "background" clicks remove what they touch)')

    @property
    def trainable(self) -> bool:
        return False  # trained through the 2D box model, whose adapters it serves


# ---------------------------------------------------------------------------- the model list
def bundle_models(bundle_root: str | Path, runs: str | Path) -> list[BundleModel]:
    """The served models of every bundle in ``bundle_root``; a broken bundle is logged and
    skipped so that one bad folder does not take the other models down."""
    root = Path(bundle_root)
    if not root.is_dir():
        logger.warning("no bundle folder %s: serving no bundle models", root)
        return []
    models = []
    for folder in sorted(p for p in root.iterdir() if (p / "inference.json").is_file()):
        try:
            models.append(BundleModel.from_bundle(folder, runs))
        except Exception as error:  # any config error: report it and keep serving the others
            logger.error("skipping bundle %s: %s", folder, error)
    return models


def load_models(config: str | Path | None, bundle_root: str | Path, runs: str | Path) -> list[ServedModel]:
    """The served models: from ``config`` if given (plus all bundles and the box models if it
    says so), else every bundle in ``bundle_root`` and the LiteMedSAM box models (2D and 3D)."""
    if not config:
        return [*bundle_models(bundle_root, runs), BoxModel.default(runs, bundle_root),
                Box3DModel.default(runs, bundle_root)]
    path = Path(config)
    if not path.is_file():
        raise FileNotFoundError(f"model config {path} does not exist")
    data = read_json(path)
    if not isinstance(data, dict):
        raise ValueError(f"model config {path} must hold a JSON object, got {type(data).__name__}")
    unknown = set(data) - {"models", "include_bundles", "include_box_model", "include_box3d_model"}
    if unknown:
        raise ValueError(f"model config {path}: unknown keys {sorted(unknown)}")
    models: list[ServedModel] = []
    for name, entry in data.get("models", {}).items():
        bad = set(entry) - {"bundle", "overrides"}
        if bad or "bundle" not in entry:
            raise ValueError(f"model config {path}: model {name!r} needs 'bundle' (a folder of {bundle_root}) and "
                             f"may have 'overrides'; got {sorted(entry)}")
        folder = Path(entry["bundle"])
        folder = folder if folder.is_absolute() else Path(bundle_root) / folder
        if not (folder / "inference.json").is_file():
            raise ValueError(f"model config {path}: model {name!r}: no bundle at {folder}")
        models.append(BundleModel.from_bundle(folder, runs, name=name, overrides=entry.get("overrides")))
    if data.get("include_bundles", False):
        models += bundle_models(bundle_root, runs)
    if data.get("include_box_model", False):
        models.append(BoxModel.default(runs, bundle_root))
    if data.get("include_box3d_model", False):
        models.append(Box3DModel.default(runs, bundle_root))
    names = [m.name for m in models]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"model config {path}: duplicate model names {duplicates}")
    if not models:
        raise ValueError(f"model config {path} defines no models")
    return models
