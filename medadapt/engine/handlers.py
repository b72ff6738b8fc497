"""Ignite handlers that bundles attach to MONAI's trainer and evaluator.

Every file written here goes through a temporary file and a rename, so a run killed at any
moment leaves the previous good file, never a truncated one.
"""

from __future__ import annotations

import json
import logging
import math
import random
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from medadapt.checkpoint import save_adapters
from medadapt.io import atomic_path, remove_stale_temporaries_under

logger = logging.getLogger("medadapt")

STATE_NAME = "training_state.pt"


def _unwrap(network: nn.Module) -> nn.Module:
    # DistributedDataParallel keeps the real model in .module; files hold the plain names.
    return getattr(network, "module", network)


def _trainable_state(network: nn.Module) -> dict[str, torch.Tensor]:
    model = _unwrap(network)
    return {n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad}


def _has_adapters(network: nn.Module) -> bool:
    from medadapt.injection import injection_record

    return injection_record(_unwrap(network)) is not None


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
    from medadapt.engine.distributed import is_main_process

    return is_main_process()


def _run_differences(saved: dict, current: dict) -> list[str]:
    return sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))


def check_resume(save_dir: str, run: dict, enabled: bool) -> None:
    """Before any file is written: refuse ``--resume True`` when the run it would continue was
    made with other settings (another fraction, fold, method or its options...), naming them.

    Arguments:
      save_dir: checkpoint folder holding ``training_state.pt``.
      run: the settings that define the run (the bundle's ``run_settings``).
      enabled: the bundle's ``resume``.
    """
    path = Path(save_dir) / STATE_NAME
    if not enabled or not path.is_file():
        return
    state = torch.load(path, map_location="cpu", weights_only=True)
    saved = json.loads(state.get("run") or "{}")
    current = json.loads(json.dumps(run, default=str))
    changed = _run_differences(saved, current)
    if changed:
        details = ", ".join(f"{k}: {saved.get(k)!r} then, {current.get(k)!r} now" for k in changed)
        raise ValueError(f"--resume True: {path} belongs to a run with other settings ({details}); resume with "
                         "the same settings, or start a new run in another --output_dir")


