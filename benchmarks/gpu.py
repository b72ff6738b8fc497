"""medadapt on one GPU: dwconv against cuDNN, DKA training steps, peak memory, bf16 autocast.

    python benchmarks/gpu.py                  # sized for under 5 minutes on one GPU; writes benchmarks/results/gpu.{md,json}
    python benchmarks/gpu.py --quick          # fewer repeats, batch 1 only
    python benchmarks/gpu.py --device cuda:1 --out /tmp/gpu
    python benchmarks/gpu.py --device cpu --smoke --out /tmp/smoke   # tiny sizes: checks the script, measures nothing

Sections (every row compares two things measured in this process, timed alternately after a
warm-up, with CUDA events; the ratio is medadapt's side over the baseline):
  dwconv  medadapt.ops.dwconv (its own choice of path, and the FFT path) against cuDNN's
          depthwise convolution (F.conv2d / F.conv3d with groups=channels), forward +
          backward into input and kernel, on the cases of the CPU table in README.md
          (benchmarks/perf_dwconv.py), float32 and bf16 autocast. Target: >= 5x for 51x51.
  step    a DKA training step (forward, backward, AdamW) against a Houlsby-adapter step,
          bottleneck 16, MedSAM ViT-B at 1024x1024 (random weights), batch 1 and 4, float32
          and bf16 autocast. Target: <= 1.10.
  amp     the same steps, bf16 autocast against float32 (no target).
  memory  peak GPU memory (torch.cuda.max_memory_allocated) of DKA training against full
          fine-tuning, same model and batch. Target: <= 0.6.
cuDNN runs with torch.backends.cudnn.benchmark on (its fastest algorithm for each shape) and
torch's default TF32 settings, which are recorded with the results.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
sys.path.insert(0, str(HERE))

from perf_dwconv import CASES as DWCONV_CASES  # noqa: E402  (the CPU table's cases)
from perf_dwconv import _torch_dwconv  # noqa: E402

from medadapt.ops.dwconv import choose_path, dwconv, dwconv_multi  # noqa: E402

NO_DEVICE_EXIT = 2
DWCONV_TARGET = 5.0        # speed-up over cuDNN for 51x51 kernels
STEP_TARGET = 1.10         # DKA step time over Houlsby's
MEMORY_TARGET = 0.6        # DKA peak memory over full fine-tuning's
BOTTLENECK = 16


@dataclass(frozen=True)
class Sizes:
    """What one run measures: the real sizes, or tiny ones that only exercise the code."""

    backbone_options: dict
    batches: tuple[int, ...]
    repeats: int
    warmup: int
    row_budget_s: float          # a dwconv row stops repeating after this long (cuDNN's 3D
                                 # depthwise kernels with 3x51x51 can take a second per step)
    smoke: bool = False

    def dwconv_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        if not self.smoke:
            return shape
        # Batch 1, at most 4 channels and a 12x12 plane (4 slices): kernels stay as they are.
        spatial = [min(n, 12) for n in shape[2:]]
        if len(spatial) == 3:
            spatial[0] = min(spatial[0], 4)
        return (1, min(shape[1], 4), *spatial)


FULL = Sizes(backbone_options={"img_size": 1024}, batches=(1, 4), repeats=20, warmup=3, row_budget_s=5.0)
QUICK = Sizes(backbone_options={"img_size": 1024}, batches=(1,), repeats=5, warmup=2, row_budget_s=2.0)
# The tiny SAM configuration of the tests, through the same task-model path.
SMOKE = Sizes(
    backbone_options=dict(img_size=64, embed_dim=32, depth=2, num_heads=2, global_attn_indexes=(1,), window_size=2),
    batches=(1, 2), repeats=2, warmup=1, row_budget_s=1.0, smoke=True,
)


# ---------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------
def _synchronize(device: torch.device) -> None:
    if device.type != "cpu":
        torch.accelerator.synchronize(device)


def _time_ms(fn, device: torch.device) -> float:
    """Milliseconds of one call of ``fn``, with nothing else queued on the device around it."""
    _synchronize(device)
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    start = time.perf_counter()
    fn()
    _synchronize(device)
    return (time.perf_counter() - start) * 1e3


def median_alternating(steps: dict, device: torch.device, repeats: int, warmup: int,
                       budget_s: float | None = None) -> dict:
    """Median milliseconds of each step, the steps run in turn, repeat after repeat.

    The warm-up covers cuDNN's algorithm search, cuFFT plans and the caching allocator's
    first allocations. With ``budget_s`` repeating stops once that much time has passed
    (after at least 3 repeats).
    """
    for _ in range(warmup):
        for step in steps.values():
            step()
    times = {name: [] for name in steps}
    start = time.perf_counter()
    for i in range(repeats):
        for name, step in steps.items():
            times[name].append(_time_ms(step, device))
        if budget_s is not None and i >= 2 and time.perf_counter() - start > budget_s:
            break
    return {name: statistics.median(ts) for name, ts in times.items()}


def _autocast(device: torch.device, amp: bool):
    return torch.autocast(device.type, dtype=torch.bfloat16) if amp else nullcontext()


# ---------------------------------------------------------------------------------------
# Rows and the table
# ---------------------------------------------------------------------------------------
def row(section: str, name: str, baseline: float, ours: float, unit: str, target: float | None = None,
        speedup_target: bool = False, note: str = "") -> dict:
    """One comparison. ``ratio`` is always ours / baseline; a target is either an upper bound
    on that ratio or, with ``speedup_target``, a lower bound on baseline / ours."""
    ratio = ours / baseline
    if target is None:
        target_text, passed = None, None
    elif speedup_target:
        target_text, passed = f">= {target:g}x faster", baseline / ours >= target
    else:
        target_text, passed = f"<= {target:g}", ratio <= target
    return {"section": section, "name": name, "baseline": round(baseline, 3), "ours": round(ours, 3),
            "unit": unit, "ratio": round(ratio, 4), "target": target_text,
            "pass": None if passed is None else bool(passed), "note": note}


def failed_row(section: str, name: str, error: Exception, target: str | None = None) -> dict:
    """A comparison that could not be measured (out of memory, an unsupported kernel)."""
    message = str(error).splitlines()[0][:120] if str(error) else type(error).__name__
    return {"section": section, "name": name, "baseline": None, "ours": None, "unit": "", "ratio": None,
            "target": target, "pass": False if target else None, "note": f"failed: {message}"}


def to_markdown(rows: list[dict]) -> str:
    lines = ["| section | comparison | baseline | medadapt | unit | ratio | target | pass | note |",
             "|---|---|---:|---:|---|---:|---|---|---|"]
    for r in rows:
        passed = "" if r["pass"] is None else ("yes" if r["pass"] else "NO")
        cells = [r["section"], r["name"], r["baseline"], r["ours"], r["unit"], r["ratio"], r["target"], passed,
                 r["note"]]
        lines.append("| " + " | ".join("" if c is None else str(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------
# dwconv against cuDNN
# ---------------------------------------------------------------------------------------
def _fwd_bwd(conv, x: torch.Tensor, weights: list[torch.Tensor], grad_out: torch.Tensor, amp: bool):
    def step():
        x.grad = None
        for w in weights:
            w.grad = None
        with _autocast(x.device, amp):
            y = conv(x, weights)
        y.backward(grad_out)

    return step


def bench_dwconv(device: torch.device, sizes: Sizes) -> list[dict]:
    rows = []
    torch.manual_seed(0)
    for name, cpu_shape, kernels, _cpu_target, _cheap, _ in DWCONV_CASES:
        shape = sizes.dwconv_shape(cpu_shape)
        # The target is about 51x51 in-plane kernels (2D, 3x51x51, and DKA's pair).
        target = DWCONV_TARGET if max(k[-1] for k in kernels) >= 51 else None
        kernel_text = " + ".join("x".join(map(str, k)) for k in kernels)
        path = choose_path(shape, (shape[1], 1, *max(kernels)), requires_grad=True)
        for amp in (False, True):
            precision = "bf16 autocast" if amp else "float32"
            label = f"{name}, {'x'.join(map(str, shape))}, kernel {kernel_text}, {precision}"
            try:
                # Under autocast an adapter's convolution sees the bf16 output of a linear layer
                # and its float32 kernels; the gradient arrives in bf16.
                dtype = torch.bfloat16 if amp else torch.float32
                x = torch.randn(*shape, device=device, dtype=dtype, requires_grad=True)
                weights = [(0.1 * torch.randn(shape[1], 1, *k, device=device)).requires_grad_() for k in kernels]
                grad_out = torch.randn(*shape, device=device, dtype=dtype)
                if len(kernels) == 1:
                    steps = {"cudnn": lambda x, ws: _torch_dwconv(x, ws[0]),
                             "medadapt": lambda x, ws: dwconv(x, ws[0]),
                             "fft": lambda x, ws: dwconv(x, ws[0], path="fft")}
                else:   # what a Dual-Kernel Adapter would run without medadapt: one conv per kernel
                    steps = {"cudnn": lambda x, ws: sum(_torch_dwconv(x, w) for w in ws),
                             "medadapt": dwconv_multi,
                             "fft": lambda x, ws: dwconv_multi(x, ws, path="fft")}
                if path == "fft":
                    del steps["fft"]   # the same computation twice
                ms = median_alternating({k: _fwd_bwd(conv, x, weights, grad_out, amp) for k, conv in steps.items()},
                                        device, sizes.repeats, sizes.warmup, budget_s=sizes.row_budget_s)
                note = f"speed-up {ms['cudnn'] / ms['medadapt']:.1f}x; path {path}"
                if "fft" in ms:
                    note += f"; FFT path forced: {ms['fft']:.3f} ms, speed-up {ms['cudnn'] / ms['fft']:.1f}x"
                rows.append(row("dwconv", label, ms["cudnn"], ms["medadapt"], "ms", target, speedup_target=True,
                                note=note))
            except (RuntimeError, torch.OutOfMemoryError) as error:
                rows.append(failed_row("dwconv", label, error, None if target is None else f">= {target:g}x faster"))
            finally:
                x = weights = grad_out = None
                _release(device)
    return rows


# ---------------------------------------------------------------------------------------
# Training steps and memory on MedSAM ViT-B
# ---------------------------------------------------------------------------------------
def sam_classifier(method: str, sizes: Sizes, device: torch.device):
    """The classification task model of benchmarks/run.py's step and memory sections
    (medadapt.create_model on medsam_vit_b, 3 classes), with its AdamW optimizer."""
    import medadapt

    options = {"bottleneck": BOTTLENECK} if method in ("adapter", "dka") else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # random weights: NotPretrainedWarning
        model = medadapt.create_model("classification", backbone="medsam_vit_b",
                                      backbone_options=sizes.backbone_options, num_classes=3, method=method,
                                      method_options=options)
    model = model.to(device).train()
    optimizer = torch.optim.AdamW(medadapt.param_groups(model, lr_backbone=1e-5))
    return model, optimizer


def _batch(batch: int, sizes: Sizes, device: torch.device):
    side = sizes.backbone_options["img_size"]
    generator = torch.Generator().manual_seed(batch)
    x = torch.rand(batch, 3, side, side, generator=generator).to(device)
    y = torch.randint(0, 3, (batch,), generator=generator).to(device)
    return x, y


def _train_step(model, optimizer, x, y, amp: bool):
    def step():
        optimizer.zero_grad(set_to_none=True)
        with _autocast(x.device, amp):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()

    return step


def _release(device: torch.device) -> None:
    """Free what the last measurement left, so that the next one's peak is its own."""
    gc.collect()   # injected models can hold reference cycles
    if device.type == "cuda":
        torch.cuda.empty_cache()


