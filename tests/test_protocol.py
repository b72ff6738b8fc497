"""``medadapt bench protocol``: the methods x fractions x folds table, resuming, iso-params, errors.

Everything runs on the embedded BUSI demo (a few images, 32 px) with tiny timm backbones.
"""

from __future__ import annotations

import csv
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from fixtures_data import bundle_transforms

from medadapt.protocol import runner
from medadapt.protocol.runner import run_protocol

TINY_CONVNEXT = {"depths": [1, 1, 1, 1], "dims": [8, 16, 24, 32]}
TINY_VIT = {"img_size": 32, "depth": 2, "embed_dim": 32, "num_heads": 2}
SMALL = dict(dataset="busi", task="classification", backbone="timm:convnext_atto", backbone_options=TINY_CONVNEXT,
             image_size=32, epochs=1, batch_size=4, demo_options={"per_class": 4}, progress=False,
             echo=lambda message: None)

warnings.filterwarnings("ignore", message=".*NOT pretrained.*")


class Spy:
    """Counts calls of runner.run_cell and passes them through."""

    def __init__(self):
        self.calls = []
        self.real = runner.run_cell

    def __call__(self, cell):
        self.calls.append((cell["record"]["method"], cell["record"]["train_count"]))
        return self.real(cell)


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("protocol_demo")


def _grid(out, demo_dir, **overrides):
    kwargs = {**SMALL, "methods": ["dka", "linear"], "fractions": [0.0063, 1.0], "folds": 2, "out": str(out),
              "demo_dir": str(demo_dir)}
    kwargs.update(overrides)
    return run_protocol(**kwargs)


def test_table_has_every_cell_and_a_rerun_skips_finished_cells(tmp_path, demo_dir, monkeypatch):
    out = tmp_path / "run"
    spy = Spy()
    monkeypatch.setattr(runner, "run_cell", spy)
    table = _grid(out, demo_dir)

    # 2 methods x 2 fractions x 2 folds, each trained once.
    assert len(spy.calls) == 8
    assert len(table.ran) == 8 and table.skipped == []
    assert [(r["method"], r["fraction"]) for r in table] == [("dka", 0.0063), ("dka", 1.0),
                                                            ("linear", 0.0063), ("linear", 1.0)]
    splits = json.loads((out / "splits.json").read_text(encoding="utf-8"))
    pool = splits["counts"]["pool"]
    assert splits["counts"]["test"] == 3 and splits["counts"]["val"] == 3 and pool == 6
    for row in table:
        assert row["folds_done"] == 2
        assert 0.0 <= row["accuracy"] <= 1.0 and 0.0 <= row["balanced_accuracy"] <= 1.0
        assert row["accuracy_std"] is not None and len(row["accuracy_folds"]) == 2
        # 0.63 % of 6 images rounds to 0 per class: bumped to one image per class.
        expected = 3 if row["fraction"] < 1 else pool
        assert row["train_counts"] == [expected, expected]
        assert row["count"] == f"{expected} images"
        assert row["trainable"] > 0
    dka, linear = table[0], table[2]
    # ViT-Tiny is 192 wide: 16/768 of it is 4, raised to the narrowest bottleneck, 8
    assert dka["trainable"] > linear["trainable"] and dka["size_option"] == "bottleneck" and dka["size"] == 8
    assert linear["size"] is None

    # Markdown, CSV and JSON on disk; the Markdown has the count next to the percentage.
    markdown = (out / "protocol.md").read_text(encoding="utf-8")
    assert "| 0.63 % (3 images) | 100 % (6 images) |" in markdown
    assert f"{dka['trainable']:,}" in markdown and "Balanced accuracy" in markdown
    assert markdown == table.markdown
    with open(out / "protocol.csv", newline="") as handle:
        lines = list(csv.DictReader(handle))
    assert [(r["method"], float(r["fraction"]), r["count"]) for r in lines] == [
        ("dka", 0.0063, "3 images"), ("dka", 1.0, "6 images"), ("linear", 0.0063, "3 images"), ("linear", 1.0, "6 images")]
    assert abs(float(lines[0]["accuracy"]) - table[0]["accuracy"]) < 1e-5
    cells = sorted(p.name for p in (out / "cells").glob("*.json"))
    assert len(cells) == 8 and "dka__0.0063__fold1.json" in cells
    # Each cell keeps its best adapters, and only them (no full model, no training state).
    kept = sorted(p.name for p in (out / "cells" / "dka__0.0063__fold1").iterdir())
    assert "adapters" in kept and "checkpoints" not in kept
    stamps = {p.name: p.stat().st_mtime_ns for p in (out / "cells").glob("*.json")}

    # The same command again: nothing is trained, the table is rebuilt from the stored cells.
    messages = []
    table2 = _grid(out, demo_dir, echo=messages.append)
    assert len(spy.calls) == 8
    assert table2.ran == [] and len(table2.skipped) == 8
    assert sum("skipping finished cell" in m for m in messages) == 8
    assert [r["accuracy"] for r in table2] == [r["accuracy"] for r in table]
    assert {p.name: p.stat().st_mtime_ns for p in (out / "cells").glob("*.json")} == stamps

    # One more fold: only its 4 cells run.
    table3 = _grid(out, demo_dir, folds=3)
    assert len(spy.calls) == 12 and len(table3.ran) == 4 and len(table3.skipped) == 8
    assert all(ident.endswith("fold2") for ident in table3.ran)
    assert all(r["folds_done"] == 3 for r in table3)

    # A cell file that cannot be read (torn by a full disk, edited) is run again, not a crash.
    (out / "cells" / "dka__1__fold2.json").write_text("{", encoding="utf-8")
    table4 = _grid(out, demo_dir, folds=3)
    assert len(spy.calls) == 13 and table4.ran == ["dka__1__fold2"]

    # Other settings in the same folder: an error naming what differs, unless --overwrite.
    with pytest.raises(ValueError, match=r"--out.*epochs.*--overwrite"):
        _grid(out, demo_dir, epochs=2)
    assert len(spy.calls) == 13


