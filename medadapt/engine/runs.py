"""Where a bundle's runs and its trained model go.

A bundle folder holds its trained model where the MONAI model zoo expects it
(``models/model.pt``, beside medadapt's adapter folder ``models/adapters``) and every
training run in a folder of its own, ``runs/<run name>/<start time>/``, so that a run never
replaces another's adapters, metrics or logs. The run name says what was trained
(method, backbone, data fraction, fold, seed); ``--resume True`` continues the newest run of
that name; ``--output_dir`` puts a run wherever the user says. `RunRecord` records in the run
what it was (its settings and data) for TensorBoard, MLflow and ``metrics.json``.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

logger = logging.getLogger("medadapt")

MODEL_NAME = "model.pt"
ADAPTERS_NAME = "adapters"
RUN_RECORD = "run.json"  # in models/: which run the published model came from


def check_bundle_root(bundle_root: str, bundle_name: str) -> str:
    """``bundle_root`` if it holds the bundle ``bundle_name`` (its ``metadata.json`` at the top
    or in ``configs/``), else an error saying how to point at it; checked before any work."""
    root = Path(bundle_root)
    for meta in (root / "metadata.json", root / "configs" / "metadata.json"):
        if meta.is_file():
            name = json.loads(meta.read_text(encoding="utf-8")).get("name")
            if name not in (None, bundle_name):
                raise ValueError(f"bundle_root {root} holds the bundle {name!r}, not {bundle_name!r}: pass "
                                 f"--bundle_root with the folder of {bundle_name}")
            return str(root)
    raise FileNotFoundError(f"bundle_root {root.resolve()} is not the folder of bundle {bundle_name!r} (no "
                            f"metadata.json there or in configs/): run from the bundle's folder or the repository "
                            f"root, or pass --bundle_root PATH/TO/{bundle_name}")


def run_name(settings: dict[str, Any]) -> str:
    """A folder name that says what a run trains: ``dka_litemedsam_f0.0063_fold2_seed0``."""
    backbone = str(settings.get("backbone", "")).replace("timm:", "")
    parts = [settings.get("method"), backbone, f"f{float(settings.get('fraction', 1.0)):g}",
             f"fold{settings.get('fold', 0)}", f"seed{settings.get('seed', 0)}"]
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", "_".join(str(p) for p in parts if p not in (None, "")))


def run_dir(runs_dir: str, name: str, resume: bool = False) -> str:
    """The folder of a run: a new ``runs_dir/name/<start time>``, or with ``resume`` the newest
    existing one of that name (a new one when there is none). A new folder is made at once (so
    that two runs never share one), and handed out again, while it is still empty, to whatever
    else in this process resolves the same run (MONAI's tracking resolves the config before the
    run does). Under torch.distributed every process gets rank 0's folder."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        chosen = [_run_dir(runs_dir, name, resume) if dist.get_rank() == 0 else None]
        dist.broadcast_object_list(chosen, src=0)
        return chosen[0]
    return _run_dir(runs_dir, name, resume)


# base folder -> the run folder this process made there last (reused while it is empty)
_MADE: dict[str, Path] = {}


def _run_dir(runs_dir: str, name: str, resume: bool) -> str:
    base = Path(runs_dir) / name
    if resume:
        previous = latest_run(base)
        if previous is not None:
            return str(previous)
        logger.info("resume: no earlier run %s in %s, starting a new one", name, runs_dir)
    made = _MADE.get(str(base.resolve()))
    if made is not None and made.is_dir() and not any(made.iterdir()):
        return str(made)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    folder, n = base / stamp, 1
    while folder.exists():  # two runs started in the same second
        n += 1
        folder = base / f"{stamp}-{n}"
    folder.mkdir(parents=True)
    _MADE[str(base.resolve())] = folder
    return str(folder)


def latest_run(base: str | os.PathLike) -> Path | None:
    """The newest run folder under ``base`` (names sort by start time), or None."""
    base = Path(base)
    runs = sorted(p for p in base.iterdir() if p.is_dir()) if base.is_dir() else []
    return runs[-1] if runs else None


