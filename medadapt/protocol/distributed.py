"""The protocol's cells as Ray tasks: one cell per task, on a GPU each when the cluster has them.

A cell is plain data and `medadapt.protocol.runner.run_cell` writes its own files (adapters,
record), so a task needs nothing from the driver but the cell and a filesystem that both see:
on several machines, put ``--out`` and the dataset on a shared filesystem. A task whose worker
dies is retried by Ray; a driver that dies loses nothing finished, since the next run skips
every cell whose record exists.
"""

from __future__ import annotations

import os
from collections.abc import Callable

# Ray retries a task whose worker process died (killed, out of memory) this many times.
MAX_RETRIES = 2


def run_cells_on_ray(cells: list[dict], address: str, finished: Callable[[dict], None],
                     echo: Callable[[str], None]) -> None:
    """Run ``cells`` on the Ray cluster at ``address`` ("local": start a local runtime) and call
    ``finished(record)`` as each one completes (in completion order)."""
    try:
        import ray
    except ImportError as error:
        raise ImportError("--ray needs Ray: pip install 'medadapt[ray]'") from error
    from medadapt.protocol.runner import run_cell

    started = not ray.is_initialized()
    if started:
        if address == "local":
            ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
        else:
            ray.init(address=address, log_to_driver=False)
    try:
        resources = ray.cluster_resources()
        gpus = int(resources.get("GPU", 0))
        # One GPU per cell where there are GPUs; otherwise one CPU each (and one thread).
        options = {"num_gpus": 1, "num_cpus": 1} if gpus else {"num_gpus": 0, "num_cpus": 1}
        task = ray.remote(max_retries=MAX_RETRIES, **options)(run_cell)
        echo(f"ray: {len(cells)} cell(s) on {int(resources.get('CPU', 0))} CPU(s) and {gpus} GPU(s)")
        work = [{**{k: v for k, v in cell.items() if k != "key"}, "threads": options["num_cpus"]} for cell in cells]
        pending = {task.remote(item): item for item in work}
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            for future in done:
                pending.pop(future)
                finished(ray.get(future))
    finally:
        if started:
            ray.shutdown()