def test_segmentation_cells_report_dice(tmp_path, demo_dir):
    table = _grid(tmp_path / "seg", demo_dir, task="segmentation", methods=["linear"], fractions=[1.0], folds=1)
    (row,) = table
    assert 0.0 <= row["dice"] <= 1.0
    assert "Dice (%)" in table.markdown
    cell = json.loads(next((tmp_path / "seg" / "cells").glob("*.json")).read_text(encoding="utf-8"))
    assert cell["metrics"]["dice"] == cell["metrics"]["bundle"]["test_mean_dice"]
    assert "val_mean_dice" in cell["metrics"]["bundle"]  # the checkpoint was chosen on the validation set


def test_a_cell_is_the_bundle_run_with_its_overrides(tmp_path, demo_dir):
    """The protocol trains nothing itself: the bundle run as a user runs it, with the overrides
    the cell records, gives the same adapter tensors."""
    import subprocess
    import sys

    from safetensors.torch import load_file

    _grid(tmp_path / "cell", demo_dir, methods=["dka"], fractions=[1.0], folds=1)
    cell = json.loads((tmp_path / "cell" / "cells" / "dka__1__fold0.json").read_text(encoding="utf-8"))
    bundle = Path(cell["settings"]["bundle"])
    args = []
    for key, value in cell["overrides"].items():
        args += [f"--{key}", repr(value) if isinstance(value, (dict, list)) else str(value)]
    out = tmp_path / "direct"
    subprocess.run([sys.executable, "-m", "monai.bundle", "run", "--config_file", str(bundle / "train.json"), *args,
                    "--output_dir", str(out)], check=True, capture_output=True, timeout=600,
                   env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    ours = {p.name: load_file(p) for p in Path(cell["adapters"]).glob("*.safetensors")}
    theirs = {p.name: load_file(p) for p in (out / "models" / "best_adapters").glob("*.safetensors")}
    assert ours.keys() == theirs.keys() and ours
    for name in ours:
        assert ours[name].keys() == theirs[name].keys()
        for key in ours[name]:
            torch.testing.assert_close(ours[name][key], theirs[name][key], rtol=0, atol=0, msg=key)


def test_iso_params_picks_the_size_closest_to_the_budget(tmp_path, demo_dir):
    from medadapt.injection import count_parameters
    from medadapt.models import create_model

    budget = 40_000
    table = _grid(tmp_path / "iso", demo_dir, methods=["dka", "lora", "linear"], fractions=[1.0], folds=1,
                  backbone="timm:vit_tiny_patch16_224", backbone_options=TINY_VIT, iso_params=budget)
    rows = {r["method"]: r for r in table}

    def trainable(method, size):
        option = {"dka": "bottleneck", "lora": "rank"}[method]
        torch.manual_seed(0)
        model = create_model("classification", backbone="timm:vit_tiny_patch16_224", backbone_options=TINY_VIT,
                             num_classes=3, in_channels=3, method=method, method_options={option: size})
        return count_parameters(model)["trainable"]

    for method, option in (("dka", "bottleneck"), ("lora", "rank")):
        row = rows[method]
        assert row["size_option"] == option
        size = row["size"]
        # The runner's count is what create_model builds, and no neighbouring size is closer.
        assert row["trainable"] == trainable(method, size)
        assert abs(row["trainable"] - budget) <= abs(trainable(method, size + 1) - budget)
        if size > 1:
            assert abs(row["trainable"] - budget) <= abs(trainable(method, size - 1) - budget)
        slope = trainable(method, size + 1) - row["trainable"]
        assert abs(row["trainable"] - budget) <= slope / 2 + 1
    assert rows["dka"]["size"] != 16 and rows["lora"]["size"] != 8  # moved off the defaults
    assert rows["linear"]["size"] is None
    stored = json.loads((tmp_path / "iso" / "protocol.json").read_text(encoding="utf-8"))
    assert stored["methods"]["dka"]["options"]["bottleneck"] == rows["dka"]["size"]
    assert stored["settings"]["iso_params"] == budget


@pytest.mark.parametrize(
    "overrides, option",
    [
        ({"fractions": [0.0]}, "--fractions"),
        ({"fractions": [0.5, 1.5]}, "--fractions"),
        ({"fractions": [0.5, 0.5]}, "--fractions"),
        ({"methods": ["dka", "nosuchmethod"]}, "--methods"),
        ({"folds": 0}, "--folds"),
        ({"iso_params": 0}, "--iso-params"),
        ({"dataset": "nosuchdata"}, "--dataset"),
        ({"task": "detection"}, "--task"),
        ({"method_options": {"lora": {"rank": 4}}}, "--method-option"),
    ],
)
def test_bad_options_name_the_option(tmp_path, overrides, option):
    with pytest.raises(ValueError, match=option):
        _grid(tmp_path / "bad", tmp_path / "demo", **overrides)
    assert not (tmp_path / "demo").exists()  # rejected before any data is built


def test_cli_reports_bad_options_and_runs_a_grid(tmp_path, demo_dir, capsys):
    from medadapt.cli import main

    assert main(["bench", "protocol", "--fractions", "0", "--out", str(tmp_path / "x")]) == 2
    assert "--fractions" in capsys.readouterr().err
    assert main(["bench", "protocol", "--methods", "dka", "magic", "--out", str(tmp_path / "x")]) == 2
    assert "--methods" in capsys.readouterr().err

    args = ["bench", "protocol", "--dataset", "busi", "--methods", "linear", "--fractions", "1.0", "--folds", "1",
            "--epochs", "1", "--image-size", "32", "--backbone", "timm:convnext_atto", "--backbone-option",
            "depths=[1,1,1,1]", "--backbone-option", "dims=[8,16,24,32]", "--demo-option", "per_class=4",
            "--demo-dir", str(demo_dir), "--out", str(tmp_path / "cli"), "--no-progress"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "| 100 % (6 images) |" in printed and "1 run, 0 skipped" in printed
    assert main(args) == 0
    assert "0 run, 1 skipped" in capsys.readouterr().out
    assert (tmp_path / "cli" / "protocol.csv").is_file()


def test_bench_group_is_extensible(capsys):
    from medadapt.cli import build_parser
    from medadapt.protocol import cli

    def configure(parser):
        parser.add_argument("--n", type=int, default=1)
        parser.set_defaults(func=lambda args: print(f"sweep {args.n}") or 0)

    saved = list(cli.BENCH_COMMANDS)
    try:
        cli.add_bench_command("erf-sweep", "ERF area ratios per kernel size", configure)
        args = build_parser().parse_args(["bench", "erf-sweep", "--n", "3"])
        assert args.func(args) == 0
        assert "sweep 3" in capsys.readouterr().out
        args = build_parser().parse_args(["bench", "protocol", "--folds", "2"])
        assert args.folds == 2 and args.func is cli.run_protocol_command
    finally:
        cli.BENCH_COMMANDS[:] = saved


def test_bench_perf_hands_its_options_to_the_repository_benchmarks(tmp_path, capfd):
    # Every real section takes minutes; a section name benchmarks/run.py does not know shows
    # that the command found the runner and passed the options on, and that nothing was written.
    from medadapt.cli import main

    assert main(["bench", "perf", "--quick", "--only", "nonsense", "--out", str(tmp_path / "out")]) == 2
    err = capfd.readouterr().err
    assert "invalid choice: 'nonsense'" in err and "'dwconv'" in err and "'stem'" in err
    assert not (tmp_path / "out").exists()


def test_mni152_tissue_keeps_train_and_test_apart_in_z(tmp_path):
    from medadapt.data import get_dataset
    from medadapt.datasets import mni152

    preset = get_dataset("mni152_tissue")
    root = preset.make_demo(tmp_path)
    datalist = preset.datalist(root)
    splits = runner.make_run_splits(preset, "segmentation", datalist, root, [0.05, 0.2], 2, 0, 0.2, 0.1)
    z_of = {e["case"]: e["z"] for e in datalist}
    test_z = sorted(z_of[e["case"]] for e in splits["test"])
    assert len(test_z) == mni152.TEST_SLICES and test_z == list(range(test_z[0], test_z[0] + mni152.TEST_SLICES))
    for entry in splits["val"] + [e for r in splits["fractions"] for f in r["folds"] for e in f["train"]]:
        assert min(abs(z_of[entry["case"]] - z) for z in test_z) > mni152.GAP_SLICES
    val = {e["case"] for e in splits["val"]}
    counts = {r["fraction"]: [f["count"] for f in r["folds"]] for r in splits["fractions"]}
    assert val and all(c == [round(f * (splits["counts"]["pool"])) or 1] * 2 for f, c in counts.items())
    # Folds draw different slices, none of them validation slices.
    folds = splits["fractions"][0]["folds"]
    assert {e["case"] for e in folds[0]["train"]}.isdisjoint(e["case"] for e in folds[1]["train"])
    assert not val & {e["case"] for f in folds for e in f["train"]}
    sample = bundle_transforms("dka_mni152_tissue", image_size=64)(datalist[0])
    assert tuple(sample["image"].shape) == (3, 64, 64) and tuple(sample["label"].shape) == (1, 64, 64)
    assert set(torch.unique(sample["label"]).tolist()) == {0.0, 1.0, 2.0}


def test_mni152_tissue_runs_a_cell_with_dice_per_tissue(tmp_path):
    table = run_protocol(**{**SMALL, "dataset": "mni152_tissue", "task": None, "demo_options": None},
                         methods=["linear"], fractions=[0.2], folds=1, steps=2, out=str(tmp_path / "mni"))
    (row,) = table
    assert row["count"].endswith(" slices") and 0.0 <= row["dice"] <= 1.0
    cell = json.loads(next((tmp_path / "mni" / "cells").glob("*.json")).read_text(encoding="utf-8"))
    assert cell["overrides"]["train#trainer#epoch_length"] == 1 and cell["overrides"]["max_epochs"] == 2


def test_mni152_tissue_3d_stacks_are_the_slices_and_stay_apart_in_z(tmp_path):
    from PIL import Image

    from medadapt.data import get_dataset
    from medadapt.datasets import mni152

    preset = get_dataset("mni152_tissue_3d")
    root = preset.make_demo(tmp_path)
    stacks = preset.datalist(root)
    slices = get_dataset("mni152_tissue").datalist(root)
    zone_of = {e["z"]: e["zone"] for e in slices}
    test_z = sorted(z for z, zone in zone_of.items() if zone == "test")
    assert [e["z"] for e in stacks if e["zone"] == "test"] == test_z[::mni152.STACK_SLICES]
    for entry in stacks:
        planes = range(entry["z"], entry["z"] + mni152.STACK_SLICES)
        # A stack never spans a gap or a zone boundary.
        assert all(zone_of.get(z) == entry["zone"] for z in planes)
        if entry["zone"] == "pool":
            assert min(abs(z - t) for z in planes for t in test_z) > mni152.GAP_SLICES
    # The stack holds exactly the slices' pixels, plane by plane.
    import nibabel as nib

    first = stacks[0]
    volume = np.asarray(nib.load(first["image"]).dataobj)
    labels = np.asarray(nib.load(first["label"]).dataobj)
    for k, z in enumerate(range(first["z"], first["z"] + mni152.STACK_SLICES)):
        assert np.array_equal(volume[..., k], np.asarray(Image.open(Path(root) / "images" / f"z{z:02d}.png")))
        assert np.array_equal(labels[..., k], np.asarray(Image.open(Path(root) / "labels" / f"z{z:02d}.png")))
    sample = bundle_transforms("dka_mni152_tissue_3d", "train", image_size=32)(stacks[0])
    assert tuple(sample["image"].shape) == (3, 32, 32, mni152.STACK_SLICES)
    assert tuple(sample["label"].shape) == (1, 32, 32, mni152.STACK_SLICES)


def test_mni152_tissue_3d_runs_a_cell_with_3d_adapters(tmp_path):
    from medadapt.checkpoint import read_adapter_config

    tiny = {"img_size": 32, "depth": 2, "embed_dim": 32, "num_heads": 2}
    table = run_protocol(dataset="mni152_tissue_3d", backbone="timm:vit_tiny_patch16_224", backbone_options=tiny,
                         image_size=32, methods=["dka"], fractions=[0.2], folds=1, steps=2, batch_size=1,
                         out=str(tmp_path / "out"), demo_dir=str(tmp_path), progress=False, echo=lambda m: None)
    (row,) = table
    assert row["count"].endswith(" stacks") and 0.0 <= row["dice"] <= 1.0
    cell = json.loads(next((tmp_path / "out" / "cells").glob("*.json")).read_text(encoding="utf-8"))
    options = read_adapter_config(cell["adapters"])["options"]
    # 3D kernels over the stack of 4 slices.
    assert options["spatial_dims"] == 3 and options["num_slices"] == 4
    assert cell["settings"]["method_options"]["spatial_dims"] == 3


def _adapter_tensors(out: Path) -> dict:
    from safetensors.torch import load_file

    return {p.parent.parent.name: load_file(p) for p in (out / "cells").glob("*/adapters/*.safetensors")}


@pytest.mark.slow
def test_ray_runs_the_same_cells_as_a_serial_run(tmp_path, demo_dir):
    pytest.importorskip("ray")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the serial run computes as each one-CPU Ray task does
    try:
        serial = _grid(tmp_path / "serial", demo_dir, methods=["dka", "linear"], fractions=[1.0], folds=2)
    finally:
        torch.set_num_threads(threads)
    on_ray = _grid(tmp_path / "ray", demo_dir, methods=["dka", "linear"], fractions=[1.0], folds=2, ray="local")
    assert sorted(on_ray.ran) == sorted(serial.ran) and len(on_ray.ran) == 4
    assert [r["accuracy_folds"] for r in on_ray] == [r["accuracy_folds"] for r in serial]
    ours, theirs = _adapter_tensors(tmp_path / "serial"), _adapter_tensors(tmp_path / "ray")
    assert ours.keys() == theirs.keys() and len(ours) == 4
    for cell in ours:
        for key in ours[cell]:
            torch.testing.assert_close(theirs[cell][key], ours[cell][key], rtol=0, atol=0, msg=f"{cell} {key}")
    # A second run (a driver killed and started again) finds every cell finished.
    again = _grid(tmp_path / "ray", demo_dir, methods=["dka", "linear"], fractions=[1.0], folds=2, ray="local")
    assert again.ran == [] and len(again.skipped) == 4


@pytest.mark.slow
def test_a_killed_ray_worker_is_retried(tmp_path, demo_dir):
    """The driver runs in a process of its own; a worker is killed mid-cell and Ray runs the
    cell again, so the table is complete."""
    pytest.importorskip("ray")
    import os
    import signal
    import subprocess
    import sys
    import time

    import psutil

    out = tmp_path / "killed"
    code = ("from medadapt.protocol.runner import run_protocol; import json, sys; "
            "kwargs = json.loads(sys.argv[1]); run_protocol(**kwargs, echo=print)")
    kwargs = {k: v for k, v in SMALL.items() if k != "echo"}
    kwargs.update(methods=["dka"], fractions=[1.0], folds=2, out=str(out), demo_dir=str(demo_dir), ray="local",
                  epochs=3)
    driver = subprocess.Popen([sys.executable, "-c", code, json.dumps(kwargs)], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, encoding="utf-8", errors="replace", start_new_session=True)
    killed = None
    deadline = time.time() + 240
    while killed is None and time.time() < deadline and driver.poll() is None:
        for proc in psutil.process_iter(["cmdline"]):
            if any("run_cell" in part for part in (proc.info["cmdline"] or [])):
                os.kill(proc.pid, signal.SIGKILL)
                killed = proc.pid
                break
        time.sleep(0.2)
    output, _ = driver.communicate(timeout=600)
    assert killed is not None, "no Ray worker was seen running a cell"
    assert driver.returncode == 0, output[-3000:]
    assert len(list((out / "cells").glob("*.json"))) == 2


def test_rows_sized_to_another_and_from_scratch_with_intervals_and_paired_tests(tmp_path, demo_dir):
    from scipy import stats

    from medadapt.protocol.report import confidence_interval

    out = tmp_path / "rows"
    table = _grid(out, demo_dir, dataset="mni152_tissue", task=None, demo_options=None,
                  methods=["dka", "lka@iso:dka", "unet"], fractions=[0.2], folds=2)
    rows = {r["method"]: r for r in table}
    # LKA sized to DKA: the closest trainable count there is
    assert abs(rows["lka@iso:dka"]["trainable"] - rows["dka"]["trainable"]) < 0.05 * rows["dka"]["trainable"]
    # a MONAI U-Net from scratch, trained by the same bundle recipe: all of it trains
    assert rows["unet"]["trainable"] == rows["unet"]["total"] > 0
    unet_cell = json.loads(next((out / "cells").glob("unet__*fold0.json")).read_text(encoding="utf-8"))
    assert unet_cell["overrides"]["network_def"]["_target_"] == "monai.networks.nets.UNet"
    assert unet_cell["adapters"] is None and (out / "cells" / "unet__0.2__fold0" / "model.pt").is_file()
    # each fold its own seed, so repeats of the same images still differ
    seeds = [json.loads(p.read_text(encoding="utf-8"))["overrides"]["seed"]
             for p in sorted((out / "cells").glob("dka__*.json"))]
    assert seeds == [0, 1]
    # the intervals and paired tests are Student's t over folds, as scipy computes them
    values = rows["dka"]["dice_folds"]
    low, high = stats.t.interval(0.95, len(values) - 1, loc=np.mean(values), scale=stats.sem(values))
    assert np.allclose(confidence_interval(values), (low, high)) and np.allclose(rows["dka"]["dice_ci"], (low, high))
    other = rows["unet"]["dice_folds"]
    p_value = stats.ttest_rel(values, other).pvalue
    markdown = (out / "protocol.md").read_text(encoding="utf-8")
    assert "DKA minus each method" in markdown and f"p = {p_value:.3g}" in markdown
    assert "U-Net from scratch (MONAI)" in markdown and "as many parameters as DKA" in markdown
    assert (out / "protocol.png").stat().st_size > 1000


def test_unknown_rows_are_named():
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        run_protocol(**{**SMALL, "methods": ["dka", "nope"]})
    with pytest.raises(ValueError, match="'adapter@iso:lka' is sized to 'lka', which is not another row"):
        run_protocol(**{**SMALL, "methods": ["dka", "adapter@iso:lka"]})


def test_proportion_intervals_are_exact_clopper_pearson():
    from scipy.stats import binomtest

    from medadapt.stats import proportion_interval, proportion_text

    for successes, total in [(6, 6), (0, 6), (3, 6), (17, 20), (1, 1)]:
        expected = binomtest(successes, total).proportion_ci(confidence_level=0.95, method="exact")
        assert np.allclose(proportion_interval(successes, total), (expected.low, expected.high))
    assert proportion_text(6, 6) == "6 of 6 (100 %; 95 % CI 54-100 %)"
    with pytest.raises(ValueError, match="7 of 6"):
        proportion_interval(7, 6)


def test_evaluation_of_a_network_trained_from_scratch_loads_its_best_weights(tmp_path):
    """A scratch network has no adapter folder: every bundle's evaluate.json gives it the best
    model.pt the training wrote, instead of scoring its random initial weights."""
    from monai.networks.nets import UNet

    from medadapt.bundles import ROOT, names
    from medadapt.engine.handlers import load_best_model

    make = lambda: UNet(spatial_dims=2, in_channels=1, out_channels=2, channels=(4, 8), strides=(2,))  # noqa: E731
    trained, fresh = make(), make()
    torch.save(trained.state_dict(), tmp_path / "model.pt")
    load_best_model(fresh, tmp_path)
    for (name, a), b in zip(trained.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), name
    with pytest.raises(FileNotFoundError, match="model.pt"):
        load_best_model(make(), tmp_path / "elsewhere")
    for bundle in names():
        config = json.loads((ROOT / bundle / "evaluate.json").read_text(encoding="utf-8"))
        assert "$medadapt.engine.handlers.load_best_model(@network, @ckpt_dir)" in config["initialize"], bundle


def test_records_show_paths_relative_to_the_working_folder(tmp_path, monkeypatch):
    """Committed records of a run inside a repository compare and rerun the same in every clone."""
    monkeypatch.chdir(tmp_path)
    assert runner.shown_path(tmp_path / "evidence" / "splits.json") == str(Path("evidence") / "splits.json")
    assert runner.shown_path("evidence/splits.json") == str(Path("evidence") / "splits.json")
    outside = tmp_path.parent / "elsewhere" / "splits.json"
    assert runner.shown_path(outside) == str(outside.resolve())


def test_evidence_summary_gathers_the_tables_and_states_the_erf_deviation(tmp_path):
    from medadapt.protocol.evidence import PARTS, summary

    (tmp_path / PARTS["2d"].dataset).mkdir()
    (tmp_path / PARTS["2d"].dataset / "protocol.md").write_text("| DKA | 58.20 |\n", encoding="utf-8")
    ratios = {"dka (2 slices)": {"0.2": {"side": 21, "area_ratio": 0.1}}}
    (tmp_path / "erf.json").write_text(json.dumps({"0.05": {"figure": str(tmp_path / "erf_0.05.png"),
                                                            "ratios": ratios, "images": 51, "image_size": 64}}))
    text = summary(tmp_path)
    assert text == (tmp_path / "evidence.md").read_text(encoding="utf-8")
    assert "## 2D: mni152_tissue" in text and "| DKA | 58.20 |" in text and "## 3D" not in text
    # RepLKNet's recipe is ~50 images at 1024 px: a smaller input is said, with the size used
    assert "1024 px" in text and "(51) at the 64 px" in text and "![ERF](erf_0.05.png)" in text


def test_training_counts_read_as_english():
    from medadapt.protocol.report import count_label

    assert count_label([1, 1, 1], "stacks") == "1 stack"
    assert count_label([2, 2], "slices") == "2 slices" and count_label([5, 6], "imgs") == "5-6 imgs"
    assert count_label([], "slices") == "? slices"
