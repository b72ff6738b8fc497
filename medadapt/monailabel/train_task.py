"""Fine-tune a served model's adapters on the studies annotators have labelled.

A short, plain loop: the labelled pairs of the datastore (its "final" labels), a data
fraction of them, the model's training transforms, AdamW with the adapter / head learning
rates, Dice + cross-entropy. The result is published as a complete adapter folder
(``monailabel_adapters`` beside the bundle's ``best_adapters``), which the infer task picks up
at its next request. Classification models do not train here: a MONAI Label datastore holds
label images, not classes.
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

from medadapt.monailabel.errors import InvalidInput
from medadapt.monailabel.labelmaps import resolve_release
from medadapt.monailabel.specs import ModelSpec

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
    """MONAI Label training task for one `ModelSpec` (segmentation, volume or box models).

    Request options (all optional, see `DEFAULTS`): max_epochs, fraction, seed, batch_size,
    lr_adapter, lr_head, method, method_options, init, box_jitter, device.
    """

    def __init__(self, spec: ModelSpec):
        super().__init__(f"Fine-tune the adapters of {spec.name} ({spec.method} by default) on the "
                         f"labelled studies; writes {spec.label_adapters}")
        self.spec = spec

    def config(self) -> dict[str, Any]:
        return {**DEFAULTS, "method": self.spec.method, **self.spec.train}

    def stats(self) -> dict[str, Any]:
        path = Path(self.spec.label_adapters) / STATS_NAME
        try:
            return json.loads(path.read_text())
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
        model, start_from = self.initial_model(options)
        losses = self.fit(model.to(device), subset, options, device)
        stats = {
            "model": self.spec.name,
            "method": options["method"],
            "init": start_from,
            "epochs": options["max_epochs"],
            "losses": [round(v, 6) for v in losses],
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
        return options

    def _fits(self, image: str) -> bool:
        from medadapt.monailabel.imagefiles import ImageFileError, file_kind

        try:
            return file_kind(image) == ("3d" if self.spec.dimension == 3 else "2d")
        except ImageFileError:
            return False

    def initial_model(self, options: dict[str, Any]) -> tuple[torch.nn.Module, str]:
        """Continue from the served adapters when they are of the requested method (and no
        new options are asked for); otherwise start from freshly injected ones."""
        from medadapt.checkpoint import read_adapter_config

        state = self.spec.current_adapters()
        if (options["init"] == "served" and state is not None and not options["method_options"]
                and read_adapter_config(state.folder)["method"] == options["method"]):
            return self.spec.build_model(state.folder), state.folder
        return self.spec.build_model(None, method=options["method"],
                                     method_options=options["method_options"] or None), "fresh"

    def fit(self, model: torch.nn.Module, pairs: list[dict], options: dict[str, Any],
            device: torch.device) -> list[float]:
        """The training loop; the mean loss of each epoch."""
        from monai.data import DataLoader, Dataset
        from monai.losses import DiceCELoss

        from medadapt.injection import param_groups
        from medadapt.models import boxes_from_masks

        release = resolve_release(self.spec.release, pairs[0]["label"])
        loader = DataLoader(Dataset(pairs, self.spec.build_train_transforms(release)),
                            batch_size=options["batch_size"], shuffle=True, num_workers=0)
        num_classes = int(self.spec.model.get("num_classes", 1))
        sigmoid = self.spec.task == "box_segmentation" or self.spec.multilabel or num_classes == 1
        loss_fn = DiceCELoss(sigmoid=True) if sigmoid else DiceCELoss(to_onehot_y=True, softmax=True)
        optimizer = torch.optim.AdamW(param_groups(model, options["lr_adapter"], options["lr_head"]))
        generator = torch.Generator().manual_seed(options["seed"])
        model.train()
        losses = []
        for epoch in range(options["max_epochs"]):
            total, batches = 0.0, 0
            for batch in loader:
                # Plain tensors: the loop needs no metadata, and custom ops need not handle MetaTensor.
                image, label = (batch[k].as_subclass(torch.Tensor).to(device) for k in ("image", "label"))
                if self.spec.task == "box_segmentation":
                    boxes = boxes_from_masks(label.cpu(), jitter=int(options["box_jitter"]), generator=generator)
                    logits = model(image, boxes.to(device))
                else:
                    logits = model(image)
                loss = loss_fn(logits, label)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                total, batches = total + loss.item(), batches + 1
            losses.append(total / max(batches, 1))
            logger.info("%s epoch %d/%d: loss %.4f", self.spec.name, epoch + 1, options["max_epochs"], losses[-1])
        return losses


def publish(model: torch.nn.Module, folder: str | Path, stats: dict[str, Any]) -> Path:
    """Write the adapters into a new folder and swap it in, so that a reader sees the old or
    the new adapters, never half of each."""
    from medadapt.checkpoint import save_adapters

    folder = Path(folder)
    tag = f"{os.getpid()}-{time.time_ns()}"
    staging, retired = folder.with_name(f".{folder.name}.new-{tag}"), folder.with_name(f".{folder.name}.old-{tag}")
    save_adapters(model, staging)
    (staging / STATS_NAME).write_text(json.dumps(stats, indent=1))
    if folder.exists():
        os.replace(folder, retired)
    os.replace(staging, folder)
    shutil.rmtree(retired, ignore_errors=True)
    return folder
