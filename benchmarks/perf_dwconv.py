"""Speed of ``medadapt.ops.dwconv`` against torch's own depthwise convolution.

Every row times forward + backward (gradients to the input and the kernel) of both
implementations in this process, on the same inputs, batch 2, fp32, and reports the
ratio of their medians. The two are timed alternately, repeat by repeat, and each timed
step waits for the machine to be free of other running processes first: on a shared
2-core machine a neighbour's process stalls every 2-thread parallel region, which hits
code made of many short operations (the FFT paths) much harder than one long torch call.

    python benchmarks/perf_dwconv.py           # all rows; writes benchmarks/results/dwconv.{md,json}
    python benchmarks/perf_dwconv.py --quick   # cheap rows only, fewer repeats
    python benchmarks/perf_dwconv.py --threads 1   # stable ratios on a busy machine
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from medadapt.ops.dwconv import choose_path, dwconv, dwconv_multi

RESULTS = Path(__file__).resolve().parent / "results"


def _torch_dwconv(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    conv = F.conv2d if x.ndim == 4 else F.conv3d
    return conv(x, weight, padding="same", groups=x.shape[1])


def _fwd_bwd(fn, x: torch.Tensor, weights: list[torch.Tensor], grad_out: torch.Tensor):
    """One timed step: forward, backward into ``x`` and every kernel."""

    def step() -> float:
        x.grad = None
        for w in weights:
            w.grad = None
        start = time.perf_counter()
        y = fn(x, weights)
        y.backward(grad_out)
        return (time.perf_counter() - start) * 1e3

    return step


def _runnable_tasks() -> int:
    """Tasks currently running or runnable on the machine (ourselves included), Linux only."""
    try:
        with open("/proc/stat") as f:
            for line in f:
                if line.startswith("procs_running"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 1


def _wait_for_quiet(max_wait: float = 120.0) -> bool:
    """Wait until no other task competes for the CPU (up to ``max_wait`` seconds).

    With 2 cores and 2 threads, a neighbour's process makes every parallel region wait
    for a descheduled thread: timings then swing by 10x and mostly measure the neighbour.
    Returns whether the machine was quiet (three samples in a row) before the deadline.
    """
    start = time.perf_counter()
    quiet = 0
    while quiet < 3:
        if time.perf_counter() - start >= max_wait:
            return False
        quiet = quiet + 1 if _runnable_tasks() <= 1 else 0
        time.sleep(0.2)
    return True


def _compare(torch_step, ours_step, repeats: int, torch_repeats: int, warmup: int, wait: float) -> tuple[float, float]:
    """Median milliseconds of both steps, timed alternately after a warm-up.

    Each repeat first waits (up to ``wait`` seconds) for the machine to be quiet, then
    runs both steps once untimed: after the idle wait, thread pools, caches and freed
    buffers are cold, which would add milliseconds to short steps. (Torch's side of the
    rows with fewer torch repeats takes seconds per step: not re-warmed, it does not matter.)
    """
    for _ in range(warmup):
        ours_step()
        if torch_repeats >= repeats:   # warming torch up too is affordable
            torch_step()
    ours, theirs = [], []
    for i in range(repeats):
        _wait_for_quiet(wait)
        ours_step()
        if torch_repeats >= repeats:   # not one of the rows where torch takes seconds
            torch_step()
        ours.append(ours_step())
        if i < torch_repeats:
            theirs.append(torch_step())
    return statistics.median(theirs), statistics.median(ours)


# name, x shape, kernel shapes (spatial), target speedup, quick?, torch repeats (None = same as ours)
CASES = [
    ("2D k51 16ch", (2, 16, 64, 64), [(51, 51)], 30.0, True, None),
    ("2D k51 192ch", (2, 192, 64, 64), [(51, 51)], 25.0, False, 3),
    ("2D k5 16ch", (2, 16, 64, 64), [(5, 5)], 1.0, True, None),
    ("2D k5 192ch", (2, 192, 64, 64), [(5, 5)], 1.0, False, None),
    # 3x3 stays on torch's own kernel: the ratio is 1 up to the wrapper's overhead and noise.
    ("2D k3 16ch", (2, 16, 64, 64), [(3, 3)], 0.95, True, None),
    ("3D k3x51x51 16ch", (2, 16, 8, 32, 32), [(3, 51, 51)], 40.0, False, 3),
    ("3D k3x5x5 16ch", (2, 16, 8, 32, 32), [(3, 5, 5)], 8.0, True, None),
    ("3D k3x51x51 16ch big", (2, 16, 16, 64, 64), [(3, 51, 51)], 200.0, False, 1),
    ("2D multi k51+k5 16ch", (2, 16, 64, 64), [(51, 51), (5, 5)], 30.0, True, None),
]


def run(quick: bool = False, wait_for_quiet: float | None = None) -> list[dict]:
    """Time every case (only the cheap ones when ``quick``); one result row per case.

    ``wait_for_quiet``: seconds to wait, before each row, for other processes to leave
    the CPU; default 120, or 0 for a quick run (a smoke test, not a measurement) and for a
    single thread (time-slicing then slows both implementations alike).
    """
    if wait_for_quiet is None:
        wait_for_quiet = 0.0 if quick or torch.get_num_threads() == 1 else 120.0
    torch.manual_seed(0)
    rows = []
    for name, shape, kernels, target, cheap, torch_repeats in CASES:
        if quick and not cheap:
            continue
        # Cheap rows get more repeats: their medians are otherwise as noisy as their ratio is small.
        macs = math.prod(shape) * max(math.prod(k) for k in kernels)
        repeats = 5 if quick else (60 if macs < 1e8 else 15)
        torch_repeats = repeats if torch_repeats is None else min(torch_repeats, repeats)
        warmup = 2 if quick else 3
        x = torch.randn(*shape, requires_grad=True)
        weights = [(0.1 * torch.randn(shape[1], 1, *k)).requires_grad_() for k in kernels]
        grad_out = torch.randn(*shape)
        if len(weights) == 1:
            ours = _fwd_bwd(lambda x, ws: dwconv(x, ws[0]), x, weights, grad_out)
            theirs = _fwd_bwd(lambda x, ws: _torch_dwconv(x, ws[0]), x, weights, grad_out)
        else:
            # The baseline a Dual-Kernel Adapter would otherwise run: one torch conv per kernel.
            ours = _fwd_bwd(dwconv_multi, x, weights, grad_out)
            theirs = _fwd_bwd(lambda x, ws: sum(_torch_dwconv(x, w) for w in ws), x, weights, grad_out)
        quiet = _wait_for_quiet(wait_for_quiet) if wait_for_quiet > 0 else None
        torch_ms, ours_ms = _compare(theirs, ours, repeats, torch_repeats, warmup, wait=min(wait_for_quiet, 10.0))
        speedup = torch_ms / ours_ms
        rows.append(
            {
                "name": name,
                "shape": list(shape),
                "kernel": " + ".join("x".join(map(str, k)) for k in kernels),
                "path": choose_path(shape, (shape[1], 1, *max(kernels)), requires_grad=True),
                "torch_ms": round(torch_ms, 3),
                "medadapt_ms": round(ours_ms, 3),
                "speedup": round(speedup, 2),
                "target": target,
                "pass": bool(speedup >= target),
                "quiet_start": quiet,
            }
        )
    return rows


def to_markdown(rows: list[dict]) -> str:
    header = "| name | shape | kernel | path | torch ms | medadapt ms | speedup | target | pass | quiet start |\n"
    header += "|---|---|---|---|---:|---:|---:|---:|---|---:|\n"
    lines = [
        f"| {r['name']} | {'x'.join(map(str, r['shape']))} | {r['kernel']} | {r['path']} | {r['torch_ms']:.2f} "
        f"| {r['medadapt_ms']:.2f} | {r['speedup']:.1f}x | {r['target']:g}x | {'yes' if r['pass'] else 'NO'} "
        f"| {'-' if r['quiet_start'] is None else 'yes' if r['quiet_start'] else 'no'} |"
        for r in rows
    ]
    return header + "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="cheap rows only, fewer repeats")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads (default: torch's own choice). One thread gives stable ratios on a "
        "busy machine; its results go to dwconv_<n>threads.{md,json}",
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = run(quick=args.quick)
    table = to_markdown(rows)
    print(table)
    if args.quick:   # a smoke run: keep the full results on disk
        return
    RESULTS.mkdir(parents=True, exist_ok=True)
    note = (
        "# dwconv speed (forward + backward, batch 2, fp32)\n\n"
        f"torch {torch.__version__}, {torch.get_num_threads()} threads. Ratios of medians, both "
        "implementations timed alternately in one process on the same inputs, each timed step "
        "started once no other process was running (quiet start: the row's first wait succeeded; "
        "'no' means it timed out and the row may be skewed by other load; '-': no waiting, as with "
        "one thread, where time-slicing slows both sides alike).\n\n"
    )
    stem = "dwconv" if args.threads is None else f"dwconv_{args.threads}threads"
    (RESULTS / f"{stem}.md").write_text(note + table)
    (RESULTS / f"{stem}.json").write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
