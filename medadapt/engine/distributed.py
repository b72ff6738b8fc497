"""What the bundles' multi_gpu_train.json needs to run under ``torchrun``.

One process per GPU with NCCL; on machines without a GPU the same command runs one process per
``--nproc_per_node`` on the CPU with the gloo backend, which is how the tests exercise it.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def init_process_group() -> None:
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend=backend)


def finish() -> None:
    """End the process group once every rank is done with it: rank 0 still publishes the model
    and reports after training, and a rank that tears gloo down and exits meanwhile was seen to
    abort at exit (SIGABRT) on a loaded machine. The others wait at most the process group's
    timeout (10 minutes by default); rank 0's work after training takes seconds."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def device() -> torch.device:
    if torch.cuda.is_available():
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local_rank)
        return torch.device(f"cuda:{local_rank}")
    return torch.device("cpu")


def device_ids(dev: torch.device):
    return [dev.index] if dev.type == "cuda" else None


def is_main_process() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def rank_handlers(handlers: list) -> list:
    """The handlers this rank runs: rank 0 all of them, the others none that log or write."""
    if is_main_process():
        return handlers
    from monai.handlers import StatsHandler, TensorBoardStatsHandler

    from medadapt.engine.handlers import MetricsWriter, ProgressBar

    quiet = (StatsHandler, TensorBoardStatsHandler, ProgressBar, MetricsWriter)
    return [h for h in handlers if not isinstance(h, quiet)]
