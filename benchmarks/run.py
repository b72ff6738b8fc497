"""medadapt's performance benchmarks: every target is a ratio measured in one run.

    python benchmarks/run.py            # everything; writes benchmarks/results/perf.{md,json}
    python benchmarks/run.py --quick    # fewer repeats, smaller inputs
    python benchmarks/run.py --only step memory

Sections (each row: what was compared, both measurements, their ratio, the target):
  dwconv     medadapt.ops.dwconv against torch's depthwise convolutions (perf_dwconv.py)
  step       a DKA training step against a Houlsby-adapter step, SAM ViT-B encoder at 256x256
  memory     peak RSS of DKA fine-tuning against full fine-tuning (and with checkpointing);
             adapter file size against the full checkpoint
  cache      a linear-probing / CLAdapter stage-1 epoch on cached features against a normal one,
             directly and through dka_busi_cls train.json (feature_cache auto against False)
  window     sliding-window inference of a BraTS-sized volume with the default bundle model:
             pipeline time against the model's bare forward time over the same windows
  demo       peak RSS and time of one training epoch of the dka_brats demo bundle
  allocator  a LiteMedSAM 3D training step and inference window with and without medadapt's
             glibc allocator settings (medadapt/runtime.py)
  stem       the dka_brats training step with a learned input stem against three selected sequences
  label      one volume through a real medadapt label server
  label_load 100 clients (some idle or slow) against a real medadapt label server for 60 s
  box3d      3D box propagation through a 128 x 128 x 100 volume: the model called whole on each
             slice against slices encoded apart, a redrawn box reusing the kept embeddings, and
             the encoder on a batch of slices against one by one
Absolute times depend on the machine and its load; the ratios are the result.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS = HERE / "results"
sys.path.insert(0, str(HERE))
warnings.filterwarnings("ignore")


def _median_alternating(steps: dict, repeats: int, warmup: int = 1) -> dict:
    """Median milliseconds of each step, run alternately so machine load hits all alike."""
    times = {name: [] for name in steps}
    for _ in range(warmup):
        for step in steps.values():
            step()
    for _ in range(repeats):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(ts) for name, ts in times.items()}


def _row(section, name, baseline, ours, unit, target, better="lower", note=""):
    ratio = ours / baseline if baseline else float("nan")
    if target is None:
        return {"section": section, "name": name, "baseline": round(baseline, 3), "ours": round(ours, 3),
                "unit": unit, "ratio": round(ratio, 4), "target": None, "pass": None, "note": note}
    ok = ratio <= target if better == "lower" else ratio >= target
    return {"section": section, "name": name, "baseline": round(baseline, 3), "ours": round(ours, 3),
            "unit": unit, "ratio": round(ratio, 4), "target": f"{'<=' if better == 'lower' else '>='} {target}",
            "pass": bool(ok), "note": note}


def _sam_classifier(method: str, options: dict, img_size: int = 256):
    import medadapt

    model = medadapt.create_model("classification", backbone="medsam_vit_b", backbone_options={"img_size": img_size},
                                  num_classes=3, method=method, method_options=options)
    return model


def bench_step(quick: bool) -> list[dict]:
    """DKA vs Houlsby adapter training step (forward, backward, AdamW), same bottleneck."""
    import medadapt

    torch.manual_seed(0)
    x, y = torch.rand(2, 3, 256, 256), torch.tensor([0, 2])
    steps = {}
    for method in ("adapter", "dka"):
        model = _sam_classifier(method, {"bottleneck": 16}).train()
        optimizer = torch.optim.AdamW(medadapt.param_groups(model))

        def step(model=model, optimizer=optimizer):
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()

        steps[method] = step
    ms = _median_alternating(steps, repeats=2 if quick else 5)
    return [_row("step", "DKA vs Houlsby step, SAM ViT-B 256x256, batch 2, bottleneck 16",
                 ms["adapter"], ms["dka"], "ms", 1.10)]


_MEMORY_CHILD = r"""
import sys, warnings, torch
warnings.filterwarnings("ignore")
import medadapt
def status_mb(key):  # this process's own figures; ru_maxrss would keep the forking parent's RSS across exec
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":")) / 1024
method, checkpointing = sys.argv[1], sys.argv[2] == "1"
torch.manual_seed(0)
model = medadapt.create_model("classification", backbone="medsam_vit_b", backbone_options={"img_size": 256},
                              num_classes=3, method=method, method_options={"bottleneck": 16} if method == "dka" else {},
                              gradient_checkpointing=checkpointing).train()
