"""What a bundle tells its user: the log file, where the outputs went, what the numbers mean."""

from __future__ import annotations

import logging
from pathlib import Path

logger = logging.getLogger("medadapt")

OUTPUTS = ("models/best_adapters", "models/adapters", "models/model.pt", "models/training_state.pt", "splits.json",
           "metrics.json", "logs")


RUN_LOGGERS = ("medadapt", "ignite.engine.engine.SupervisedTrainer", "ignite.engine.engine.SupervisedEvaluator")


class RunLogHandler(logging.FileHandler):
    """A run's ``train.log``. Once closed it leaves its loggers: by the next run's
    `setup_logging`, or by the next bundle's ``logging.conf`` (``logging.config.fileConfig``
    closes every handler). A closed ``FileHandler`` left attached would reopen its file on the
    next message, so a process running several bundles (the protocol runner, MONAI Label, a
    notebook) would write later runs into a finished run's log, or fail once that run's folder
    is gone."""

    def __init__(self, path: Path):
        super().__init__(path, encoding="utf-8")
        self.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s: %(message)s"))

    def close(self) -> None:
        for name in RUN_LOGGERS:
            logging.getLogger(name).removeHandler(self)
        super().close()


def setup_logging(output_dir: str) -> None:
    """Log medadapt's and MONAI's messages to the console and to ``output_dir/train.log``."""
    from medadapt.engine.distributed import is_main_process

    if not is_main_process():
        return
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    # One run log at a time: the previous run's closes (and leaves its loggers).
    for name in RUN_LOGGERS:
        for old in [h for h in logging.getLogger(name).handlers if isinstance(h, RunLogHandler)]:
            old.close()
    handler = RunLogHandler(out / "train.log")
    for name in RUN_LOGGERS:
        log = logging.getLogger(name)
        log.setLevel(logging.INFO)
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
