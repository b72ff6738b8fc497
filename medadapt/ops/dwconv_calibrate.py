"""Check the cost model of :func:`medadapt.ops.dwconv.choose_path` against timings.

    python -m medadapt.ops.dwconv_calibrate [--threads 1] [--quick]

Times both implementations (forward only, and forward + backward) over a grid of 2D and
3D shapes and prints, per case, the measured times, the model's estimates and which
path the model picks versus which was faster. The constants in ``dwconv.py`` were fitted
to this output on the project's machines.

Timing uses per-thread CPU time and the minimum over repeats, with one thread by
default: on a shared machine that is far more stable than wall-clock time, and both paths
parallelise over channels alike, so the comparison carries over to more threads.
"""

from __future__ import annotations

import argparse
import importlib
import math
import time

import torch

# The package re-exports the function under the module's name, hence importlib.
D = importlib.import_module("medadapt.ops.dwconv")

GRID_2D = [
    (channels, size, k)
    for channels, size in [(16, 64), (16, 32), (192, 64), (64, 128)]
    for k in (3, 5, 7, 9, 13, 15, 21, 31, 51)
] + [(768, 14, 3), (768, 14, 7), (768, 14, 13)]
GRID_3D = [
    (16, (8, 32, 32), (3, 3, 3)),
    (16, (8, 32, 32), (3, 5, 5)),
    (16, (8, 32, 32), (5, 5, 5)),
    (16, (8, 32, 32), (3, 7, 7)),
    (16, (8, 32, 32), (7, 7, 7)),
    (16, (8, 32, 32), (3, 11, 11)),
    (16, (8, 32, 32), (3, 51, 51)),
    (16, (16, 32, 32), (3, 3, 3)),
    (32, (16, 16, 16), (3, 3, 3)),
    (32, (16, 16, 16), (5, 5, 5)),
    (8, (32, 32, 32), (5, 5, 5)),
    (16, (16, 64, 64), (3, 5, 5)),
]
# Direct convolutions beyond this many multiply-adds take seconds and always lose.
MAX_DIRECT_MACS = 3e9


def _time(fn, repeats: int) -> float:
    fn()
    best = math.inf
    for _ in range(repeats):
        start = time.thread_time()
        fn()
        best = min(best, time.thread_time() - start)
    return best * 1e3


def measure(x_shape, kernel, repeats: int = 5) -> dict:
    """Milliseconds of both paths, forward only and forward + backward."""
    x = torch.randn(*x_shape, requires_grad=True)
    w = torch.randn(x_shape[1], 1, *kernel, requires_grad=True)
    g = torch.randn(*x_shape)
    out = {}
    macs = math.prod(x_shape) * math.prod(kernel)
    for path in D.PATHS:
        if path != "fft" and macs > MAX_DIRECT_MACS:
            out[path] = (math.inf, math.inf)
            continue
        slow = path != "fft" and macs > MAX_DIRECT_MACS / 10   # torch's slow forward or backward
        reps = 1 if slow else repeats

        def forward():
            with torch.no_grad():
                D.dwconv(x, w, path=path)

        def both():
            D.dwconv(x, w, path=path).backward(g)

        # Without a backward, "mixed" runs exactly the direct forward.
        forward_ms = out["direct"][0] if path == "mixed" else _time(forward, reps)
        out[path] = (forward_ms, _time(both, reps))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="a few cases only")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cases = [((2, c, s, s), (k, k)) for c, s, k in GRID_2D] + [((2, c, *s), k) for c, s, k in GRID_3D]
    if args.quick:
        cases = cases[::6]
    print("shape | kernel | grad | measured ms: direct fft mixed | model ms: direct fft mixed | picks | fastest | loss")
    worst = 1.0
    for x_shape, kernel in cases:
        times = measure(x_shape, kernel)
        for grad in (False, True):
            measured = {path: times[path][grad] for path in D.PATHS}
            model = D.path_costs(x_shape, (x_shape[1], 1, *kernel), requires_grad=grad)
            pick = D.choose_path(x_shape, (x_shape[1], 1, *kernel), requires_grad=grad)
            best = min(measured, key=measured.__getitem__)
            loss = measured[pick] / measured[best]
            worst = max(worst, loss)
            print(
                f"{x_shape} | {kernel} | {grad} | "
                + " ".join(f"{measured[p]:.2f}" for p in D.PATHS)
                + " | "
                + " ".join(f"{model[p] / 1e6:.2f}" for p in D.PATHS)
                + f" | {pick} | {best} | {loss:.2f}x",
                flush=True,
            )
    print(f"worst slowdown from a wrong pick: {worst:.2f}x")


if __name__ == "__main__":
    main()