optimizer = torch.optim.AdamW(medadapt.param_groups(model, lr_backbone=1e-5))
x, y = torch.rand(2, 3, 256, 256), torch.tensor([0, 2])
before = status_mb("VmRSS")
with open("/proc/self/clear_refs", "w") as f:  # restart VmHWM here: the peak of training alone
    f.write("5")
for _ in range(2):
    optimizer.zero_grad()
    torch.nn.functional.cross_entropy(model(x), y).backward()
    optimizer.step()
print(status_mb("VmHWM"), before)
"""


def _training_rss_mb(method: str, checkpointing: bool = False) -> float:
    """Peak RSS added by training steps, over the process's RSS once the model is built: what
    fine-tuning itself costs, without torch's libraries and the weights every method shares.
    The child reads its own /proc/self/status (VmRSS, then VmHWM restarted through
    clear_refs), because ru_maxrss keeps the RSS of the parent it was forked from, which after
    the earlier sections is larger than anything the child does.

    Measured with glibc's default allocator settings: medadapt's (medadapt/runtime.py) keep
    the memory freed after building the model in the process, training reuses it, and the
    peak would then hardly move whatever training needs.
    """
    out = subprocess.run([sys.executable, "-c", _MEMORY_CHILD, method, "1" if checkpointing else "0"],
                         capture_output=True, text=True, encoding="utf-8", errors="replace", check=True,
                         env=dict(os.environ, PYTHONWARNINGS="ignore", MEDADAPT_MALLOC_TUNING="0"))
    peak, before = (float(v) for v in out.stdout.split()[:2])
    return peak - before


def bench_memory(quick: bool) -> list[dict]:
    import medadapt
    from medadapt.checkpoint import WEIGHTS_NAME

    rows = []
    full = _training_rss_mb("full")
    dka = _training_rss_mb("dka")
    rows.append(_row("memory", "training peak RSS over the built model: DKA vs full fine-tuning, SAM ViT-B 256, batch 2",
                     full, dka, "MB", 0.6))
    checkpointed = _training_rss_mb("dka", checkpointing=True)
    rows.append(_row("memory", "training peak RSS: DKA with vs without gradient checkpointing", dka, checkpointed, "MB",
                     None, note="what checkpointing the frozen encoder saves at this size"))
    model = _sam_classifier("dka", {"bottleneck": 16})
    with tempfile.TemporaryDirectory() as tmp:
        sizes = {dtype: (medadapt.save_adapters(model, Path(tmp) / str(dtype), dtype=dtype)
                         / WEIGHTS_NAME).stat().st_size / 2**20 for dtype in (None, "float16")}
        torch.save(model.state_dict(), Path(tmp) / "full.pt")
        full_mib = (Path(tmp) / "full.pt").stat().st_size / 2**20
    rows.append(_row("memory", "adapter file vs full checkpoint (DKA, SAM ViT-B, float32 as trained)", full_mib,
                     sizes[None], "MiB", None, note="the 24 adapters' 51x51 kernels alone are 1.1 % in float32"))
    rows.append(_row("memory", "adapter file vs full checkpoint (DKA, SAM ViT-B, save_adapters(dtype='float16'))",
                     full_mib, sizes["float16"], "MiB", 0.01))
    return rows


def bench_cache(quick: bool) -> list[dict]:
    """An epoch of linear probing / CLAdapter stage 1 on cached features vs through the encoder."""
    import medadapt
    from medadapt.engine.features import cache_features, head_forward, output_adapter

    rows = []
    batches = [(torch.rand(4, 3, 256, 256), torch.randint(0, 3, (4,))) for _ in range(2 if quick else 4)]
    for method, options in (("linear", {}), ("cladapter", {"num_clusters": 20, "bottleneck": 64})):
        model = medadapt.create_model("classification", backbone="litemedsam", num_classes=3, method=method,
                                      method_options=options)
        optimizer = torch.optim.AdamW(medadapt.param_groups(model))
        adapter = output_adapter(model)
        cached = cache_features(model, batches)

        def plain_epoch():
            model.train()
            for x, y in batches:
                optimizer.zero_grad()
                torch.nn.functional.cross_entropy(model(x), y).backward()
                optimizer.step()

        def cached_epoch():
            model.train()
            for f, y in cached:
                optimizer.zero_grad()
                torch.nn.functional.cross_entropy(head_forward(model, f, adapter), y).backward()
                optimizer.step()

        ms = _median_alternating({"plain": plain_epoch, "cached": cached_epoch}, repeats=1 if quick else 3, warmup=0)
        rows.append(_row("cache", f"{method}: cached epoch vs encoder epoch (LiteMedSAM, {len(batches)} batches of 4)",
                         ms["plain"], ms["cached"], "ms", None, note=f"speed-up {ms['plain'] / ms['cached']:.0f}x"))
    # The same through the bundle users run: dka_busi_cls train.json on its demo, deterministic
    # training inputs (the cache's condition), feature_cache "auto" against False.
    epochs = 3 if quick else 4
    for method, options in (("linear", {}), ("cladapter", {"stage2_epoch": epochs + 1})):
        seconds = {cache: _bundle_epoch_seconds("dka_busi_cls", epochs, method=method, feature_cache=cache,
                                                **{"train#preprocessing": "%validate#preprocessing"}, **options)
                   for cache in (False, "auto")}
        # Epoch 1 fills the cache; the last one also validates.
        plain, cached = (1000 * statistics.median(seconds[c][1:-1]) for c in (False, "auto"))
        rows.append(_row("cache", f"{method}: dka_busi_cls train.json epoch, feature_cache auto vs False "
                         "(LiteMedSAM 256, demo)", plain, cached, "ms", None,
                         note=f"speed-up {plain / cached:.0f}x; first epoch {seconds['auto'][0]:.1f} s vs "
                              f"{seconds[False][0]:.1f} s"))
    return rows


def _bundle_epoch_seconds(bundle: str, epochs: int, **overrides) -> list[float]:
    """Wall time of each training epoch of ``bundle``'s train.json, validating at the last."""
    from ignite.engine import Events

    from medadapt.engine.bundle import workflow

    with tempfile.TemporaryDirectory() as tmp:
        flow = workflow(str(REPO / "bundles" / bundle / "train.json"), output_dir=tmp, max_epochs=epochs,
                        val_interval=epochs, progress=False, **overrides)
        flow.initialize()
        trainer = flow.parser.get_parsed_content("train#trainer")
        starts, seconds = [], []
        trainer.add_event_handler(Events.EPOCH_STARTED, lambda _: starts.append(time.perf_counter()))
        trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda _: seconds.append(time.perf_counter() - starts[-1]))
        flow.run()
        flow.finalize()
    return seconds


