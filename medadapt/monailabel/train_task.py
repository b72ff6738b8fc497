"""Fine-tune a served model's adapters on the studies annotators have labelled.

Every model trains by running a bundle's ``train.json`` (the same recipe, transforms, loss,
schedule and checkpoint choice as ``python -m monai.bundle run``) on the labelled pairs of the
datastore (a data fraction of them; a tenth, at least one, held out to choose the checkpoint):
a bundle model its own bundle, the box-prompted LiteMedSAM the 2D segmentation recipe with box
prompts drawn around the labels (`specs.BoxModel.training`). The result is published as a
complete adapter folder (``monailabel_adapters`` beside the bundle's ``best_adapters``), which
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

from medadapt.engine.prompts import BoxPromptsFromLabels
from medadapt.monailabel.errors import InvalidInput
from medadapt.monailabel.specs import ServedModel

logger = logging.getLogger("medadapt.monailabel")

STATS_NAME = "train_stats.json"
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
        path = Path(self.spec.label_adapters) / STATS_NAME
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}

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
        options = self.config()
        options.update({k: v for k, v in request.items() if k in DEFAULTS and v is not None})
        try:
            options["max_epochs"] = int(options["max_epochs"])
            options["batch_size"] = int(options["batch_size"])
            options["fraction"] = float(options["fraction"])
            options["seed"] = int(options["seed"])
        except (TypeError, ValueError) as error:
            raise InvalidInput(f"bad training option: {error}", 400) from None
        if options["max_epochs"] < 1 or options["batch_size"] < 1:
            raise InvalidInput("max_epochs and batch_size must be >= 1", 400)
        if not (0.0 < options["fraction"] <= 1.0) or math.isnan(options["fraction"]):
            raise InvalidInput(f"fraction must be in (0, 1], got {options['fraction']}", 400)
        if options["init"] not in ("served", "fresh"):
            raise InvalidInput(f"init must be 'served' or 'fresh', got {options['init']!r}", 400)
        try:  # the box prompts' own check, before any work
            BoxPromptsFromLabels(options["box_jitter"])
        except ValueError as error:
            raise InvalidInput(str(error), 400) from None
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
        data = {"train": entries(train), "val": entries(val), "test": [], "root": "", "demo": False,
                "counts": {"train": len(train), "val": len(val), "test": 0}}
        run_dir = Path(self.spec.label_adapters).parent / "monailabel_run"
        overrides = {
            **settings, "bundle_root": bundle, "dataset_dir": "served studies", "data": data,
            "output_dir": str(run_dir), "max_epochs": options["max_epochs"], "batch_size": options["batch_size"],
            "lr_adapter": options["lr_adapter"], "lr_head": options["lr_head"], "seed": options["seed"],
            "method": options["method"], "val_interval": 1, "progress": False, "export_full_model": False,
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
