"""Fine-tune a served model's adapters on the studies annotators have labelled.

Every model trains by running a bundle's ``train.json`` (the same recipe, transforms, loss,
schedule and checkpoint choice as ``python -m monai.bundle run``) on the labelled pairs of the
datastore (a data fraction of them; a tenth, at least one, held out to choose the checkpoint):
a bundle model its own bundle, the box-prompted LiteMedSAM the 2D segmentation recipe with box
prompts drawn around the labels (`specs.BoxModel.training`). The result is published as a
complete adapter folder (``<runs>/<model>/monailabel_adapters``), which
the infer task picks up at its next request. Classification models do not train here: a MONAI
Label datastore holds label images, not classes.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.train import TrainTask
from monailabel.utils.others.generic import name_to_device

from medadapt.adapters import list_methods, make_config
from medadapt.engine.bundle import Verbatim, parses_as_itself
from medadapt.io import read_json_or
from medadapt.monailabel.errors import InvalidInput
from medadapt.monailabel.limits import MAX_TRAIN_BATCH, MAX_TRAIN_EPOCHS
from medadapt.monailabel.specs import TRAIN_STATS, ServedModel
from medadapt.patterns import option_pattern_problems

logger = logging.getLogger("medadapt.monailabel")

STATS_NAME = TRAIN_STATS
DEFAULTS: dict[str, Any] = {
    "max_epochs": 5,
    "fraction": 1.0,  # share of the labelled studies to train on, in (0, 1]
    "seed": 0,
    "batch_size": 2,
    "lr_adapter": 1e-3,  # DKA: adapters at 1e-3, head at 1e-4
    "lr_head": 1e-4,
    "method": None,  # None: the served model's method
    "method_options": {},
    "init": "served",  # "served": continue from the served adapters of the same method; "fresh"
    "box_jitter": 20,  # box-prompt training: MedSAM moves each box side by up to 20 px
}


class AdapterTrainTask(TrainTask):
    """MONAI Label training task for one served model (segmentation, volume or box models).

    Request options (all optional, see `DEFAULTS`): max_epochs, fraction, seed, batch_size,
    lr_adapter, lr_head, method, method_options, init, box_jitter, device.
    """

    def __init__(self, model: ServedModel):
        super().__init__(f"Fine-tune the adapters of {model.name} ({model.method} by default) on the "
                         f"labelled studies; writes {model.label_adapters}")
        self.spec = model

    def config(self) -> dict[str, Any]:
        return {**DEFAULTS, "method": self.spec.method}

    def stats(self) -> dict[str, Any]:
        return read_json_or(Path(self.spec.label_adapters) / STATS_NAME, {})

    # ------------------------------------------------------------------ run
    def __call__(self, request: dict[str, Any], datastore: Datastore) -> dict[str, Any]:
        options = self.options(request)
        pairs = sorted((d for d in datastore.datalist() if d.get("label")), key=lambda d: d["image"])
        pairs = [p for p in pairs if self._fits(p["image"])]
        if not pairs:
            raise InvalidInput(f"model {self.spec.name!r}: no labelled studies it can train on yet; save final "
                               "labels first (PUT /datastore/label?image=ID&tag=final)", 409)
        count = max(1, round(options["fraction"] * len(pairs)))
        subset = sorted(random.Random(options["seed"]).sample(pairs, count), key=lambda d: d["image"])
        device = torch.device(name_to_device(request.get("device")))
        started = time.time()
        start_from = self.initial_adapters(options)
        model, record = self.train_bundle(subset, options, device, start_from)
        stats = {
            "model": self.spec.name,
            "method": options["method"],
            "init": start_from or "fresh",
            "epochs": options["max_epochs"],
            **record,
            "studies_used": len(subset),
            "studies_labelled": len(pairs),
            "fraction": options["fraction"],
            "seed": options["seed"],
            "seconds": round(time.time() - started, 1),
            "adapters": self.spec.label_adapters,
        }
        publish(model, self.spec.label_adapters, stats)
        logger.info("trained %s on %d of %d labelled studies: %s", self.spec.name, len(subset), len(pairs), stats)
        return stats

    def options(self, request: dict[str, Any]) -> dict[str, Any]:
        """The training options of ``request`` (see `DEFAULTS`), typed and range-checked;
        InvalidInput (400) naming the first bad one.

        These values go into a MONAI bundle config, where a string can be Python (``$``), a
        reference (``@``) or a macro (``%``): numbers become numbers, names must be ones the
        server has, and method options must be the method's config fields, of their types,
        with strings the config parser takes as plain text.
        """
        options = self.config()
        options.update({k: v for k, v in request.items() if k in DEFAULTS and v is not None})
        options["max_epochs"] = _whole("max_epochs", options["max_epochs"], 1, MAX_TRAIN_EPOCHS)
        options["batch_size"] = _whole("batch_size", options["batch_size"], 1, MAX_TRAIN_BATCH)
        options["seed"] = _whole("seed", options["seed"], 0, 2 ** 32 - 1)
        options["box_jitter"] = _whole("box_jitter", options["box_jitter"], 0, 1024)
        options["fraction"] = _real("fraction", options["fraction"], 0.0, 1.0)
        options["lr_adapter"] = _real("lr_adapter", options["lr_adapter"], 0.0, 1.0)
        options["lr_head"] = _real("lr_head", options["lr_head"], 0.0, 1.0)
        if options["init"] not in ("served", "fresh"):
            raise InvalidInput(f"init must be 'served' or 'fresh', got {options['init']!r}", 400)
        if options["method"] not in list_methods():
            raise InvalidInput(f"unknown method {options['method']!r}; one of {list_methods()}", 400)
        options["method_options"] = _method_options(options["method"], options["method_options"])
        return options

    def _fits(self, image: str) -> bool:
        from medadapt.monailabel.imagefiles import ImageFileError, file_kind

        try:
            return file_kind(image) == ("3d" if self.spec.dimension == 3 else "2d")
        except ImageFileError:
            return False

    def initial_adapters(self, options: dict[str, Any]) -> str | None:
        """The served adapters to continue from when they are of the requested method (and no
        new options are asked for); None starts from freshly injected ones."""
        from medadapt.checkpoint import read_adapter_config

        state = self.spec.current_adapters()
        if (options["init"] == "served" and state is not None and not options["method_options"]
                and read_adapter_config(state.folder)["method"] == options["method"]):
            return state.folder
        return None

    def train_bundle(self, pairs: list[dict], options: dict[str, Any], device: torch.device,
                     start_from: str | None) -> tuple[torch.nn.Module, dict[str, Any]]:
        """Run the model's bundle's train.json on ``pairs``; returns the best model and what it measured."""
        from medadapt.engine.bundle import run_workflow

        bundle, settings = self.spec.training(options)

        held = max(1, len(pairs) // 10) if len(pairs) > 1 else 0
        order = random.Random(options["seed"]).sample(pairs, len(pairs))
        val, train = (order[:held], order[held:]) if held else (pairs, pairs)
        if not held:
            logger.warning("%s: one labelled study: it is trained on and validated on", self.spec.name)
        entries = lambda items: [{"image": d["image"], "label": d["label"], "case": Path(d["image"]).name}  # noqa: E731
                                 for d in items]
        # Verbatim: the studies' names are data; the config parser would read "$HOME.png" as Python.
        data = Verbatim({"train": entries(train), "val": entries(val), "test": [], "root": "", "demo": False,
                         "counts": {"train": len(train), "val": len(val), "test": 0}})
        run_dir = Path(self.spec.label_adapters).parent / "monailabel_run"
        overrides = {
            **settings, "bundle_root": bundle, "dataset_dir": "served studies", "data": data,
            "output_dir": str(run_dir), "max_epochs": options["max_epochs"], "batch_size": options["batch_size"],
            "lr_adapter": options["lr_adapter"], "lr_head": options["lr_head"], "seed": options["seed"],
            "method": options["method"], "val_interval": 1, "progress": False, "export_full_model": False,
            "publish": False,
            "device": f"$torch.device({str(device)!r})", "network_def#adapter_checkpoint": start_from,
        }
        if options["method_options"]:
            overrides["method_options"] = options["method_options"]
        if run_dir.exists():
            shutil.rmtree(run_dir)
        flow = run_workflow(Path(bundle) / "train.json", **overrides)
        model = flow.parser.get_parsed_content("network")
        from medadapt.checkpoint import load_adapters

        best = run_dir / "models" / "best_adapters"
        load_adapters(model, best)  # the checkpoint the validation set chose, not the last epoch
        metrics = json.loads((run_dir / "metrics.json").read_text(encoding="utf-8"))
        shutil.rmtree(run_dir, ignore_errors=True)
        return model, {"metrics": metrics, "studies_validated": len(val)}


def _whole(name: str, value: Any, low: int, high: int) -> int:
    """``value`` as a whole number in [low, high] (a JSON number, or text holding one)."""
    number = _number(name, value)
    if number != int(number) or not low <= number <= high:
        raise InvalidInput(f"{name} must be a whole number from {low} to {high}, got {value!r}", 400)
    return int(number)


def _real(name: str, value: Any, low: float, high: float) -> float:
    """``value`` as a number in (low, high]."""
    number = _number(name, value)
    if not low < number <= high:
        raise InvalidInput(f"{name} must be a number above {low:g} and at most {high:g}, got {value!r}", 400)
    return number


def _number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise InvalidInput(f"{name} must be a number, got {value!r}", 400)
    try:
        number = float(value)
    except ValueError:
        raise InvalidInput(f"{name} must be a number, got {value!r}", 400) from None
    if not math.isfinite(number):
        raise InvalidInput(f"{name} must be a finite number, got {value!r}", 400)
    return number


def _method_options(method: str, options: Any) -> dict[str, Any]:
    """``options`` if they are options of ``method``, of their fields' types, with no string
    that a bundle config would read as Python, a reference or a macro."""
    if not isinstance(options, dict):
        raise InvalidInput(f"method_options must be a JSON object, got {options!r}", 400)
    try:
        make_config(method, options)
    except ValueError as error:
        raise InvalidInput(f"method_options: {error}", 400) from None
    patterns = option_pattern_problems(options)
    if patterns:
        raise InvalidInput(f"method_options: {patterns[0]}", 400)

    def texts(value):
        if isinstance(value, str):
            yield value
        elif isinstance(value, (list, tuple)):
            for item in value:
                yield from texts(item)

    for key, value in options.items():
        for text in texts(value):
            if not parses_as_itself(text):
                raise InvalidInput(f"method_options.{key}: {text[:60]!r} would be read as code by the bundle "
                                   "config (a leading '$', '@' or '%', or '::', '@#', '%#'); send plain text", 400)
    return dict(options)


def publish(model: torch.nn.Module, folder: str | Path, stats: dict[str, Any]) -> Path:
    """Write the adapters into a new folder and swap it in, so that a reader sees the old or
    the new adapters, never half of each."""
    from medadapt.checkpoint import save_adapters

    folder = Path(folder)
    tag = f"{os.getpid()}-{time.time_ns()}"
    staging, retired = folder.with_name(f".{folder.name}.new-{tag}"), folder.with_name(f".{folder.name}.old-{tag}")
    save_adapters(model, staging)
    (staging / STATS_NAME).write_text(json.dumps(stats, indent=1), encoding="utf-8")
    if folder.exists():
        os.replace(folder, retired)
    os.replace(staging, folder)
    shutil.rmtree(retired, ignore_errors=True)
    return folder