def _bundle_value(bundle: str, key: str, **overrides):
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(REPO / "bundles" / bundle / "train.json"))
    for name, value in overrides.items():
        parser[name] = value
    return parser.get_parsed_content(key)


def bench_window(quick: bool) -> list[dict]:
    """dka_brats inference on real-sized data: its network as inference.json builds it for real
    data against the settings it had before (LiteMedSAM at 256, DKA bottleneck 16 beside
    attention and MLP), window by window, and seconds per BraTS volume; and the sliding-window
    pipeline's overhead over a bare forward."""
    import medadapt
    from monai.data.utils import dense_patch_slices
    from monai.inferers import SlidingWindowInferer

    real = {"dataset_dir": "a real dataset"}  # the settings for real data, not the demo's
    roi = tuple(_bundle_value("dka_brats", "roi_size", **real))
    sw_batch = int(_bundle_value("dka_brats", "sw_batch_size"))
    overlap = float(_bundle_value("dka_brats", "sw_overlap"))
    now = _bundle_value("dka_brats", "network_def", **real).eval()
    before = medadapt.create_model("segmentation3d", backbone="litemedsam", num_classes=3, in_channels=4,
                                   num_slices=roi[2], multilabel=True, method="dka",
                                   method_options={"bottleneck": 16, "placement": "parallel"}).eval()
    window = torch.rand(1, 4, *roi)

    def forward(model):
        def run():
            with torch.inference_mode():
                model(window)
        return run

    per_window = _median_alternating({"before": forward(before), "now": forward(now)}, repeats=1 if quick else 3)
    interval = [max(1, int(r * (1 - overlap))) for r in roi]
    brats = len(dense_patch_slices((240, 240, 155), roi, interval))
    small = len(dense_patch_slices((128, 128, 62), roi, interval))
    slice_size = _bundle_value("dka_brats", "slice_size", **real)
    rows = [
        _row("window", f"dka_brats window forward, {roi}: before (LiteMedSAM 256, DKA b16 beside attention/MLP) vs "
             f"now (slice_size {slice_size}, DKA b192 after each block)", per_window["before"], per_window["now"],
             "ms", 1 / 3),
        _row("window", f"seconds per BraTS volume 4x240x240x155 ({brats} windows), before vs now",
             per_window["before"] * brats / 1e3, per_window["now"] * brats / 1e3, "s", 1 / 3,
             note="window time x window count; 2 CPU cores"),
        {"section": "window", "name": f"seconds per 128x128x62 volume ({small} windows), now", "baseline": None,
         "ours": round(per_window["now"] * small / 1e3, 1), "unit": "s", "ratio": None, "target": "< 60",
         "pass": per_window["now"] * small / 1e3 < 60, "note": "the network's share of a medadapt label request"},
    ]

    # A slab of a BraTS-sized volume keeps the pipeline measurement short.
    volume = torch.rand(1, 4, 240, 240, 7 if quick else 13)
    inferer = SlidingWindowInferer(roi_size=roi, sw_batch_size=sw_batch, overlap=overlap, mode="gaussian")
    slices = dense_patch_slices(volume.shape[2:], roi, interval)
    windows = [volume[(slice(None), slice(None), *s)] for s in slices]

    def pipeline():
        with torch.inference_mode():
            inferer(volume, now)

    def bare():
        with torch.inference_mode():
            for i in range(0, len(windows), sw_batch):
                now(torch.cat(windows[i:i + sw_batch]))

    ms = _median_alternating({"bare": bare, "pipeline": pipeline}, repeats=1 if quick else 2, warmup=0)
    rows.append(_row("window", f"sliding window vs bare forward over the same {len(windows)} windows (dka_brats "
                     f"network for real data, sw_batch_size {sw_batch})", ms["bare"], ms["pipeline"], "ms", 1.15))
    return rows