def publish_model(ckpt_dir: str, models_dir: str, output_dir: str) -> None:
    """Copy the run's best model (``model.pt`` and the adapter folder) into the bundle's
    ``models/``, where inference and the model zoo's tools read it; each file replaced in one
    rename, so a reader sees the old model or the new one. Records which run it came from."""
    from medadapt.engine.distributed import is_main_process
    from medadapt.io import atomic_path, atomic_write_text

    source, target = Path(ckpt_dir), Path(models_dir)
    best = source / "best_adapters"
    if not is_main_process() or not best.is_dir():
        return
    target.mkdir(parents=True, exist_ok=True)
    if (source / MODEL_NAME).is_file():
        with atomic_path(target / MODEL_NAME) as tmp:
            shutil.copyfile(source / MODEL_NAME, tmp)
    staging = target / f".{ADAPTERS_NAME}.new-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(best, staging)
    retired = target / f".{ADAPTERS_NAME}.old-{os.getpid()}"
    if (target / ADAPTERS_NAME).exists():
        os.replace(target / ADAPTERS_NAME, retired)
    os.replace(staging, target / ADAPTERS_NAME)
    shutil.rmtree(retired, ignore_errors=True)
    atomic_write_text(target / RUN_RECORD, json.dumps({"run": str(Path(output_dir).resolve())}, indent=1))
    logger.info("published the run's best model to %s (model.pt, adapters/)", target.resolve())


def data_fingerprint(entries: list[dict]) -> str:
    """SHA-1 of what a run read: every file of ``entries`` by name and size (cheap, and it
    changes when a case is added, removed, renamed or rewritten to another size)."""
    import hashlib

    digest = hashlib.sha1()
    for entry in sorted(entries, key=lambda e: json.dumps(e.get("image"), default=str)):
        for key in ("image", "label"):
            value = entry.get(key)
            for path in value if isinstance(value, (list, tuple)) else [value]:
                if isinstance(path, (str, os.PathLike)) and os.path.isfile(path):
                    digest.update(f"{Path(path).name}:{os.path.getsize(path)};".encode())
                elif path is not None:
                    digest.update(f"{path};".encode())
    return digest.hexdigest()


def flat_settings(settings: dict, prefix: str = "") -> dict[str, str]:
    """``settings`` as flat ``{"method_options.bottleneck": "8"}`` strings (MLflow and
    TensorBoard hyperparameters are flat)."""
    flat: dict[str, str] = {}
    for key, value in settings.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flat_settings(value, f"{name}."))
        else:
            flat[name] = json.dumps(value, default=str) if not isinstance(value, str) else value
    return flat