def bench_step(device: torch.device, sizes: Sizes) -> list[dict]:
    """DKA against Houlsby, and bf16 autocast against float32, all four steps alternated."""
    side = sizes.backbone_options["img_size"]
    models = {method: sam_classifier(method, sizes, device) for method in ("adapter", "dka")}
    rows, amp_rows = [], []
    for batch in sizes.batches:
        what = f"MedSAM ViT-B {side}x{side}, batch {batch}, bottleneck {BOTTLENECK}"
        try:
            x, y = _batch(batch, sizes, device)
            steps = {(method, amp): _train_step(model, optimizer, x, y, amp)
                     for method, (model, optimizer) in models.items() for amp in (False, True)}
            ms = median_alternating(steps, device, sizes.repeats, sizes.warmup)
        except torch.OutOfMemoryError as error:
            rows.append(failed_row("step", f"DKA vs Houlsby step, {what}", error, f"<= {STEP_TARGET:g}"))
            continue
        finally:
            x = y = steps = None
            _release(device)
        for amp in (False, True):
            precision = "bf16 autocast" if amp else "float32"
            rows.append(row("step", f"DKA vs Houlsby step, {what}, {precision}", ms["adapter", amp], ms["dka", amp],
                            "ms", STEP_TARGET))
        for method, title in (("dka", "DKA"), ("adapter", "Houlsby")):
            fp32, bf16 = ms[method, False], ms[method, True]
            amp_rows.append(row("amp", f"{title} step, bf16 autocast vs float32, {what}", fp32, bf16, "ms",
                                note=f"speed-up {fp32 / bf16:.2f}x"))
    del models
    _release(device)
    return rows + amp_rows