def bench_box3d(quick: bool) -> list[dict]:
    """One box through a 128 x 128 x 100 volume (nilearn's MNI152 2 mm T1 template centred in
    zeros, its brain the object) with the box model as served (LiteMedSAM, fresh DKA): the model
    called whole on each slice, as propagation ran before, against slices encoded apart (the
    default precision, and float32), each a first request (empty cache); then a redrawn box on
    the same volume, which reuses the kept embeddings; and the encoder on a batch of slices
    against the same slices one by one.

    Every run uses propagate_boxes' default stopping rules (docs/box3d.md, "Where a run
    stops"). --quick: 17 slices around the box."""
    from box3d_mni152 import (OneCallPerSlice, dice, middle_box, mni152_volume_and_brain, pad_to, served_box_model,
                              slices_holding)
    from medadapt.models.box_propagation import EmbeddingCache, propagate_boxes

    shape = (128, 128, 100)
    t1, brain = mni152_volume_and_brain(2)
    volume, brain = pad_to(t1, shape), pad_to(brain, shape)
    middle, box = middle_box(brain, axis=2)
    rules = {"slice_range": (middle - 8, middle + 8)} if quick else {}
    torch.manual_seed(0)
    model = served_box_model()
    done = {}

    def first_request(name, network, **settings):
        def run():
            cache = EmbeddingCache()
            done[name] = propagate_boxes(network, volume, {middle: box}, 2, cache=cache, **settings, **rules), cache
        return run

    seconds = {name: ms / 1e3 for name, ms in _median_alternating({
        "whole": first_request("whole", OneCallPerSlice(model)),
        "apart": first_request("apart", model),
        "float32": first_request("float32", model, precision="float32"),
    }, repeats=1, warmup=0).items()}  # minutes each on a CPU
    (before, _), (after, cache), (float32, _) = done["whole"], done["apart"], done["float32"]
    redrawn = [max(0.0, box[0] - 2), max(0.0, box[1] - 2), min(127.0, box[2] + 2), min(127.0, box[3] + 2)]
    start = time.perf_counter()
    second = propagate_boxes(model, volume, {middle: redrawn}, 2, cache=cache, **rules)
    second_s = time.perf_counter() - start

    what = f"one box through a 128 x 128 x 100 MNI152 volume{' (17 slices)' if quick else ''}"
    brain_slices = slices_holding(brain, 2)
    scores = {name: dice(result.mask, brain) for name, (result, _) in done.items()}
    return [
        _row("box3d", f"{what}, first request: one call per slice (before) vs encoded apart ({after.precision} "
             "encoder)", seconds["whole"], seconds["apart"], "s", None,
             note=f"{seconds['whole'] / seconds['apart']:.1f}x faster; Dice {scores['whole']:.3f} vs "
                  f"{scores['apart']:.3f}; {len(after.encoded)} slices encoded, each once"),
        _row("box3d", f"{what}, first request: one call per slice vs encoded apart in float32", seconds["whole"],
             seconds["float32"], "s", None, note=f"Dice {scores['float32']:.3f}, masks "
             f"{'identical' if np.array_equal(float32.mask, before.mask) else 'different'}"),
        _row("box3d", f"{what}: a redrawn box (2 voxels larger) vs the first request", seconds["apart"], second_s,
             "s", 0.2, note=f"{len(second.encoded)} slices encoded, {len(second.reused)} reused"),
        {"section": "box3d", "name": f"seconds for {what}, first request ({after.precision} encoder, 2 CPU threads)",
         "baseline": None, "ours": round(seconds["apart"], 1), "unit": "s", "ratio": None, "target": "< 60",
         "pass": seconds["apart"] < 60,
         "note": f"slices {after.slices[0]}-{after.slices[-1]} of the brain's {brain_slices[0]}-{brain_slices[-1]}, default stopping "
                 f"rules, stops {after.stops}"},
        _encode_batch_row(model, volume, after.precision, quick),
        _channels_last_row(model, volume, after.precision, quick),
    ]