class TrainingStateSaver:
    """After every epoch: the latest adapters and everything needed to resume.

    ``<save_dir>/training_state.pt`` holds the trainable weights, optimizer, scheduler, epoch,
    iteration and RNG states; ``<save_dir>/adapters/`` the adapter-only checkpoint. Only rank 0
    writes under DDP.

    Arguments:
      save_dir: checkpoint folder.
      network, optimizer, lr_scheduler: what to save (scheduler optional).
      extra_state: objects with state_dict()/load_state_dict() to save as well (e.g. the
        random state of the data transforms, the best metric so far, the training stage).
      run: the settings that define the run, checked by `check_resume` before resuming.
    """

    def __init__(self, save_dir: str, network: nn.Module, optimizer: torch.optim.Optimizer,
                 lr_scheduler=None, extra_state: dict | None = None, run: dict | None = None):
        self.save_dir = Path(save_dir)
        self.network, self.optimizer, self.lr_scheduler = network, optimizer, lr_scheduler
        self.extra_state = extra_state or {}
        self.run = json.dumps(run or {}, sort_keys=True, default=str)

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
            "run": self.run,
        }
        with atomic_path(self.save_dir / STATE_NAME) as tmp:
            torch.save(state, tmp)
        if _has_adapters(self.network):
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
        if _is_main_process():
            # A run killed mid-save left a hidden temporary beside the file it was writing;
            # the file itself is the last complete one. Clear them all, not only those of
            # files this run will save again.
            for removed in remove_stale_temporaries_under(self.path.parent):
                logger.info("resume: removed %s, left by a run stopped while saving", removed)
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
        mismatched = sorted(n for n, v in state["trainable"].items() if tuple(v.shape) != tuple(params[n].shape))
        if mismatched:
            raise ValueError(f"{self.path} does not fit this model: parameters {mismatched[:5]} have other shapes "
                             "(were the method's options changed?)")
        # Extras first: a later training stage (CLAdapter) adds parameter groups to the optimizer.
        for key, obj in self.extra_state.items():
            if key in state.get("extra", {}):
                obj.load_state_dict(state["extra"][key])
        with torch.no_grad():
            for name, value in state["trainable"].items():
                params[name].copy_(value)
        self.optimizer.load_state_dict(state["optimizer"])
        if self.lr_scheduler is not None and state["lr_scheduler"] is not None:
            self.lr_scheduler.load_state_dict(state["lr_scheduler"])
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
        self.best_epoch = -1
        self.engine = None

    def attach(self, engine) -> None:
        from ignite.engine import Events

        self.engine = engine
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def state_dict(self) -> dict:
        return {"best": self.best, "best_epoch": self.best_epoch}

    def load_state_dict(self, state: dict) -> None:
        """Continue a resumed run with its best score, so a worse epoch cannot replace the best files."""
        self.best, self.best_epoch = float(state["best"]), int(state["best_epoch"])
        if self.engine is not None and self.best_epoch >= 0:
            self.engine.state.best_metric, self.engine.state.best_metric_epoch = self.best, self.best_epoch

    def __call__(self, engine) -> None:
        metric = engine.state.metrics.get(engine.state.key_metric_name)
        if metric is None or not _is_main_process():
            return
        value = float(metric)
        if value <= self.best:
            return
        self.best = value
        self.best_epoch = int(engine.state.epoch)
        model = _unwrap(self.network)
        if _has_adapters(model):  # a network trained from scratch has no adapter folder, only model.pt
            save_adapters(model, self.save_dir / "best_adapters", dtype=self.adapter_dtype)
        if self.export_full_model:
            with atomic_path(self.save_dir / "model.pt") as tmp:
                torch.save(model.state_dict(), tmp)
        logger.info("new best %s=%.4f: saved %s", engine.state.key_metric_name, value, self.save_dir)


def load_best_model(network: nn.Module, ckpt_dir: str) -> nn.Module:
    """Give a network trained from scratch (no adapters) its best weights, ``ckpt_dir/model.pt``
    as `BestModelSaver` wrote them; a network with adapters gets its best adapters through
    ``network_def#adapter_checkpoint`` and is returned as it is. Evaluation and inference of a
    scratch network would otherwise score its random initial weights."""
    model = _unwrap(network)
    if _has_adapters(model):
        return network
    path = Path(ckpt_dir) / "model.pt"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the network has no adapters, so its trained weights are this file, which "
                                "training writes with export_full_model; it is missing")
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return network


class ProgressBar:
    """A tqdm progress bar that says what it counts, with the running loss on trainers.

    Arguments:
      desc: what runs ("dka_brats train", "validation").
      unit: what the steps are ("batches", "cases").
      enabled: False shows no bar (runs driven by another program, e.g. the protocol runner).
    """

    def __init__(self, desc: str = "train", unit: str = "batches", enabled: bool = True):
        self.desc, self.unit, self.enabled = desc, unit, enabled

    def attach(self, engine) -> None:
        from ignite.handlers import ProgressBar as IgniteProgressBar

        if not self.enabled:
            return
        # One bar at a time and no bar over the sliding windows: nested bars are what leave
        # cursor-movement codes in log files.
        bar = IgniteProgressBar(desc=self.desc, persist=True, unit=self.unit,
                                bar_format="{desc} [{n_fmt}/{total_fmt} " + self.unit + "] {percentage:3.0f}%|{bar}|"
                                           "{postfix} [{elapsed}<{remaining}]")
        bar.attach(engine, output_transform=_loss_of)


def _loss_of(output) -> dict:
    # Trainers put the loss in their output; evaluators have none to show.
    if isinstance(output, list):
        output = output[0] if output else {}
    if isinstance(output, dict) and "loss" in output:
        return {"loss": float(output["loss"])}
    return {}


