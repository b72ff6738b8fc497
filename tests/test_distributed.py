"""The multi-GPU override under torchrun: 2 CPU processes with gloo equal one process with the
same global batch."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from test_bundles import REPO, TINY, run_bundle

from medadapt.checkpoint import WEIGHTS_NAME

BUNDLE = "dka_busi_cls"
# No randomness that differs between processes: no augmentation, no dropout, fixed order.
DETERMINISTIC = [*TINY, "--demo_options", "{'per_class': 6}", "--image_size", "64", "--max_epochs", "2",
                 "--method_options", "{'bottleneck': 8, 'dropout': 0.0}",
                 "--train#preprocessing", "%validate#preprocessing"]


@pytest.mark.slow
def test_torchrun_two_cpu_processes_match_one_process(tmp_path):
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    assert torchrun, "torchrun is not installed beside this python"
    demo = str(tmp_path / "demo")
    single = tmp_path / "single"
    run_bundle(f"bundles/{BUNDLE}/train.json", *DETERMINISTIC, "--batch_size", "6", "--train#dataloader#shuffle",
               "False", "--output_dir", str(single), "--demo_dir", demo)

    ddp = tmp_path / "ddp"
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    files = f"['bundles/{BUNDLE}/train.json','bundles/{BUNDLE}/multi_gpu_train.json']"
    with socket.socket() as probe:  # a free port for the rendezvous
        probe.bind(("127.0.0.1", 0))
        port = str(probe.getsockname()[1])
    result = subprocess.run(
        [torchrun, "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", port, "-m", "monai.bundle", "run", "--config_file", files,
         *DETERMINISTIC, "--batch_size", "3", "--train#sampler#shuffle", "False", "--output_dir", str(ddp),
         "--demo_dir", demo],
        cwd=REPO, env=env, capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]

    splits_single = json.loads((single / "splits.json").read_text(encoding="utf-8"))
    assert json.loads((ddp / "splits.json").read_text(encoding="utf-8")) == splits_single
    assert len(splits_single["fractions"][0]["folds"][0]["train"]) % 6 == 0, "global batches must be full"
    one = load_file(str(single / "models" / "adapters" / WEIGHTS_NAME))
    two = load_file(str(ddp / "models" / "adapters" / WEIGHTS_NAME))
    assert one.keys() == two.keys()
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=1e-4, atol=1e-5, msg=name)
    # Only rank 0 writes logs and checkpoints.
    assert (ddp / "train.log").read_text(encoding="utf-8").count("outputs in") == 1
