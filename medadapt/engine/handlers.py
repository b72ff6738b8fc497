"""Ignite handlers that bundles attach to MONAI's trainer and evaluator.

Every file written here goes through a temporary file and a rename, so a run killed at any
moment leaves the previous good file, never a truncated one.
"""

from __future__ import annotations

import logging
import random
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from medadapt.checkpoint import save_adapters
from medadapt.io import atomic_path

logger = logging.getLogger("medadapt")

STATE_NAME = "training_state.pt"


def _unwrap(network: nn.Module) -> nn.Module:
    # DistributedDataParallel keeps the real model in .module; files hold the plain names.
    return getattr(network, "module", network)


def _trainable_state(network: nn.Module) -> dict[str, torch.Tensor]:
    model = _unwrap(network)
    return {n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad}


def rng_state() -> dict:
    """Global RNG states as tensors and plain numbers, so weights_only loading accepts them."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
        "python": random.getstate(),
    }


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    random.setstate(state["python"])


def _is_main_process() -> bool:
    return not (torch.distributed.is_available() and torch.distributed.is_initialized()) or \
        torch.distributed.get_rank() == 0


class TrainingStateSaver:
    """After every epoch: the latest adapters and everything needed to resume.

    ``<save_dir>/training_state.pt`` holds the trainable weights, optimizer, scheduler, epoch,
    iteration and RNG states; ``<save_dir>/adapters/`` the adapter-only checkpoint. Only rank 0
    writes under DDP.

    Arguments:
      save_dir: checkpoint folder.
      network, optimizer, lr_scheduler: what to save (scheduler optional).
      extra_state: objects with state_dict()/load_state_dict() to save as well (e.g. the
        random state of the data transforms).
    """

    def __init__(self, save_dir: str, network: nn.Module, optimizer: torch.optim.Optimizer,
                 lr_scheduler=None, extra_state: dict | None = None):
        self.save_dir = Path(save_dir)
        self.network, self.optimizer, self.lr_scheduler = network, optimizer, lr_scheduler
        self.extra_state = extra_state or {}

    def attach(self, engine) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def __call__(self, engine) -> None:
        if not _is_main_process():
            return
        state = {
            "trainable": _trainable_state(self.network),
            "optimizer": self.optimizer.state_dict(),
            "lr_scheduler": self.lr_scheduler.state_dict() if self.lr_scheduler is not None else None,
            "epoch": engine.state.epoch,
            "iteration": engine.state.iteration,
            "rng": rng_state(),
            "extra": {k: v.state_dict() for k, v in self.extra_state.items()},
        }
        with atomic_path(self.save_dir / STATE_NAME) as tmp:
            torch.save(state, tmp)
        save_adapters(_unwrap(self.network), self.save_dir / "adapters")


class ResumeTraining:
    """Continue an interrupted run from ``<save_dir>/training_state.pt`` when ``enabled``.

    Loads the trainable weights, optimizer, scheduler and RNG states and moves the trainer to
    the saved epoch, so the run ends as an uninterrupted one would.
    """

    def __init__(self, save_dir: str, network: nn.Module, optimizer: torch.optim.Optimizer,
                 lr_scheduler=None, enabled: bool = False, extra_state: dict | None = None):
        self.path = Path(save_dir) / STATE_NAME
        self.network, self.optimizer, self.lr_scheduler = network, optimizer, lr_scheduler
        self.enabled = enabled
        self.extra_state = extra_state or {}

    def attach(self, engine) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.STARTED, self)

    def __call__(self, engine) -> None:
        if not self.enabled:
            return
        if not self.path.is_file():
            logger.info("resume: no %s yet, starting from scratch", self.path)
            return
        # weights_only: a training state is tensors, numbers and RNG tuples; nothing to execute.
        state = torch.load(self.path, map_location="cpu", weights_only=True)
        model = _unwrap(self.network)
        params = dict(model.named_parameters())
        missing = sorted(set(state["trainable"]) - set(params))
        if missing:
            raise ValueError(f"{self.path} does not fit this model: unknown parameters {missing[:5]}")
        with torch.no_grad():
            for name, value in state["trainable"].items():
                params[name].copy_(value)
        self.optimizer.load_state_dict(state["optimizer"])
        if self.lr_scheduler is not None and state["lr_scheduler"] is not None:
            self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        for key, obj in self.extra_state.items():
            if key in state.get("extra", {}):
                obj.load_state_dict(state["extra"][key])
        set_rng_state(state["rng"])
        engine.state.epoch = state["epoch"]
        engine.state.iteration = state["iteration"]
        logger.info("resumed from %s at epoch %d", self.path, state["epoch"])


class BestModelSaver:
    """On the evaluator: when the key metric improves, write the best adapters and an exported
    full model (``model.pt``, a plain state dict of the whole network).

    Arguments:
      save_dir: checkpoint folder.
      network: the trained network.
      export_full_model: also write ``model.pt``.
      adapter_dtype: precision of the saved adapter weights ("float16" halves the file; see
        :func:`medadapt.save_adapters`); None keeps the training precision.
    """

    def __init__(self, save_dir: str, network: nn.Module, export_full_model: bool = True,
                 adapter_dtype: str | None = None):
        from medadapt.checkpoint import _storage_dtype

        _storage_dtype(adapter_dtype)   # a bad value fails when the bundle is built, not after an epoch
        self.save_dir = Path(save_dir)
        self.network = network
        self.export_full_model = export_full_model
        self.adapter_dtype = adapter_dtype
        self.best = -float("inf")

    def attach(self, engine) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def __call__(self, engine) -> None:
        metric = engine.state.metrics.get(engine.state.key_metric_name)
        if metric is None or not _is_main_process():
            return
        value = float(metric)
        if value <= self.best:
            return
        self.best = value
        model = _unwrap(self.network)
        save_adapters(model, self.save_dir / "best_adapters", dtype=self.adapter_dtype)
        if self.export_full_model:
            with atomic_path(self.save_dir / "model.pt") as tmp:
                torch.save(model.state_dict(), tmp)
        logger.info("new best %s=%.4f: saved %s", engine.state.key_metric_name, value, self.save_dir)


class ProgressBar:
    """A tqdm progress bar over iterations with the running loss (ignite's ProgressBar)."""

    def __init__(self, desc: str = "train"):
        self.desc = desc

    def attach(self, engine) -> None:
        from ignite.handlers import ProgressBar as IgniteProgressBar

        IgniteProgressBar(desc=self.desc, persist=True).attach(engine, output_transform=_loss_of)


def _loss_of(output) -> dict:
    # Trainers put the loss in their output; evaluators have none to show.
    if isinstance(output, list):
        output = output[0] if output else {}
    if isinstance(output, dict) and "loss" in output:
        return {"loss": float(output["loss"])}
    return {}


class MetricsWriter:
    """On the evaluator: write its metrics (and the epoch) to a JSON file, atomically."""

    def __init__(self, path: str):
        self.path = Path(path)

    def attach(self, engine) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def __call__(self, engine) -> None:
        if not _is_main_process():
            return
        import json

        metrics = {k: _jsonable(v) for k, v in engine.state.metrics.items()}
        record = {"metrics": metrics, "best_metric": _jsonable(getattr(engine.state, "best_metric", None)),
                  "best_metric_epoch": getattr(engine.state, "best_metric_epoch", None)}
        from medadapt.io import atomic_write_text

        atomic_write_text(self.path, json.dumps(record, indent=1))


def _jsonable(value):
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu()
        return value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    return value


def _randomizables(obj, found: list, seen: set) -> list:
    """Every MONAI Randomizable reachable from ``obj``, in a fixed order (as MONAI's set_rnd walks)."""
    if id(obj) in seen:
        return found
    seen.add(id(obj))
    if isinstance(obj, (list, tuple)):
        for item in obj:
            _randomizables(item, found, seen)
        return found
    if not hasattr(obj, "__dict__"):
        return found
    if hasattr(obj, "set_random_state") and hasattr(obj, "R"):
        found.append(obj)
    for key, value in obj.__dict__.items():
        if not key.startswith("__"):
            _randomizables(value, found, seen)
    return found


class DataRandomState:
    """The random state of a dataset's transforms (crops, flips, intensity jitter), so that a
    resumed run draws the same augmentations as an uninterrupted one.

    Arguments:
      dataset: the training dataset (its ``transform`` is walked for Randomizable objects).
    """

    def __init__(self, dataset):
        self.dataset = dataset

    def state_dict(self) -> dict:
        states = []
        for obj in _randomizables(self.dataset, [], set()):
            name, keys, pos, has_gauss, cached = obj.R.get_state()
            states.append([name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)])
        return {"transforms": states}

    def load_state_dict(self, state: dict) -> None:
        objects = _randomizables(self.dataset, [], set())
        if len(objects) != len(state["transforms"]):
            raise ValueError(f"saved random state has {len(state['transforms'])} transforms, the dataset "
                             f"{len(objects)}: the training transforms changed since the checkpoint")
        for obj, (name, keys, pos, has_gauss, cached) in zip(objects, state["transforms"]):
            obj.R.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