def _peak_memory_mib(method: str, batch: int, sizes: Sizes, device: torch.device,
                     amp: bool = False) -> tuple[float, float]:
    """(peak allocated MiB over two training steps, MiB held by the model before them)."""
    model, optimizer = sam_classifier(method, sizes, device)
    x, y = _batch(batch, sizes, device)
    step = _train_step(model, optimizer, x, y, amp)
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    for _ in range(2):   # the first step also creates the optimizer's state
        step()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    del model, optimizer, step
    _release(device)
    return peak / 2**20, before / 2**20


def bench_memory(device: torch.device, sizes: Sizes) -> list[dict]:
    """Each configuration on its own, one after the other (nothing else is alive meanwhile)."""
    if device.type != "cuda":
        print("   memory: skipped, torch.cuda.max_memory_allocated needs a CUDA device", flush=True)
        return []
    side = sizes.backbone_options["img_size"]
    rows = []
    for batch in sizes.batches:
        what = f"MedSAM ViT-B {side}x{side}, batch {batch}"
        try:
            full, model_mib = _peak_memory_mib("full", batch, sizes, device)
            dka, _ = _peak_memory_mib("dka", batch, sizes, device)
            rows.append(row("memory", f"peak memory, DKA vs full fine-tuning, {what}, float32", full, dka, "MiB",
                            MEMORY_TARGET, note=f"max_memory_allocated; {model_mib:.0f} MiB of it allocated "
                            "before the steps (model and batch)"))
            dka_bf16, _ = _peak_memory_mib("dka", batch, sizes, device, amp=True)
            rows.append(row("memory", f"DKA peak memory, bf16 autocast vs float32, {what}", dka, dka_bf16, "MiB"))
        except torch.OutOfMemoryError as error:
            rows.append(failed_row("memory", f"peak memory, {what}", error, f"<= {MEMORY_TARGET:g}"))
        _release(device)   # out here: inside ``except`` the traceback still holds the model
    return rows


