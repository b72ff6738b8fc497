"""What a bundle tells its user: the log file, where the outputs went, what the numbers mean."""

from __future__ import annotations

import logging
from pathlib import Path

logger = logging.getLogger("medadapt")

OUTPUTS = ("models/best_adapters", "models/adapters", "models/model.pt", "models/training_state.pt", "splits.json",
           "metrics.json", "logs")


def setup_logging(output_dir: str) -> None:
    """Log medadapt's and MONAI's messages to the console and to ``output_dir/train.log``."""
    from medadapt.engine.distributed import is_main_process

    if not is_main_process():
        return
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(out / "train.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s: %(message)s"))
    handler.medadapt_run_log = True
    for name in ("medadapt", "ignite.engine.engine.SupervisedTrainer", "ignite.engine.engine.SupervisedEvaluator"):
        log = logging.getLogger(name)
        log.setLevel(logging.INFO)
        # One run log at a time: a process running several bundles (the protocol runner)
        # would otherwise write every later run into every earlier run's file.
        for old in [h for h in log.handlers if getattr(h, "medadapt_run_log", False)]:
            log.removeHandler(old)
            old.close()
        log.addHandler(handler)


def report_outputs(output_dir: str, metrics: dict | None = None, note: str | None = None) -> None:
    """Tell the user where the run's outputs went and, with ``note``, what its numbers mean
    (called from a bundle's ``finalize``)."""
    from medadapt.engine.distributed import is_main_process

    if not is_main_process():
        return
    out = Path(output_dir).resolve()
    lines = [f"outputs in {out}:"]
    lines += [f"  {out / name}" for name in OUTPUTS if (out / name).exists()]
    if metrics:
        lines.append("final metrics: " + ", ".join(f"{k}={float(v):.4f}" for k, v in metrics.items()))
    if note:
        lines.append(note)
    logger.info("\n".join(lines))


def demo_note(demo: bool, what: str) -> str | None:
    """The sentence that says what a number on the embedded demo means, or None on real data."""
    if not demo:
        return None
    return (f"These scores are on the embedded demo ({what}): they show that the pipeline learns, "
            "not how the model would do on real patients.")


def report_predictions(output_dir: str) -> None:
    out = Path(output_dir).resolve()
    files = sorted(p for p in out.glob("*") if p.is_file() and not p.name.startswith("."))
    logger.info("wrote %d prediction file(s) to %s", len(files), out)