class TensorBoardLearningRates:
    """Each parameter group's learning rate in TensorBoard, every ``interval`` iterations
    (tags ``lr/adapter``, ``lr/head``, ``lr/backbone``).

    Arguments:
      optimizer: the trainer's optimizer.
      log_dir: TensorBoard folder.
      interval: iterations between points.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, log_dir: str, interval: int = 1):
        self.optimizer, self.log_dir, self.interval = optimizer, log_dir, max(1, int(interval))
        self.writer = None

    def attach(self, engine) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.ITERATION_COMPLETED(every=self.interval), self)
        engine.add_event_handler(Events.COMPLETED, lambda _: self.writer is not None and self.writer.flush())

    def __call__(self, engine) -> None:
        if not _is_main_process():
            return
        if self.writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=self.log_dir)
        for index, group in enumerate(self.optimizer.param_groups):
            self.writer.add_scalar(f"lr/{group.get('name', index)}", group["lr"], engine.state.iteration)


class TensorBoardOverlay:
    """After each validation: input, reference and prediction of the last validation case
    side by side on its middle slice (volumes) or the image itself (2D), in TensorBoard
    (tag ``validation/overlay``). Channels of the reference and prediction are coloured
    (red, green, blue for TC, WT, ET); the input shows its first channel in grey.

    Arguments:
      log_dir: TensorBoard folder.
    """

    COLOURS = torch.tensor([[1.0, 0.2, 0.2], [0.2, 1.0, 0.2], [0.3, 0.5, 1.0], [1.0, 1.0, 0.2]])

    def __init__(self, log_dir: str):
        self.log_dir = log_dir
        self.writer = None

    def attach(self, engine) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def __call__(self, engine) -> None:
        if not _is_main_process() or not engine.state.output:
            return
        item = engine.state.output[-1] if isinstance(engine.state.output, list) else engine.state.output
        if not all(k in item for k in ("image", "label", "pred")) or torch.as_tensor(item["label"]).ndim < 3:
            return  # classification: no map to show
        panel = overlay_panel(item["image"], item["label"], item["pred"], self.COLOURS)
        if self.writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=self.log_dir)
        self.writer.add_image("validation/overlay", panel, engine.state.epoch, dataformats="CHW")
        self.writer.flush()


def overlay_panel(image, label, pred, colours: torch.Tensor) -> torch.Tensor:
    """(3, H, 3W) RGB in [0, 1]: the input, the reference and the prediction over it."""

    def middle(x: torch.Tensor) -> torch.Tensor:
        x = torch.as_tensor(x).detach().float().cpu()
        return x[..., x.shape[-1] // 2] if x.ndim == 4 else x  # (C, H, W)

    image, label, pred = middle(image), middle(label), middle(pred)
    grey = image[0]
    grey = (grey - grey.min()) / (grey.max() - grey.min()).clamp_min(1e-6)
    base = grey.expand(3, *grey.shape)

    def tint(masks: torch.Tensor) -> torch.Tensor:
        if masks.shape[0] == 1 and masks.max() > 1:  # a class-index map
            masks = torch.stack([masks[0] == k for k in range(1, int(masks.max()) + 1)]).float()
        out = base.clone()
        for k, mask in enumerate(masks > 0.5):
            colour = colours[k % len(colours)].view(3, 1, 1)
            out = torch.where(mask, 0.45 * out + 0.55 * colour, out)
        return out

    return torch.cat([base, tint(label), tint(pred)], dim=-1).clamp(0, 1)


class MetricsWriter:
    """On the evaluator: write its metrics to a JSON file, atomically, keeping what other
    runs wrote there (training writes ``val_*``, evaluation adds ``test_*``).

    The file holds the last validation's metrics, the best key metric so far
    (``best_<name>``) and its epoch, the epoch, and ``history``: every validation's metrics
    by epoch (the learning curve).

    Arguments:
      path: the JSON file.
      prefix: replaces the ``val_`` of every metric name (``"test_"`` for the test set).
      fresh: start the file anew at this run's first write (a new training run), rather
        than add to what is there (a resumed run, an evaluation).
    """

    def __init__(self, path: str, prefix: str | None = None, fresh: bool = False):
        self.path = Path(path)
        self.prefix = prefix
        self.fresh = fresh
        self._written = False

    def attach(self, engine) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def _name(self, key: str) -> str:
        return self.prefix + key[len("val_"):] if self.prefix and key.startswith("val_") else key

    def __call__(self, engine) -> None:
        if not _is_main_process():
            return
        from medadapt.io import atomic_write_text, read_json_or

        record = read_json_or(self.path, {})
        if self.fresh and not self._written:  # a new run: only its own record stays (RunRecord's)
            record = {"run": record["run"]} if "run" in record else {}
        metrics = {self._name(k): _jsonable(v) for k, v in engine.state.metrics.items()}
        record.update(metrics)
        key = self._name(engine.state.key_metric_name or "")
        if self.prefix is None and key:
            record[f"best_{key}"] = _jsonable(getattr(engine.state, "best_metric", None))
            record["best_epoch"] = getattr(engine.state, "best_metric_epoch", None)
            record["epoch"] = engine.state.epoch
            history = [h for h in record.get("history", []) if h.get("epoch") != engine.state.epoch]
            record["history"] = [*history, {"epoch": engine.state.epoch, **metrics}]
        atomic_write_text(self.path, json.dumps(record, indent=1))
        self._written = True


class StagedFineTuning:
    """Staged fine-tuning (CLAdapter): from epoch ``stage2_epoch`` on, the method's second
    stage, in which the whole encoder trains too. Stage 2 starts from the best stage-1
    checkpoint (``best_model``'s adapters and head), with every learning rate scaled by
    ``lr_scale`` (the paper: lr / 10) and a schedule of its own: the scheduler's warm-up and
    cosine restart over the remaining iterations. Does nothing for methods with one stage.

    Logs the trainable parameter counts of each stage. Its state (the stage) is saved with a
    training state and restored before the optimizer on resume, since stage 2 adds the
    encoder's parameters to the optimizer as a group of their own.

    Arguments:
      network: the trained network.
      optimizer, lr_scheduler: the trainer's optimizer and (optional) scheduler.
      stage2_epoch: first epoch of stage 2 (1-based); None never enters it.
      lr_scale: factor on every learning rate from stage 2 on.
      best_model: the evaluator's `BestModelSaver`, whose best adapters stage 2 starts from;
        None continues from the last stage-1 weights.
    """

    def __init__(self, network: nn.Module, optimizer: torch.optim.Optimizer, lr_scheduler=None,
                 stage2_epoch: int | None = None, lr_scale: float = 0.1, best_model=None):
        self.network, self.optimizer, self.lr_scheduler = network, optimizer, lr_scheduler
        self.best_model = best_model
        self.stage2_epoch = None if stage2_epoch is None else int(stage2_epoch)
        self.lr_scale = float(lr_scale)
        self.stage = 1

    @property
    def num_stages(self) -> int:
        from medadapt.injection import injection_record, method_config

        model = _unwrap(self.network)
        return method_config(model).num_stages if injection_record(model) is not None else 1

    def attach(self, engine) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.STARTED, lambda e: self._log_counts())
        engine.add_event_handler(Events.EPOCH_STARTED, self)

    def __call__(self, engine) -> None:
        if (self.stage == 1 and self.stage2_epoch is not None and engine.state.epoch >= self.stage2_epoch
                and self.num_stages >= 2):
            start = self._restore_best_stage_one()
            # What is left of the training's schedule (its length, not the engine's, so that a run
            # stopped early and resumed restarts the same schedule as an uninterrupted one).
            total = getattr(self.lr_scheduler, "t_total", engine.state.max_epochs * (engine.state.epoch_length or 1))
            remaining = max(1, int(total) - engine.state.iteration)
            self.enter_stage_two(remaining_iterations=remaining)
            logger.info("epoch %d: stage 2 of staged fine-tuning from %s, learning rates x %g, a new warm-up and "
                        "cosine over %d iterations", engine.state.epoch, start, self.lr_scale, remaining)
            self._log_counts()

    def _restore_best_stage_one(self) -> str:
        """Load the best stage-1 adapters and head; say what stage 2 starts from."""
        from medadapt.checkpoint import load_adapters

        best = self.best_model
        if best is None or best.best_epoch < 0:
            logger.warning("stage 2: no stage-1 validation has run yet (val_interval), so it starts from the last "
                           "stage-1 weights instead of the best")
            return "the last stage-1 weights"
        load_adapters(_unwrap(self.network), best.save_dir / "best_adapters")
        return f"the best stage-1 checkpoint (epoch {best.best_epoch})"

    def enter_stage_two(self, remaining_iterations: int | None = None) -> None:
        """Train the encoder too, every learning rate x ``lr_scale``; with ``remaining_iterations``
        the schedule restarts over them (None: a resumed run, whose saved schedule follows)."""
        from medadapt.injection import set_stage

        if self.network is not _unwrap(self.network):
            raise ValueError("staged fine-tuning under DistributedDataParallel is not supported (DDP fixes the "
                             "trainable parameters when it is built); run stage 2 on one process")
        model = _unwrap(self.network)
        before = {id(p) for p in model.parameters() if p.requires_grad}
        set_stage(model, 2)
        for group in self.optimizer.param_groups:
            group["lr"] *= self.lr_scale
            group["initial_lr"] = group.get("initial_lr", group["lr"] / self.lr_scale) * self.lr_scale
        new = [p for p in model.parameters() if p.requires_grad and id(p) not in before]
        if new:
            # The encoder's weights join at the head's rate (the smallest rate of stage 1).
            head = min(self.optimizer.param_groups, key=lambda g: g["lr"])
            self.optimizer.add_param_group({"params": new, "lr": head["lr"], "initial_lr": head["initial_lr"],
                                            "weight_decay": head.get("weight_decay", 0.0), "name": "encoder"})
        if self.lr_scheduler is not None:
            self.lr_scheduler.base_lrs = [g["initial_lr"] for g in self.optimizer.param_groups]
            lambdas = getattr(self.lr_scheduler, "lr_lambdas", None)
            if lambdas is not None:  # a LambdaLR has one factor per group: the new group follows the first's
                lambdas.extend(lambdas[:1] * (len(self.optimizer.param_groups) - len(lambdas)))
            if remaining_iterations:
                restart_schedule(self.lr_scheduler, remaining_iterations)
        self.stage = 2

    def _log_counts(self) -> None:
        from medadapt.models.scale import scale_report

        logger.info("stage %d of %d: %s", self.stage, self.num_stages, scale_report(_unwrap(self.network)))

    def state_dict(self) -> dict:
        return {"stage": self.stage}

    def load_state_dict(self, state: dict) -> None:
        if int(state.get("stage", 1)) == 2 and self.stage == 1:
            self.enter_stage_two()


def restart_schedule(scheduler, iterations: int) -> None:
    """Start a warm-up-and-cosine schedule (MONAI's ``WarmupCosineSchedule``: ``warmup_steps``,
    ``t_total``) again from its first step over ``iterations``, the same share warming up;
    other schedules go on from where they are, at their new base rates."""
    if not all(hasattr(scheduler, a) for a in ("warmup_steps", "t_total", "lr_lambdas")):
        return
    share = scheduler.warmup_steps / max(1, scheduler.t_total)
    scheduler.t_total = int(iterations)
    scheduler.warmup_steps = int(share * iterations)
    scheduler.last_epoch = 0
    for group, base, factor in zip(scheduler.optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["lr"] = base * factor(0)


def _jsonable(value):
    """A metric as JSON data; a metric undefined on this set (NaN: the false-positive rate on
    normal images of a set without any) becomes null, which every JSON reader accepts."""
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu()
        value = value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, (np.floating, np.integer)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
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
