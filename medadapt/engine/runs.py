"""Where a bundle's runs and its trained model go.

A bundle folder holds its trained model where the MONAI model zoo expects it
(``models/model.pt``, beside medadapt's adapter folder ``models/adapters``) and every
training run in a folder of its own, ``runs/<run name>/<start time>/``, so that a run never
replaces another's adapters, metrics or logs. The run name says what was trained
(method, backbone, data fraction, fold, seed); ``--resume True`` continues the newest run of
that name; ``--output_dir`` puts a run wherever the user says.
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
    existing one of that name (a new one when there is none). Nothing is created here. Under
    torch.distributed every process gets rank 0's answer (their clocks may straddle a second)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        chosen = [_run_dir(runs_dir, name, resume) if dist.get_rank() == 0 else None]
        dist.broadcast_object_list(chosen, src=0)
        return chosen[0]
    return _run_dir(runs_dir, name, resume)


def _run_dir(runs_dir: str, name: str, resume: bool) -> str:
    base = Path(runs_dir) / name
    if resume:
        previous = latest_run(base)
        if previous is not None:
            return str(previous)
        logger.info("resume: no earlier run %s in %s, starting a new one", name, runs_dir)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    folder, n = base / stamp, 1
    while folder.exists():  # two runs started in the same second
        n += 1
        folder = base / f"{stamp}-{n}"
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