def _four_slices(volume: np.ndarray) -> torch.Tensor:
    """Four axial slices through the brain as the box model's images, (4, 3, 128, 128)."""
    slices = torch.from_numpy(np.ascontiguousarray(volume[:, :, 40:44].transpose(2, 0, 1)))
    return (slices / slices.max())[:, None].expand(4, 3, *slices.shape[1:]).contiguous()


def _encoding(model, images: torch.Tensor, batch: int, precision: str):
    """A step that encodes ``images`` in batches of ``batch``, as propagation does in ``precision``."""
    def run():
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bfloat16"):
            for i in range(0, len(images), batch):
                model.encode(images[i:i + batch])
    return run


def _encode_batch_row(model, volume: np.ndarray, precision: str, quick: bool) -> dict:
    """The box model's encoder on four slices at once against the same four one by one (what
    ``propagate_boxes(encode_batch=4)`` would save), in the precision propagation used."""
    images = _four_slices(volume)
    ms = _median_alternating({"one by one": _encoding(model, images, 1, precision),
                              "batch of 4": _encoding(model, images, 4, precision)}, repeats=1 if quick else 3)
    return _row("box3d", f"LiteMedSAM encoder, 4 slices of 128 x 128: one batch of 4 vs one by one ({precision}, "
                "2 CPU threads)", ms["one by one"], ms["batch of 4"], "ms", None,
                note="why propagate_boxes encodes one slice at a time on a CPU (encode_batch=1)")


def _channels_last_row(model, volume: np.ndarray, precision: str, quick: bool) -> dict:
    """The served box model's encoder (convolution weights channels-last, `BoxModel.build_network`)
    against the same network with contiguous weights, four slices one by one."""
    import copy

    images = _four_slices(volume)
    contiguous = copy.deepcopy(model).to(memory_format=torch.contiguous_format)
    ms = _median_alternating({"contiguous": _encoding(contiguous, images, 1, precision),
                              "channels-last": _encoding(model, images, 1, precision)}, repeats=1 if quick else 5)
    return _row("box3d", f"LiteMedSAM encoder, 4 slices of 128 x 128 one by one: weights contiguous vs "
                f"channels-last, as served ({precision}, 2 CPU threads)", ms["contiguous"], ms["channels-last"],
                "ms", None, note="why the label server builds its box models channels-last")


def bench_demo(quick: bool) -> list[dict]:
    """Peak RSS and wall time of one training epoch of the main command on its demo data."""
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "monai.bundle", "run", "--config_file", "bundles/dka_brats/train.json",
                        "--max_epochs", "1", "--output_dir", tmp], cwd=REPO, check=True, capture_output=True,
                       env=dict(os.environ, PYTHONWARNINGS="ignore"))
        seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return [{"section": "demo", "name": "dka_brats demo: one training epoch + validation (LiteMedSAM)",
             "baseline": None, "ours": round(peak, 1), "unit": "MB peak RSS", "ratio": None, "target": None,
             "pass": None, "note": f"{seconds:.0f} s wall time"}]