class RunRecord:
    """What a training run was, recorded where it is looked at: the full settings and the data's
    fingerprint in ``metrics.json`` (``"run"``), as TensorBoard hyperparameters with the best
    validation score, and, when MONAI's ``--tracking mlflow`` opened an MLflow run for it, as
    that run's params, each parameter group's learning rate by its name (``lr/adapter``...) every
    epoch, and the adapter folder and ``metrics.json`` as its artifacts. (MONAI's MLFlowHandler
    logs max_epochs, epoch_length and the learning rates by group number only.)

    Arguments:
      settings: the bundle's ``run_settings``.
      data: the bundle's ``data`` (its counts and fingerprint are recorded).
      metrics_path: the run's ``metrics.json``.
      log_dir: the TensorBoard folder.
      validator: the evaluator whose best score goes with the hyperparameters.
      ckpt_dir: the run's checkpoint folder (its ``best_adapters`` become an artifact).
      optimizer: the trainer's optimizer (its groups' learning rates are logged by name).
      tracking_uri, experiment_name, run_name: where MONAI's MLflow tracking logs the run.
    """

    def __init__(self, settings: dict, data: dict, metrics_path: str, log_dir: str, validator=None,
                 ckpt_dir: str | None = None, optimizer=None, tracking_uri: str | None = None,
                 experiment_name: str | None = None, run_name: str | None = None):
        self.record = {"settings": settings, "data": {"fingerprint": data_fingerprint(data["train"] + data["val"]
                                                                                      + data["test"]),
                                                      **{k: v for k, v in data.get("counts", {}).items()}}}
        self.metrics_path, self.log_dir, self.validator, self.ckpt_dir = Path(metrics_path), log_dir, validator, ckpt_dir
        self.tracking = (tracking_uri, experiment_name, run_name)
        self.optimizer = optimizer

    def attach(self, engine) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.STARTED, self.write_metrics_record)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.learning_rates)
        engine.add_event_handler(Events.COMPLETED, self.completed)

    def learning_rates(self, engine) -> None:
        from medadapt.engine.distributed import is_main_process

        found = self._mlflow_run() if self.optimizer is not None and is_main_process() else None
        if found is None:
            return
        client, run = found
        for index, group in enumerate(self.optimizer.param_groups):
            client.log_metric(run.info.run_id, f"lr/{group.get('name', index)}", float(group["lr"]),
                              step=engine.state.epoch)

    def write_metrics_record(self, engine=None) -> None:
        from medadapt.engine.distributed import is_main_process
        from medadapt.io import atomic_write_text, read_json_or

        if not is_main_process():
            return
        metrics = read_json_or(self.metrics_path, {})
        metrics["run"] = self.record
        self.metrics_path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.metrics_path, json.dumps(metrics, indent=1, default=str))

    def completed(self, engine) -> None:
        from medadapt.engine.distributed import is_main_process

        if not is_main_process():
            return
        self.write_metrics_record()
        state = getattr(self.validator, "state", None)
        best = {"best_" + (state.key_metric_name or "metric"): float(state.best_metric)} if (
            state is not None and getattr(state, "best_metric_epoch", -1) not in (-1, None)) else {}
        self._tensorboard(best)
        self._mlflow()

    def _tensorboard(self, best: dict) -> None:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(log_dir=self.log_dir)
        flat = flat_settings({**self.record["settings"], "data": self.record["data"]})
        writer.add_text("run/settings", "```json\n" + json.dumps(self.record, indent=1, default=str) + "\n```")
        writer.add_hparams(flat, best or {"best_metric": float("nan")}, run_name=".")
        writer.close()

    def _mlflow_run(self):
        """(client, run) of the MLflow run MONAI's tracking opened for this run, or None."""
        uri, experiment, name = self.tracking
        if not uri or not name:
            return None
        database = str(uri).removeprefix("sqlite:///")
        if str(uri).startswith("sqlite:") and not Path(database).is_file():
            return None  # no --tracking mlflow: nothing opened a run
        import mlflow

        client = mlflow.MlflowClient(tracking_uri=uri)
        found = client.get_experiment_by_name(experiment) if experiment else None
        runs = client.search_runs([found.experiment_id]) if found else []
        run = next((r for r in runs if r.info.run_name == name and r.info.status == "RUNNING"), None)
        return (client, run) if run is not None else None

    def _mlflow(self) -> None:
        found = self._mlflow_run()
        if found is None:
            return
        client, run = found
        params = flat_settings({**self.record["settings"], "data": self.record["data"]})
        for key, value in params.items():
            client.log_param(run.info.run_id, key[:250], value[:6000])
        best = Path(self.ckpt_dir or "") / "best_adapters"
        if best.is_dir():
            client.log_artifacts(run.info.run_id, str(best), "adapters")
        if self.metrics_path.is_file():
            client.log_artifact(run.info.run_id, str(self.metrics_path))


# create_model arguments that decide what a trained model computes on an input
RECORDED_SETTINGS = ("task", "backbone", "backbone_options", "method", "method_options", "num_classes", "in_channels",
                     "input_mapping", "input_size", "export_input_size", "num_slices", "slice_axis", "multilabel")


def check_model_settings(model_file: str, network, strict: bool = True) -> None:
    """Before inference: the model in ``model_file`` was trained with the settings ``network``
    is built with (image size, window, slice size, channels, method...), as recorded in the
    adapter folder beside it; a difference names both values and stops the run (``strict``)
    or is logged as a warning. A model file without a record beside it is run as it is, saying so."""
    from medadapt.checkpoint import build_record, read_adapter_config

    folder = next((Path(model_file).parent / name for name in (ADAPTERS_NAME, "best_adapters")
                   if (Path(model_file).parent / name).is_dir()), None)
    now = (build_record(getattr(network, "module", network)) or {}).get("arguments")
    if folder is None or now is None:
        logger.warning("no record of the settings %s was trained with beside it: running it with this config's "
                       "settings", model_file)
        return
    trained = (read_adapter_config(folder).get("model") or {}).get("arguments") or {}
    differ = [f"{key}: trained with {trained.get(key)!r}, this run {now.get(key)!r}" for key in RECORDED_SETTINGS
              if key in trained and trained.get(key) != now.get(key)]
    if not differ:
        return
    message = (f"{model_file} was trained with other settings than this inference uses ("
               + "; ".join(differ) + "). Pass the settings it was trained with (a demo-trained model: --demo True), "
               "or --check_model_settings False to run it anyway")
    if strict:
        raise ValueError(message)
    logger.warning(message)
