"""A training killed with SIGKILL resumes and ends as an uninterrupted run of the same seed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_bundles import REPO, SMALL_DEMO, TINY, run_bundle

from medadapt.checkpoint import WEIGHTS_NAME

BUNDLE = "dka_busi_cls"
ARGS = [*TINY, "--demo_options", SMALL_DEMO[BUNDLE], "--image_size", "64", "--max_epochs", "4"]


def _adapters(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "models" / "adapters" / WEIGHTS_NAME))


@pytest.mark.slow
def test_killed_training_resumes_to_the_same_result(tmp_path):
    reference = tmp_path / "reference"
    run_bundle(f"bundles/{BUNDLE}/train.json", *ARGS, "--output_dir", str(reference))

    out = tmp_path / "killed"
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", f"bundles/{BUNDLE}/train.json",
           *ARGS, "--output_dir", str(out)]
    process = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    state = out / "models" / "training_state.pt"
    deadline = time.time() + 300
    # Kill as soon as the first epoch's checkpoint exists: the process is then inside epoch 2.
    while not state.exists() and time.time() < deadline and process.poll() is None:
        time.sleep(0.05)
    assert process.poll() is None, "training finished before it could be killed"
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    saved_epoch = torch.load(state, weights_only=True)["epoch"]
    assert 1 <= saved_epoch < 4
    # Nothing half-written: the kill may land inside a save, whose unfinished file then stays
    # in a hidden temporary folder; every file under its own name is complete.
    for path in (out / "models").rglob("*"):
        if path.is_file() and not any(part.startswith(".") for part in path.relative_to(out).parts):
            if path.suffix == ".pt":
                torch.load(path, weights_only=True)
            elif path.suffix == ".safetensors":
                load_file(str(path))

    # As if the kill had landed inside a save of a file the resumed run may not write again.
    from medadapt.io import _host

    (out / "models" / f".model.pt.tmp-{process.pid}-0123abcd-{_host()}").mkdir()

    run_bundle(f"bundles/{BUNDLE}/train.json", *ARGS, "--output_dir", str(out), "--resume", "True")
    assert torch.load(state, weights_only=True)["epoch"] == 4
    # The resumed run clears what the killed one left mid-save.
    assert not list((out / "models").rglob(".*.tmp-*"))
    expected, resumed = _adapters(reference), _adapters(out)
    assert expected.keys() == resumed.keys()
    for name in expected:
        torch.testing.assert_close(resumed[name], expected[name], rtol=1e-5, atol=1e-6, msg=name)
    ref_metrics = json.loads((reference / "metrics.json").read_text(encoding="utf-8"))
    new_metrics = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    ref_history, new_history = ref_metrics.pop("history"), new_metrics.pop("history")
    assert new_metrics.pop("run") == ref_metrics.pop("run")  # same settings and data, recorded once
    assert new_metrics == pytest.approx(ref_metrics, abs=1e-6)
    assert len(new_history) == len(ref_history)
    for new_entry, ref_entry in zip(new_history, ref_history):
        assert new_entry == pytest.approx(ref_entry, abs=1e-6)


@pytest.mark.slow
def test_resume_keeps_the_best_score_and_refuses_other_settings(tmp_path):
    out = tmp_path / "run"
    args = [*TINY, "--demo_options", SMALL_DEMO[BUNDLE], "--image_size", "64", "--output_dir", str(out)]
    run_bundle(f"bundles/{BUNDLE}/train.json", *args, "--max_epochs", "2")
    best = out / "models" / "best_adapters" / WEIGHTS_NAME
    best_bytes = best.read_bytes()
    splits = (out / "splits.json").read_bytes()

    # Another fraction, fold or method options: refused before anything is written.
    for option, value, name in (("--fraction", "0.5", "fraction"), ("--fold", "1", "fold"),
                                ("--method_options", "{'bottleneck': 8}", "method_options")):
        result = run_bundle(f"bundles/{BUNDLE}/train.json", *args, "--max_epochs", "3", "--resume", "True",
                            option, value, check=False)
        assert result.returncode != 0 and "--resume True" in result.stderr and name in result.stderr, result.stderr
        assert (out / "splits.json").read_bytes() == splits

    # The best score so far comes back with the state: a resumed epoch that does not beat it
    # leaves the best files alone (here the stored best is made unbeatable).
    state_path = out / "models" / "training_state.pt"
    state = torch.load(state_path, weights_only=True)
    assert state["extra"]["best"]["best_epoch"] in (1, 2)
    state["extra"]["best"]["best"] = 2.0
    torch.save(state, state_path)
    run_bundle(f"bundles/{BUNDLE}/train.json", *args, "--max_epochs", "3", "--resume", "True")
    assert torch.load(state_path, weights_only=True)["epoch"] == 3
    assert best.read_bytes() == best_bytes
    assert json.loads((out / "metrics.json").read_text(encoding="utf-8"))["best_val_accuracy"] == 2.0


@pytest.mark.slow
def test_same_seed_gives_the_same_split_and_training(tmp_path):
    args = [*TINY, "--demo_options", SMALL_DEMO[BUNDLE], "--image_size", "64", "--max_epochs", "1"]
    runs = [tmp_path / "a", tmp_path / "b", tmp_path / "c"]
    for out, seed in zip(runs, ("0", "0", "1")):
        run_bundle(f"bundles/{BUNDLE}/train.json", *args, "--seed", seed, "--output_dir", str(out),
                   "--demo_dir", str(tmp_path / "demo"))
    splits = [json.loads((out / "splits.json").read_text(encoding="utf-8")) for out in runs]
    assert splits[0] == splits[1] and splits[0]["fractions"] != splits[2]["fractions"]
    a, b = _adapters(runs[0]), _adapters(runs[1])
    for name in a:
        assert torch.equal(a[name], b[name]), name


@pytest.mark.slow
def test_cladapter_stages_run_in_the_bundle_and_resume_in_stage_two(tmp_path):
    from medadapt.checkpoint import read_adapter_config

    args = [*TINY, "--demo_options", SMALL_DEMO[BUNDLE], "--image_size", "64", "--method", "cladapter",
            "--method_options", "{'num_clusters': 4, 'bottleneck': 8}", "--stage2_epoch", "2",
            "--train#preprocessing", "%validate#preprocessing"]
    straight = tmp_path / "straight"
    run_bundle(f"bundles/{BUNDLE}/train.json", *args, "--max_epochs", "3", "--output_dir", str(straight))
    log = (straight / "train.log").read_text(encoding="utf-8")
    stage1 = next(line for line in log.splitlines() if "stage 1 of 2" in line)
    stage2 = next(line for line in log.splitlines() if "stage 2 of 2" in line)
    # Stage 2 restarts from the best stage-1 checkpoint at lr / 10, with its own warm-up and cosine.
    assert "epoch 2: stage 2 of staged fine-tuning from the best stage-1 checkpoint (epoch 1), learning rates x 0.1, a new warm-up and cosine over" in log
    count = lambda line: int(line.split(":")[-1].split(" of ")[0].replace(",", "").strip())  # noqa: E731
    assert count(stage2) > count(stage1)  # the encoder trains in stage 2
    assert read_adapter_config(straight / "models" / "adapters")["stage"] == 2

    # Killed after epoch 2 (in stage 2), then resumed: the same run as the straight one.
    resumed = tmp_path / "resumed"
    run_bundle(f"bundles/{BUNDLE}/train.json", *args, "--max_epochs", "2", "--output_dir", str(resumed),
               "--total_steps", "$3 * len(@train#dataloader)")
    run_bundle(f"bundles/{BUNDLE}/train.json", *args, "--max_epochs", "3", "--output_dir", str(resumed),
               "--resume", "True")
    expected, got = _adapters(straight), _adapters(resumed)
    assert expected.keys() == got.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-6, msg=name)


def test_stage_two_restarts_the_warmup_cosine_schedule_at_a_tenth():
    import torch.nn as nn
    from monai.optimizers import WarmupCosineSchedule

    from medadapt.engine.handlers import restart_schedule

    layer = nn.Linear(2, 2)
    optimizer = torch.optim.AdamW([{"params": [layer.weight], "lr": 1e-3}, {"params": [layer.bias], "lr": 1e-4}])
    schedule = WarmupCosineSchedule(optimizer, warmup_steps=10, t_total=100)
    for _ in range(60):
        optimizer.step()
        schedule.step()
    for group in optimizer.param_groups:
        group["initial_lr"] *= 0.1
    schedule.base_lrs = [g["initial_lr"] for g in optimizer.param_groups]
    restart_schedule(schedule, 40)
    assert (schedule.t_total, schedule.warmup_steps, schedule.last_epoch) == (40, 4, 0)
    assert [g["lr"] for g in optimizer.param_groups] == [0.0, 0.0]  # warming up from zero again
    for _ in range(4):
        optimizer.step()
        schedule.step()
    assert [round(g["lr"], 9) for g in optimizer.param_groups] == [1e-4, 1e-5]  # the peak is lr / 10