def bench_dwconv(quick: bool) -> list[dict]:
    import perf_dwconv

    rows = []
    for r in perf_dwconv.run(quick=quick):
        target = r.get("target")
        rows.append({"section": "dwconv", "name": f"{r['name']} ({r['shape']}, kernel {r['kernel']})",
                     "baseline": r["torch_ms"], "ours": r["medadapt_ms"], "unit": "ms",
                     "ratio": round(r["medadapt_ms"] / r["torch_ms"], 4), "target": f">= {target}x speed-up",
                     "pass": r["pass"], "note": f"{r['speedup']:.1f}x faster"})
    return rows


# The dka_brats model's training step and inference window, timed in a fresh process.
# argv: repeats, the input mapping as JSON.
_BRATS_STEP_CHILD = r"""
import json, resource, sys, time, warnings, torch
warnings.filterwarnings("ignore")
import medadapt
torch.manual_seed(0)
model = medadapt.create_model("segmentation3d", backbone="litemedsam", num_classes=3, in_channels=4, num_slices=4,
                              input_mapping=json.loads(sys.argv[2]), multilabel=True, method="dka",
                              method_options={"bottleneck": 16})
optimizer = torch.optim.AdamW(medadapt.param_groups(model))
x, y = torch.rand(1, 4, 64, 64, 4), (torch.rand(1, 3, 64, 64, 4) > 0.5).float()
window = torch.rand(1, 4, 240, 240, 4)

def train_step():
    optimizer.zero_grad()
    torch.nn.functional.binary_cross_entropy_with_logits(model(x), y).backward()
    optimizer.step()

def infer_window():
    with torch.no_grad():
        model(window)

for fn in (train_step, infer_window):
    model.train(fn is train_step)
    fn()
    times = []
    for _ in range(int(sys.argv[1])):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    print(sorted(times)[len(times) // 2] * 1e3)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
"""


def _brats_step(quick: bool, input_mapping="learned", tuning: str = "1") -> list[float]:
    """[training step ms, inference window ms, peak RSS MB] of the dka_brats model, in a child."""
    out = subprocess.run([sys.executable, "-c", _BRATS_STEP_CHILD, "1" if quick else "3", json.dumps(input_mapping)],
                         capture_output=True, text=True, encoding="utf-8", errors="replace", check=True,
                         env=dict(os.environ, PYTHONWARNINGS="ignore", MEDADAPT_MALLOC_TUNING=tuning))
    return [float(v) for v in out.stdout.split()[-3:]]


def bench_allocator(quick: bool) -> list[dict]:
    """The same work in two processes: glibc's defaults against medadapt's settings."""
    results = {tuning: _brats_step(quick, tuning=tuning) for tuning in ("0", "1")}
    (step0, window0, rss0), (step1, window1, rss1) = results["0"], results["1"]
    what = "LiteMedSAM DKA 3D, 2 CPU threads; glibc defaults vs medadapt's settings"
    return [
        _row("allocator", f"training step, 1 x 4 x 64 x 64 x 4 ({what})", step0, step1, "ms", None,
             note=f"{step0 / step1:.1f}x faster"),
        _row("allocator", f"inference window, 1 x 4 x 240 x 240 x 4 ({what})", window0, window1, "ms", None,
             note=f"{window0 / window1:.1f}x faster"),
        _row("allocator", f"peak RSS of both ({what})", rss0, rss1, "MB", None,
             note="freed memory stays in the process for reuse"),
    ]


def bench_stem(quick: bool) -> list[dict]:
    """BraTS' four sequences into a 3-channel encoder: a learned 1x1 stem (the default) must be
    trained through the whole frozen encoder; passing three of the sequences on needs none of that."""
    learned, select = _brats_step(quick, "learned"), _brats_step(quick, [1, 2, 3])
    what = "dka_brats model, LiteMedSAM DKA 3D, 1 x 4 x 64 x 64 x 4; input_mapping [1, 2, 3] vs 'learned'"
    return [
        _row("stem", f"training step ({what})", learned[0], select[0], "ms", None,
             note=f"{learned[0] / select[0]:.1f}x faster"),
        _row("stem", f"peak RSS of a training step and an inference window ({what})", learned[2], select[2], "MB",
             None, note=f"{learned[2] - select[2]:.0f} MB less"),
    ]