SECTIONS = {"dwconv": bench_dwconv, "step": bench_step, "memory": bench_memory}


# ---------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------
def resolve_device(requested: str | None, smoke: bool) -> torch.device:
    """The device to measure on; exits with NO_DEVICE_EXIT and a message when there is none."""
    if requested is None:
        if torch.cuda.is_available():
            requested = "cuda"
        elif smoke:
            requested = "cpu"
        else:
            _no_device("no CUDA GPU is visible (torch.cuda.is_available() is False)")
    device = torch.device(requested)
    if device.type == "cpu" and not smoke:
        _no_device("--device cpu measures nothing useful at these sizes; benchmarks/run.py is the CPU "
                   "benchmark (add --smoke to check this script on tiny sizes)")
    if device.type == "cuda" and not torch.cuda.is_available():
        _no_device(f"--device {requested}: no CUDA GPU is visible (torch.cuda.is_available() is False)")
    try:
        torch.empty(1, device=device)
    except (RuntimeError, AssertionError) as error:
        _no_device(f"--device {requested} cannot be used: {str(error).splitlines()[0]}")
    return device


def _no_device(reason: str):
    print(f"benchmarks/gpu.py: {reason}. This benchmark needs a GPU; nothing was measured.", file=sys.stderr)
    raise SystemExit(NO_DEVICE_EXIT)


def _environment(device: torch.device, args) -> dict:
    env = {"torch": torch.__version__, "device": str(device), "command": "python benchmarks/gpu.py " + " ".join(args)}
    if device.type == "cuda":
        env.update(gpu=torch.cuda.get_device_name(device), cuda=torch.version.cuda,
                   cudnn=torch.backends.cudnn.version(), cudnn_benchmark=torch.backends.cudnn.benchmark,
                   cudnn_allow_tf32=torch.backends.cudnn.allow_tf32,
                   matmul_precision=torch.get_float32_matmul_precision())
    else:
        env["threads"] = torch.get_num_threads()
    return env


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default=None, help="torch device to measure on (default: cuda when available)")
    parser.add_argument("--quick", action="store_true", help="fewer repeats, batch 1 only")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny sizes (a tiny SAM, small maps): checks that the script runs, e.g. on the CPU")
    parser.add_argument("--only", nargs="*", choices=sorted(SECTIONS), help="run only these sections")
    parser.add_argument("--out", type=Path, default=None,
                        help=f"folder for gpu.md and gpu.json (default {RESULTS}; a smoke run writes only with --out)")
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    device = resolve_device(args.device, args.smoke)
    sizes = SMOKE if args.smoke else QUICK if args.quick else FULL
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True   # cuDNN's best algorithm per shape: the fair baseline
    environment = _environment(device, argv)
    print(f"== {environment}", flush=True)
    rows = []
    for name in args.only or list(SECTIONS):
        print(f"== {name}", flush=True)
        section_rows = SECTIONS[name](device, sizes)
        for r in section_rows:
            print(f"   {r['name']}: {r['baseline']} -> {r['ours']} {r['unit']} (ratio {r['ratio']}, "
                  f"target {r['target']}, pass {r['pass']}) {r['note']}", flush=True)
        rows += section_rows
    table = to_markdown(rows)
    print(table)
    out = args.out if args.out is not None else (None if args.smoke else RESULTS)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        header = (f"# medadapt on {environment.get('gpu', environment['device'])}\n\n"
                  + ", ".join(f"{k} {v}" for k, v in environment.items() if k != "command")
                  + f"; command: `{environment['command'].strip()}`\n\n")
        (out / "gpu.md").write_text(header + table)
        (out / "gpu.json").write_text(json.dumps({"environment": environment, "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