@contextmanager
def _label_server(root: Path, config: dict, *options: str) -> Iterator[str]:
    """A real ``medadapt label`` server on a free loopback port for ``root/studies`` with the
    model ``config``; yields its URL; stopped with its whole process group."""
    import socket

    import requests

    (root / "models.json").write_text(json.dumps(config))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with open(root / "server.log", "w") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "medadapt", "label", "--studies", str(root / "studies"), "--host", "127.0.0.1",
             "--port", str(port), "--runs", str(root / "runs"), "--config", str(root / "models.json"),
             "--bundle-root", str(REPO / "bundles"), *options],
            stdout=log, stderr=subprocess.STDOUT, cwd=root, start_new_session=True)
    http = requests.Session()
    http.trust_env = False
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 300
        while True:
            if server.poll() is not None or time.time() > deadline:
                raise RuntimeError("medadapt label did not start:\n" + (root / "server.log").read_text()[-3000:])
            try:
                if http.get(url + "/info/", timeout=10).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            time.sleep(0.5)
        yield url
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=60)
        finally:
            try:
                os.killpg(server.pid, signal.SIGKILL)  # whatever of the server is left
            except ProcessLookupError:
                pass


def bench_label(quick: bool) -> list[dict]:
    """One 4 x 128 x 128 x 62 volume through a real ``medadapt label`` server: the dka_brats
    model exactly as the server builds it from inference.json for real data. No trained adapters
    are needed for the time (freshly injected ones cost the same); the answer is not judged."""
    import nibabel as nib
    import requests
    from nilearn import datasets

    shape = (128, 128, 62)
    # The server's own processes may still be closing files in the folder when it is removed.
    with tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as tmp:
        root = Path(tmp)
        studies = root / "studies"
        studies.mkdir()
        t1 = datasets.load_mni152_template(resolution=2)
        data = t1.get_fdata().astype(np.float32)
        data /= data.max()
        volume = np.zeros(shape, np.float32)
        z0 = max(0, (data.shape[2] - shape[2]) // 2)
        part = data[:shape[0], :shape[1], z0:z0 + shape[2]]
        volume[:part.shape[0], :part.shape[1], :part.shape[2]] = part
        stacked = np.stack([volume, volume ** 0.8, volume ** 1.2, np.sqrt(volume)], axis=-1)
        nib.save(nib.Nifti1Image(stacked, t1.affine), studies / "volume.nii.gz")
        http = requests.Session()
        http.trust_env = False
        with _label_server(root, {"models": {"dka_brats": {"bundle": "dka_brats"}}}, "--serve-untrained") as url:
            seconds = []
            for _ in range(1 if quick else 2):  # the first request also builds the model
                start = time.perf_counter()
                answer = http.post(url + "/infer/dka_brats", params={"image": "volume", "output": "image"},
                                   timeout=900)
                seconds.append(time.perf_counter() - start)
                if answer.status_code != 200:
                    raise RuntimeError(f"/infer answered {answer.status_code}: {answer.text[:500]}")
    best = min(seconds)
    return [{"section": "label", "name": "one 4 x 128 x 128 x 62 volume through medadapt label (dka_brats, real-data "
             "settings), POST /infer to the label file", "baseline": None, "ours": round(best, 1), "unit": "s",
             "ratio": None, "target": "< 60", "pass": best < 60,
             "note": "first request " + f"{seconds[0]:.0f} s (builds the model)" if len(seconds) > 1 else ""}]


def bench_label_load(quick: bool) -> list[dict]:
    """100 clients against a real ``medadapt label`` server on the loopback for 60 s (20 s with
    --quick), `medadapt.monailabel.loadtest`: 80 well-behaved ones (``/info/``, the datastore,
    image downloads, inferences of two small bundle models on a PNG), 20 idle, slow-head and
    slow-body ones. The suite runs the same for 25 s (tests/test_monailabel_clients.py)."""
    from nilearn import datasets
    from PIL import Image

    from medadapt.monailabel.loadtest import run

    seconds = 20 if quick else 60
    tiny = {"backbone": "timm:convnext_atto", "backbone_options": {"depths": [1, 1, 1, 1], "dims": [8, 16, 24, 32]},
            "method_options": {"bottleneck": 4}, "image_size": 64}
    config = {"models": {"seg": {"bundle": "dka_busi_seg", "overrides": tiny},
                         "cls": {"bundle": "dka_busi_cls", "overrides": tiny}}}
    with tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as tmp:
        root = Path(tmp)
        (root / "studies").mkdir()
        t1 = datasets.load_mni152_template(resolution=2).get_fdata()[:, :, 50].T[::-1]
        Image.fromarray((255 * t1 / t1.max()).astype(np.uint8)).save(root / "studies" / "slice.png")
        with _label_server(root, config, "--serve-untrained") as url:
            summary = run(url, "slice", ["seg", "cls"], clients=100, seconds=seconds)
    (RESULTS / "label_load.json").write_text(json.dumps(summary, indent=1))
    what = f"100 clients (80 well-behaved, 20 idle or slow) for {seconds} s"
    share = 100 * summary["answered"] / max(summary["requests"], 1)
    kinds = summary["by_kind"]
    held = summary["misbehaving_held"]
    infer = kinds["infer"]["statuses"]
    return [
        {"section": "label_load", "name": f"{what}: well-behaved requests answered", "baseline": None,
         "ours": round(share, 2), "unit": "%", "ratio": None, "target": "= 100", "pass": share == 100,
         "note": f"{summary['answered']} of {summary['requests']}; statuses {summary['statuses']}; every 429/503 "
                 f"with Retry-After: {summary['busy_without_retry_after'] == 0}"},
        {"section": "label_load", "name": f"{what}: p95 latency of GET /info/", "baseline": None,
         "ours": kinds["info"]["p95_ms"], "unit": "ms", "ratio": None, "target": "< 1000",
         "pass": (kinds["info"]["p95_ms"] or 1e9) < 1000,
         "note": f"p50 {kinds['info']['p50_ms']} ms, max {kinds['info']['max_ms']} ms; datastore p95 "
                 f"{kinds['datastore']['p95_ms']} ms, image p95 {kinds['image']['p95_ms']} ms"},
        {"section": "label_load", "name": f"{what}: p95 latency of an inference (small models)", "baseline": None,
         "ours": kinds["infer"]["p95_ms"], "unit": "ms", "ratio": None, "target": None, "pass": None,
         "note": f"{infer.get('200', 0)} run, {infer.get('429', 0)} told to come back (429 + Retry-After)"},
        {"section": "label_load", "name": f"{what}: longest an idle / slow-head / slow-body connection was kept",
         "baseline": None, "ours": max(h["max_s"] or 0 for h in held.values()), "unit": "s", "ratio": None,
         "target": "<= 15", "pass": max(h["max_s"] or 0 for h in held.values()) <= 15,
         "note": ", ".join(f"{how} {h['connections']} connections, max {h['max_s']} s" for how, h in held.items())},
    ]


SECTIONS = {"dwconv": bench_dwconv, "step": bench_step, "memory": bench_memory, "cache": bench_cache,
            "window": bench_window, "demo": bench_demo,
            "allocator": bench_allocator, "stem": bench_stem, "label": bench_label,
            "label_load": bench_label_load, "box3d": bench_box3d}


def to_markdown(rows: list[dict]) -> str:
    lines = ["| section | comparison | baseline | medadapt | unit | ratio | target | pass | note |",
             "|---|---|---:|---:|---|---:|---|---|---|"]
    for r in rows:
        passed = "" if r["pass"] is None else ("yes" if r["pass"] else "NO")
        cells = [r["section"], r["name"], r["baseline"], r["ours"], r["unit"], r["ratio"], r["target"] or "",
                 passed, r.get("note", "")]
        lines.append("| " + " | ".join("" if c is None else str(c) for c in cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer repeats and smaller inputs")
    parser.add_argument("--only", nargs="*", choices=sorted(SECTIONS), help="run only these sections")
    parser.add_argument("--out", type=Path, default=RESULTS, help=f"folder for the tables (default {RESULTS})")
    args = parser.parse_args(argv)
    rows = []
    for name in args.only or list(SECTIONS):
        print(f"== {name}", flush=True)
        section_rows = SECTIONS[name](args.quick)
        for r in section_rows:
            print(f"   {r['name']}: {r['ours']} {r['unit']} (ratio {r['ratio']}, target {r['target']})", flush=True)
        rows += section_rows
    args.out.mkdir(parents=True, exist_ok=True)
    header = (f"torch {torch.__version__}, {torch.get_num_threads()} threads, command: "
              f"`python benchmarks/run.py{' --quick' if args.quick else ''}"
              f"{' --only ' + ' '.join(args.only) if args.only else ''}`\n\n")
    suffix = "" if not args.only else "_" + "_".join(args.only)
    (args.out / f"perf{suffix}.md").write_text(header + to_markdown(rows) + "\n")
    (args.out / f"perf{suffix}.json").write_text(json.dumps(rows, indent=1))
    print(to_markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
